"""What a click on one slice means beyond what a box-trained model can take from it.

A model trained with boxes only (LiteMedSAM, MedSAM) does not see exclude clicks, and an include
click on a slice the object was not found on becomes a box of whatever region it lands in. The
edits below do what such clicks mean; the sliding-window session and the SAM slice predictor use
them when their options ask, which are the defaults for box-trained models (chosen by
measurement under the CVPR 2025 protocol, docs/litemedsam.md):

- :func:`cut_excluded`: an exclude click inside the mask removes the part of the mask around it.
  The click is taken as the centre of a wrong part of radius ``r`` (its distance to the mask's
  edge); mask pixels further than ``keep_factor * r`` from it along the mask (at most half the
  mask's reach from it, so a slice is never emptied: the click may sit in a hole the model
  filled), and the include clicks, are kept as the object; a random walk on the slice's
  intensities decides the pixels in between. :func:`carried_exclusions` carries the click onto
  the slices propagated near it, where the tissue under it looks the same and it lies no deeper
  inside the mask than on its own slice (deeper, it is on the object there).
- :func:`added_around_clicks`: an include click the model still leaves out adds the part of the
  weight-free region around it (the ``region_grow`` correction of :mod:`box_prompts`).
- :func:`neighbour_box`: an include click on an empty slice next to slices that hold the object
  becomes the nearest such slice's box, moved to take in the click (the object continues here),
  instead of a box of the region the click lands in; :func:`within_region` then cuts that box to
  the region's box, where the model can grow one (the object tapers at its ends).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from scipy import ndimage

from ..data.prompts import Box, SlicePrompt
from ..data.volume import get_slice
from .box_prompts import bounding_box, updated_box

KEEP_FACTOR = 3.0
"""Mask pixels further than this many click radii (along the mask) count as the object."""
NEIGHBOUR_MAX_GAP = 3
"""An include click on an empty slice at most this many slices from the object continues it."""
CARRY_MM = 15.0
"""An exclude click also cuts the slices within this distance along the axis (where it carries)."""
CARRY_TOLERANCE = 0.05
"""... where the tissue under it differs by at most this share of the volume's 1-99 % intensity range,"""
CARRY_DEPTH_FACTOR = 1.5
"""... and where it lies at most this many times deeper inside the mask than on its own slice
(or :data:`CARRY_MIN_DEPTH` pixels)."""
CARRY_MIN_DEPTH = 2.0
CARRY_GAP_PX = 3.0
"""An include click carries onto a slice whose mask it lies at least this far outside."""
CROP_MARGIN = 4
RANDOM_WALK_BETA = 130.0


def _inside(mask: np.ndarray, row: float, col: float) -> bool:
    r, c = int(round(row)), int(round(col))
    return 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and bool(mask[r, c])


