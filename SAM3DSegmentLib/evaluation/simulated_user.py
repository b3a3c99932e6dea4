"""A simulated user for evaluation: initial prompts and correction clicks from a reference mask.

Fixed by a seed (only the box jitter is random):

- click: one include click at the interior-most pixel (largest distance to the background, in
  mm; the middle of a ridge of equally deep pixels) of the target on its largest slice along the propagation axis;
- box: the target's bounding box on that slice, each side moved by up to ``box_jitter`` x the
  box's extent (uniform, seeded), clipped to the slice;
- correction: on the worst slice (most wrong pixels among the slices where the reference or an
  anchor is present), a click at the interior-most pixel of the largest 2D error region: include
  for a false negative, exclude for a false positive. A negative click alone is not a valid
  prompt, so on a slice that is not yet an anchor an exclude click comes with an include click at
  the interior-most pixel of the reference on that slice (two clicks are counted). With
  ``corrections="click+mask"`` a click on a slice that is not an anchor instead carries the
  slice's current mask as the prompt's mask input (the user refines what is there; one click).

False positives on slices where the reference is empty are left to the stop rule: a click
cannot tell an engine that a slice must be empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from ..data.prompts import Box, Point, SlicePrompt
from ..data.volume import get_slice
from ..errors import InputError

PromptKind = Literal["click", "box"]


@dataclass(frozen=True)
class Correction:
    """One correction round's prompt and what it fixes."""

    prompt: SlicePrompt
    kind: Literal["false_negative", "false_positive"]
    region_pixels: int
    clicks: int


def slice_areas(mask: np.ndarray, axis: int) -> np.ndarray:
    """Foreground pixels per slice along ``axis``."""
    other = tuple(a for a in range(3) if a != axis)
    return np.count_nonzero(mask, axis=other)


def slice_spacing(spacing_kji, axis: int) -> tuple[float, float]:
    """(row, col) pixel size in mm of slices along ``axis``."""
    remaining = [float(s) for a, s in enumerate(spacing_kji) if a != axis]
    return remaining[0], remaining[1]


def interior_point(mask: np.ndarray, spacing_rc=(1.0, 1.0)) -> tuple[int, int]:
    """The pixel of a 2D mask farthest (in mm) from its background; on a ridge of equally deep
    pixels, the one nearest their centroid (first in raster order on remaining ties)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise InputError("Cannot place a click in an empty region.")
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing_rc)[1:-1, 1:-1]
    deepest = np.argwhere(depth >= depth.max() - 1e-6)
    centre = deepest.mean(axis=0)
    row, col = deepest[int(np.argmin(((deepest - centre) ** 2).sum(axis=1)))]
    return int(row), int(col)


def bounding_box(mask: np.ndarray) -> Box:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return Box(float(rows[0]), float(cols[0]), float(rows[-1]), float(cols[-1]))


class SimulatedUser:
    """Prompts derived from a reference mask; the same seed gives the same prompts."""

    def __init__(
        self, prompt: PromptKind = "click", box_jitter: float = 0.0, seed: int = 0, corrections: str = "click"
    ):
        if prompt not in ("click", "box"):
            raise InputError(f"Simulated prompt must be 'click' or 'box'; got {prompt!r}.")
        if corrections not in ("click", "click+mask"):
            raise InputError(f"Corrections must be 'click' or 'click+mask'; got {corrections!r}.")
        self.corrections = corrections
        if not 0.0 <= box_jitter < 0.5:
            raise InputError(f"Box jitter is a fraction of the box size in [0, 0.5); got {box_jitter}.")
        self.prompt_kind = prompt
        self.box_jitter = box_jitter
        self.rng = np.random.default_rng(seed)

    def initial_prompt(self, reference: np.ndarray, axis: int, spacing_kji=(1.0, 1.0, 1.0)) -> SlicePrompt:
        """A click or a box on the target's largest slice."""
        reference = np.asarray(reference, dtype=bool)
        areas = slice_areas(reference, axis)
        if areas.max() == 0:
            raise InputError("The target is empty in the reference; there is nothing to prompt.")
        index = int(np.argmax(areas))
        target = get_slice(reference, axis, index)
        if self.prompt_kind == "click":
            row, col = interior_point(target, slice_spacing(spacing_kji, axis))
            return SlicePrompt(axis, index, points=(Point(row, col, True),))
        return SlicePrompt(axis, index, box=self._jittered(bounding_box(target), target.shape))

    def _jittered(self, box: Box, shape: tuple[int, int]) -> Box:
        if self.box_jitter == 0:
            return box
        height, width = box.row1 - box.row0 + 1, box.col1 - box.col0 + 1
        dr0, dr1 = self.rng.uniform(-self.box_jitter, self.box_jitter, 2) * height
        dc0, dc1 = self.rng.uniform(-self.box_jitter, self.box_jitter, 2) * width
        r0 = float(np.clip(round(box.row0 + dr0), 0, shape[0] - 1))
        r1 = float(np.clip(round(box.row1 + dr1), 0, shape[0] - 1))
        c0 = float(np.clip(round(box.col0 + dc0), 0, shape[1] - 1))
        c1 = float(np.clip(round(box.col1 + dc1), 0, shape[1] - 1))
        if r1 - r0 < 1 or c1 - c0 < 1:
            return box
        return Box(r0, c0, r1, c1)

    def correction(
        self,
        prediction: np.ndarray,
        reference: np.ndarray,
        axis: int,
        anchors=(),
        spacing_kji=(1.0, 1.0, 1.0),
    ) -> Correction | None:
        """The next correction click, or None when no slice with the target has an error."""
        prediction = np.asarray(prediction, dtype=bool)
        reference = np.asarray(reference, dtype=bool)
        candidates = slice_areas(reference, axis) > 0
        for index in anchors:
            candidates[index] = True
        errors = slice_areas(prediction ^ reference, axis) * candidates
        if errors.max() == 0:
            return None
        index = int(np.argmax(errors))
        pred, ref = get_slice(prediction, axis, index), get_slice(reference, axis, index)
        spacing_rc = slice_spacing(spacing_kji, axis)
        best: tuple[int, bool, np.ndarray] | None = None
        for is_missing, error in ((True, ref & ~pred), (False, pred & ~ref)):
            labels, count = ndimage.label(error)
            if count == 0:
                continue
            sizes = np.bincount(labels.ravel())[1:]
            largest = int(np.argmax(sizes))
            if best is None or sizes[largest] > best[0]:
                best = (int(sizes[largest]), is_missing, labels == largest + 1)
        assert best is not None
        size, is_missing, region = best
        row, col = interior_point(region, spacing_rc)
        points = [Point(row, col, is_missing)]
        new_anchor = index not in set(anchors)
        if new_anchor and self.corrections == "click+mask" and pred.any():
            return Correction(SlicePrompt(axis, index, points=tuple(points), mask=pred.copy()),
                              "false_negative" if is_missing else "false_positive", size, 1)
        if not is_missing and new_anchor:
            r, c = interior_point(ref, spacing_rc)
            points.insert(0, Point(r, c, True))
        return Correction(
            prompt=SlicePrompt(axis, index, points=tuple(points)),
            kind="false_negative" if is_missing else "false_positive",
            region_pixels=size,
            clicks=len(points),
        )
