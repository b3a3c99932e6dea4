"""The models users will want: what each checkpoint is, where it comes from, how to feed it.

Preprocessing facts (input size, resizing, normalisation) live here, not in the engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint of a Segment Anything family.

    ``family`` is "sam" (segment-anything, incl. MedSAM) or "sam2" (SAM 2 / 2.1, MedSAM2).
    ``builder`` is the segment-anything registry key ("vit_b", ...) or the sam2 config name.
    ``resize`` is "longest_side" (SAM: resize the longer side, pad) or "square" (MedSAM, SAM 2).
    ``normalisation`` is "imagenet" (x/255, then mean/std) or "minmax" (MedSAM: per image to [0, 1]).
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