def _geodesic_distance(region: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """Distance in pixels from ``start`` along ``region`` (inf outside it or where unreachable)."""
    from skimage.graph import MCP_Geometric

    costs = np.where(region, 1.0, np.inf)
    distance, _ = MCP_Geometric(costs).find_costs([start])
    return np.where(region, distance, np.inf)


def _normalised(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image[region], (1, 99)) if region.any() else (image.min(), image.max())
    if high <= low:
        return np.zeros(image.shape, dtype=np.float64)
    return np.clip((image.astype(np.float64) - low) / (high - low), 0.0, 1.0)


def cut_excluded(mask: np.ndarray, image: np.ndarray, prompt: SlicePrompt, keep_factor: float = KEEP_FACTOR) -> np.ndarray:
    """``mask`` without the part around each exclude click of ``prompt`` that lies inside it."""
    from skimage.segmentation import random_walker

    mask = np.asarray(mask, dtype=bool)
    excluded = [p for p in prompt.points if not p.positive and _inside(mask, p.row, p.col)]
    if not excluded:
        return mask
    included = [(int(round(p.row)), int(round(p.col))) for p in prompt.points if p.positive and _inside(mask, p.row, p.col)]
    result = mask.copy()
    labels, _ = ndimage.label(mask)
    for click in excluded:
        r, c = int(round(click.row)), int(round(click.col))
        if not result[r, c]:
            continue  # an earlier cut removed it already
        part = labels == labels[r, c]
        rows, cols = np.flatnonzero(part.any(axis=1)), np.flatnonzero(part.any(axis=0))
        r0, r1 = max(0, rows[0] - CROP_MARGIN), min(mask.shape[0], rows[-1] + CROP_MARGIN + 1)
        c0, c1 = max(0, cols[0] - CROP_MARGIN), min(mask.shape[1], cols[-1] + CROP_MARGIN + 1)
        region = part[r0:r1, c0:c1] & result[r0:r1, c0:c1]
        radius = float(ndimage.distance_transform_edt(region)[r - r0, c - c0])
        along = _geodesic_distance(region, (r - r0, c - c0))
        reach = along[region].max()
        keep = region & (along > min(keep_factor * radius, reach / 2))
        for ir, ic in included:
            if r0 <= ir < r1 and c0 <= ic < c1 and region[ir - r0, ic - c0]:
                keep[ir - r0, ic - c0] = True
        if not keep.any():  # a part of one or two pixels
            result[r0:r1, c0:c1] &= ~region
            continue
        seeds = np.zeros(region.shape, dtype=np.int32)
        seeds[~region] = 2
        seeds[region & (along <= max(1.0, min(radius, reach) / 4))] = 2  # well inside the wrong part
        seeds[keep] = 1
        walked = seeds
        if (seeds == 0).any():
            walked = random_walker(_normalised(image[r0:r1, c0:c1], region), seeds, beta=RANDOM_WALK_BETA, mode="bf")
        result[r0:r1, c0:c1] &= ~(region & (walked == 2))
    return result


def neighbour_box(prompt: SlicePrompt, object_mask: np.ndarray | None, axis: int, max_gap: int) -> Box | None:
    """The box for include clicks on an empty slice: the nearest slice within ``max_gap`` that
    holds the object, its box moved to take in the clicks; None when no slice is that near or the
    prompt is not clicks alone."""
    if object_mask is None or prompt.box is not None or prompt.mask is not None:
        return None
    if not any(p.positive for p in prompt.points):
        return None
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(object_mask.any(axis=other))
    if present.size == 0 or prompt.index in present:
        return None
    nearest = int(present[np.argmin(np.abs(present - prompt.index))])
    if abs(nearest - prompt.index) > max_gap:
        return None
    neighbour = get_slice(object_mask, axis, nearest)
    box = bounding_box(neighbour)
    return updated_box(box, prompt, neighbour.shape) if box is not None else None


def within_region(box: Box, region_box: Box | None, prompt: SlicePrompt) -> Box:
    """``box`` cut to ``region_box`` (the box of the region grown from the clicks) where the two
    overlap around every include click, else ``box``: past the slices that hold it the object
    tapers, so a neighbour's box is often too big (CVPR 2025 protocol, docs/litemedsam.md)."""
    if region_box is None:
        return box
    r0, c0 = max(box.row0, region_box.row0), max(box.col0, region_box.col0)
    r1, c1 = min(box.row1, region_box.row1), min(box.col1, region_box.col1)
    holds = all(r0 <= p.row <= r1 and c0 <= p.col <= c1 for p in prompt.points if p.positive)
    return Box(r0, c0, r1, c1) if r1 > r0 and c1 > c0 and holds else box


def _depth(mask: np.ndarray) -> np.ndarray:
    """Each pixel's distance to the edge of ``mask`` (0 outside it)."""
    return ndimage.distance_transform_edt(np.asarray(mask, dtype=bool))


def _carried(anchors: dict[int, SlicePrompt], index: int, volume_slice, reach: int, tolerance: float,
             positive: bool, holds) -> SlicePrompt | None:
    """The clicks of sign ``positive`` of anchors at most ``reach`` slices from ``index`` whose
    tissue on slice ``index`` looks the same (intensity within ``tolerance`` of the clicked
    pixel's) and for which ``holds(prompt, row, col)`` is true; None when no click carries."""
    here = None
    points = []
    for k, prompt in anchors.items():
        if k == index or abs(k - index) > reach:
            continue
        for p in prompt.points:
            if p.positive != positive:
                continue
            here = volume_slice(index) if here is None else here
            r, c = int(round(p.row)), int(round(p.col))
            if abs(float(here[r, c]) - float(volume_slice(k)[r, c])) <= tolerance and holds(prompt, r, c):
                points.append(p)
    if not points:
        return None
    axis = next(iter(anchors.values())).axis
    return SlicePrompt(axis=axis, index=index, points=tuple(points))


def carried_exclusions(anchors: dict[int, SlicePrompt], index: int, volume_slice, reach: int,
                       tolerance: float, mask: np.ndarray) -> SlicePrompt | None:
    """The exclude clicks of anchors at most ``reach`` slices from ``index``, carried onto slice
    ``index`` where the tissue under them looks the same (intensity within ``tolerance`` of the
    clicked pixel's): the wrong part a click removed usually goes on through the next slices.
    Not where the click lies deeper inside ``mask`` (this slice's) than
    :data:`CARRY_DEPTH_FACTOR` times its depth in the mask it joined on its own slice: there it
    is on the object (a click on a box's slice joined no mask and carries by intensity alone).
    ``volume_slice(k)`` gives slice k's intensities. None when no click carries."""
    depth_here = cache(lambda: _depth(mask))  # computed once, when a click needs it

    def shallow_enough(prompt, r, c):
        if prompt.mask is None:
            return True
        return depth_here()[r, c] <= max(CARRY_MIN_DEPTH, CARRY_DEPTH_FACTOR * _depth(prompt.mask)[r, c])

    return _carried(anchors, index, volume_slice, reach, tolerance, False, shallow_enough)


def carried_inclusions(anchors: dict[int, SlicePrompt], index: int, volume_slice, reach: int,
                       tolerance: float, mask: np.ndarray) -> SlicePrompt | None:
    """The include clicks of anchors at most ``reach`` slices from ``index``, carried onto slice
    ``index`` where ``mask`` (this slice's) misses them by at least :data:`CARRY_GAP_PX` and the
    tissue under them looks the same (intensity within ``tolerance`` of the clicked pixel's): a
    part the model left out usually goes on through the next slices. Not a click just beside
    this slice's rim (a rim missed on one slice says little about the next), nor clicks on a
    slice without the object (no box, no mask: where they belong is not known yet). None when
    no click carries."""
    gap = cache(lambda: _depth(~np.asarray(mask, dtype=bool)))  # computed once, when a click needs it

    def far_outside(prompt, r, c):
        if prompt.box is None and (prompt.mask is None or not np.any(prompt.mask)):
            return False
        return gap()[r, c] >= CARRY_GAP_PX

    return _carried(anchors, index, volume_slice, reach, tolerance, True, far_outside)


def missed_clicks(mask: np.ndarray, prompt: SlicePrompt) -> list:
    """The include clicks of ``prompt`` that ``mask`` leaves out."""
    return [p for p in prompt.points if p.positive and not _inside(mask, p.row, p.col)]


def added_around_clicks(mask: np.ndarray, region: np.ndarray, prompt: SlicePrompt) -> np.ndarray:
    """``mask`` with the part of ``region`` around each include click it leaves out."""
    mask = np.asarray(mask, dtype=bool)
    missed = [p for p in missed_clicks(mask, prompt) if _inside(region, p.row, p.col)]
    if not missed:
        return mask
    labels, _ = ndimage.label(region)
    picked = {labels[int(round(p.row)), int(round(p.col))] for p in missed}
    return mask | np.isin(labels, list(picked))
