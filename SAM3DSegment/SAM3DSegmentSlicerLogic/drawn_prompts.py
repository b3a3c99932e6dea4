"""Lasso contours and scribble strokes drawn in a slice view (RAS) as prompts on one slice.

Pure geometry, without Qt or MRML (tested on real MRML volumes in test_slicer_logic.py):

- **Lasso** (a closed contour): the contour's points, mapped into the volume's IJK grid and
  projected along the view's axis onto the view's slice, are a polygon; the voxels whose centres
  lie inside it (even-odd rule, as Slicer's Draw effect fills a polygon) are the filled mask.
  - include lasso: the filled polygon is the slice's mask prompt;
  - exclude lasso: the slice's current mask (the segment on that slice) minus the polygon.
  Either way the mask replaces the slice's earlier prompts (``replace_existing``): the slice's
  result is exactly that mask, and clicks added later on the slice refine it.
- **Scribble** (a free stroke): points sampled along the stroke every ``spacing_mm`` (arc length
  in RAS), at most ``max_points`` (evenly spread over the stroke when it is longer), all include
  or all exclude; they are added to the slice's prompt like clicks. On box-trained models
  (LiteMedSAM, MedSAM: ``region_box``) they become the box of the weight-free region grown from the
  include points (and the slice's mask, if any), exclude points cutting that region
  (``SAM3DSegmentLib.engines.box_prompts``); SAM / SAM 2 take them as clicks.
"""

from __future__ import annotations

import numpy as np

from SAM3DSegmentLib.data.prompts import Point, SlicePrompt, slice_shape
from SAM3DSegmentLib.data.volume import AXIS_NAMES, Volume, kji_to_slice
from SAM3DSegmentLib.errors import PromptError

SCRIBBLE_SPACING_MM = 5.0
"""Distance between points sampled along a scribble (arc length in RAS)."""
SCRIBBLE_MAX_POINTS = 12
"""At most this many points per scribble: a longer stroke gets them evenly spread along it."""


def contour_on_slice(volume: Volume, axis: int, contour_ras) -> np.ndarray:
    """(N, 2) slice coordinates (row, col) of RAS points, projected along ``axis``."""
    points = np.asarray(contour_ras, dtype=float).reshape(-1, 3)
    rows_cols = []
    for ras in points:
        _, row, col = kji_to_slice(axis, volume.ras_to_kji(ras))
        rows_cols.append((float(row), float(col)))
    return np.asarray(rows_cols, dtype=float).reshape(-1, 2)


def polygon_mask(shape: tuple[int, int], polygon_rc) -> np.ndarray:
    """Pixels of a ``shape`` (rows, cols) grid whose centres lie inside the closed polygon
    (vertices (row, col); the last vertex joins the first), by the even-odd rule, row by row."""
    polygon = np.asarray(polygon_rc, dtype=float).reshape(-1, 2)
    rows, cols = shape
    mask = np.zeros((rows, cols), dtype=bool)
    if len(polygon) < 3:
        return mask
    r0, c0 = polygon[:, 0], polygon[:, 1]
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    first = max(int(np.ceil(r0.min())), 0)
    last = min(int(np.floor(r0.max())), rows - 1)
    centres = np.arange(cols, dtype=float)
    for row in range(first, last + 1):
        crossing = (r0 <= row) != (r1 <= row)  # half-open: a vertex on the row counts once
        if not crossing.any():
            continue
        a0, a1, b0, b1 = r0[crossing], r1[crossing], c0[crossing], c1[crossing]
        xs = np.sort(b0 + (row - a0) * (b1 - b0) / (a1 - a0))
        mask[row] = np.searchsorted(xs, centres, side="right") % 2 == 1
    return mask


def _check_index(volume: Volume, axis: int, index: int) -> None:
    if not 0 <= index < volume.shape[axis]:
        raise PromptError(f"Slice {index} is outside volume '{volume.name}' along {AXIS_NAMES[axis]}.")


