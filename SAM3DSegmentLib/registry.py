"""The models users will want: what each checkpoint is, where it comes from, how to feed it.

Preprocessing facts (input size, resizing, normalisation) live here, not in the engines.
File sizes and checksums are filled in only where the publisher states them (or where they
could be verified); ``None`` means "not published / not verified", and downloads then check
only that the file is non-empty and loads as a checkpoint of the right family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint of a Segment Anything family.

    ``family`` is "sam" (segment-anything, incl. MedSAM) or "sam2" (SAM 2 / 2.1, MedSAM2).
    ``builder`` is the segment-anything registry key ("vit_b", ...) or the sam2 config name.
    ``resize`` is "longest_side" (SAM: resize the longer side, pad) or "square" (MedSAM, SAM 2).
    ``normalisation`` is "imagenet" (x/255, then mean/std) or "minmax" (MedSAM: per image to [0, 1]).
    ``config_source`` says where a sam2 config lives: "sam2" (shipped in the sam2 package, composed
    by hydra) or "sam3dsegment" (a YAML in SAM3DSegmentLib/configs, e.g. MedSAM2 at 512 px).
    """

    name: str
    family: Literal["sam", "sam2"]
    builder: str
    input_size: int
    resize: Literal["longest_side", "square"]
    normalisation: Literal["imagenet", "minmax"]
    url: str
    filename: str
    file_size: int | None = None
    sha256: str | None = None
    licence: str = ""
    description: str = ""
    config_source: Literal["sam2", "sam3dsegment"] = "sam2"
    homepage: str = ""


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM21_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_SAM_HOME = "https://github.com/facebookresearch/segment-anything"
_SAM2_HOME = "https://github.com/facebookresearch/sam2"


def _sam(name: str, builder: str, filename: str, description: str, **facts) -> ModelSpec:
    return ModelSpec(
        name=name, family="sam", builder=builder, input_size=1024, resize="longest_side",
        normalisation="imagenet", url=_SAM_URL + filename, filename=filename,
        licence="Apache-2.0", description=description, homepage=_SAM_HOME, **facts,
    )


def _sam21(name: str, config: str, filename: str, description: str, **facts) -> ModelSpec:
    return ModelSpec(
        name=name, family="sam2", builder=f"configs/sam2.1/{config}", input_size=1024,
        resize="square", normalisation="imagenet", url=_SAM21_URL + filename, filename=filename,
        licence="Apache-2.0", description=description, homepage=_SAM2_HOME, **facts,
    )


_SPECS = (
    _sam("sam_vit_b", "vit_b", "sam_vit_b_01ec64.pth", "SAM ViT-B (Meta), 91M parameters"),
    _sam("sam_vit_l", "vit_l", "sam_vit_l_0b3195.pth", "SAM ViT-L (Meta), 308M parameters"),
    _sam("sam_vit_h", "vit_h", "sam_vit_h_4b8939.pth", "SAM ViT-H (Meta), 636M parameters"),
    ModelSpec(
        name="medsam_vit_b", family="sam", builder="vit_b", input_size=1024, resize="square",
        normalisation="minmax",
        url="https://huggingface.co/wanglab/medsam-vit-base/resolve/main/medsam_vit_b.pth",
        filename="medsam_vit_b.pth", licence="Apache-2.0",
        description="MedSAM (SAM ViT-B fine-tuned on 1.5M medical image-mask pairs)",
        homepage="https://github.com/bowang-lab/MedSAM",
    ),
    _sam21("sam2.1_hiera_tiny", "sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt",
           "SAM 2.1 Hiera-T (Meta), 38.9M parameters"),
    _sam21("sam2.1_hiera_small", "sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt",
           "SAM 2.1 Hiera-S (Meta), 46M parameters"),
    _sam21("sam2.1_hiera_base_plus", "sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt",
           "SAM 2.1 Hiera-B+ (Meta), 80.8M parameters"),
    _sam21("sam2.1_hiera_large", "sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt",
           "SAM 2.1 Hiera-L (Meta), 224.4M parameters"),
    ModelSpec(
        name="medsam2", family="sam2", builder="medsam2_hiera_t512.yaml", input_size=512,
        resize="square", normalisation="imagenet",
        url="https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",
        filename="MedSAM2_latest.pt", licence="Apache-2.0",
        description="MedSAM2 (SAM 2.1 Hiera-T fine-tuned on 3D medical images and videos, 512 px)",
        config_source="sam3dsegment", homepage="https://github.com/bowang-lab/MedSAM2",
    ),
)

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}

DEFAULT_SAM2_MODEL = "sam2.1_hiera_tiny"


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """The registry entry called ``name`` (a ModelSpec is returned as is)."""
    if isinstance(name, ModelSpec):
        return name
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise InputError(
            f"Unknown model '{name}'. Known models: {known}. "
            "Run `sam3d models list` to see them with sizes and licences."
        ) from None