def lasso_mask(volume: Volume, axis: int, index: int, contour_ras) -> np.ndarray:
    """The filled lasso on slice ``index`` along ``axis``: a 2D bool mask of that slice's shape."""
    _check_index(volume, axis, index)
    polygon = contour_on_slice(volume, axis, contour_ras)
    if len(np.unique(np.round(polygon, 3), axis=0)) < 3:
        raise PromptError("The lasso needs at least three points: drag around the object.")
    mask = polygon_mask(slice_shape(volume.shape, axis), polygon)
    if not mask.any():
        raise PromptError(
            f"The lasso encloses no voxel of slice {index} along {AXIS_NAMES[axis]}. Draw it around the object, "
            "inside the image."
        )
    return mask


def lasso_prompt(volume: Volume, axis: int, index: int, contour_ras, positive: bool = True,
                 current_mask: np.ndarray | None = None) -> SlicePrompt:
    """A lasso as a mask prompt on slice ``index``: the filled polygon (include), or
    ``current_mask`` (the segment on that slice) minus the polygon (exclude). Send it with
    ``replace_existing=True``: the slice's result is exactly this mask."""
    filled = lasso_mask(volume, axis, index, contour_ras)
    if positive:
        return SlicePrompt(axis=axis, index=index, mask=filled)
    current = np.zeros_like(filled) if current_mask is None else np.asarray(current_mask, dtype=bool)
    if current.shape != filled.shape:
        raise PromptError(f"The current mask has shape {current.shape}; slice {index} is {filled.shape}.")
    if not (current & filled).any():
        raise PromptError(f"The exclude lasso holds nothing of the segment on slice {index}: nothing to remove.")
    remaining = current & ~filled
    if not remaining.any():
        raise PromptError(
            f"The exclude lasso removes all of the segment on slice {index}. Use the Erase effect to empty a slice."
        )
    return SlicePrompt(axis=axis, index=index, mask=remaining)


def stroke_samples(stroke_ras, spacing_mm: float = SCRIBBLE_SPACING_MM,
                   max_points: int = SCRIBBLE_MAX_POINTS) -> np.ndarray:
    """RAS points along a stroke every ``spacing_mm`` of arc length from its start (and its end
    when that is at least half a spacing past the last sample); at most ``max_points``, evenly
    spread over the stroke when it is longer."""
    points = np.asarray(stroke_ras, dtype=float).reshape(-1, 3)
    if len(points) == 0:
        raise PromptError("The scribble has no points.")
    if spacing_mm <= 0 or max_points < 1:
        raise PromptError("Scribble spacing must be positive and at least one point allowed.")
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    length = float(arc[-1])
    if length == 0:
        return points[:1].copy()
    at = np.arange(0.0, length + 1e-9, spacing_mm)
    if length - at[-1] >= spacing_mm / 2:
        at = np.append(at, length)
    if len(at) > max_points:
        at = np.linspace(0.0, length, max_points) if max_points > 1 else np.array([0.0])
    return np.stack([np.interp(at, arc, points[:, d]) for d in range(3)], axis=1)


def scribble_prompt(volume: Volume, axis: int, index: int, stroke_ras, positive: bool = True,
                    spacing_mm: float = SCRIBBLE_SPACING_MM, max_points: int = SCRIBBLE_MAX_POINTS) -> SlicePrompt:
    """A scribble as include (or exclude) points on slice ``index``: samples along the stroke
    (:func:`stroke_samples`) projected onto the slice; samples outside the image are dropped and
    samples on one pixel kept once."""
    _check_index(volume, axis, index)
    rows, cols = slice_shape(volume.shape, axis)
    points, pixels = [], set()
    for row, col in contour_on_slice(volume, axis, stroke_samples(stroke_ras, spacing_mm, max_points)):
        if not (-0.5 <= row < rows - 0.5 and -0.5 <= col < cols - 0.5):
            continue
        pixel = (round(row), round(col))
        if pixel not in pixels:
            pixels.add(pixel)
            points.append(Point(float(row), float(col), bool(positive)))
    if not points:
        raise PromptError(f"The scribble is outside the image on slice {index}. Draw on the object.")
    return SlicePrompt(axis=axis, index=index, points=tuple(points))
