"""Other segments as exclude prompts: steer the model away from segments that are already there.

Setting "Other segments are exclude prompts" (``PanelSettings.exclude_other_segments``, on by
default). When on, a prompt the user gives on a slice (clicks, a scribble, a box) gets exclude
points inside the other *visible* segments' regions **on that slice**, before it goes to the model:

- the other visible segments are cut into 2D connected components on the prompted slice;
- a component is a candidate when it reaches into the prompt's neighbourhood: the box (grown by
  ``BOX_MARGIN_MM``), or within ``NEAR_CLICK_MM`` of an include point;
- a component that holds an include point, or the centre of the box, is skipped: the user prompted
  *on* it (e.g. a tumour inside a finished liver segment: the liver must not push the click away);
- each candidate gives one exclude point: the point of the component deepest inside it (largest
  distance to its edge, in mm); with a box, the deepest among its pixels inside the grown box (a
  box-trained model sees nothing outside its box);
- at most ``MAX_EXCLUDE_POINTS``, nearest to the prompt first, never on an include point's pixel.

Nothing is added to a mask prompt (a lasso, "use the current segment"): the slice is the mask as
given. Nothing is added to prompts without an include point or a box (an exclude click). Only the
prompted slice gets points; the slices a propagation computes are protected by the Segment Editor's
masking in the writer (overwrite none / visible, editable area outside the segments), not by prompts.
The points become part of the slice's prompt in the session, so they show as exclude markers.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage

from SAM3DSegmentLib.data.prompts import Point, SlicePrompt

MAX_EXCLUDE_POINTS = 3
NEAR_CLICK_MM = 25.0
BOX_MARGIN_MM = 2.0


def _grown_box(prompt: SlicePrompt, shape, pixel_mm) -> np.ndarray | None:
    """The prompt's box grown by BOX_MARGIN_MM, as a mask (None without a box)."""
    if prompt.box is None:
        return None
    rows, cols = np.indices(shape)
    b = prompt.box.normalised()
    grow = BOX_MARGIN_MM / np.asarray(pixel_mm)
    return ((rows >= b.row0 - grow[0]) & (rows <= b.row1 + grow[0])
            & (cols >= b.col0 - grow[1]) & (cols <= b.col1 + grow[1]))


def _neighbourhood(prompt: SlicePrompt, shape, pixel_mm) -> np.ndarray:
    """Pixels near the prompt: the grown box, and disks of NEAR_CLICK_MM around include points."""
    box = _grown_box(prompt, shape, pixel_mm)
    near = np.zeros(shape, dtype=bool) if box is None else box
    rows, cols = np.indices(shape)
    for p in prompt.points:
        if p.positive:
            near |= ((rows - p.row) * pixel_mm[0]) ** 2 + ((cols - p.col) * pixel_mm[1]) ** 2 <= NEAR_CLICK_MM ** 2
    return near


def _seeds(prompt: SlicePrompt) -> list[tuple[float, float]]:
    """Where the user pointed at the object: include points and the box centre (row, col)."""
    seeds = [(p.row, p.col) for p in prompt.points if p.positive]
    if prompt.box is not None:
        b = prompt.box.normalised()
        seeds.append(((b.row0 + b.row1) / 2, (b.col0 + b.col1) / 2))
    return seeds


def exclude_points(prompt: SlicePrompt, others: list[np.ndarray], pixel_mm) -> list[Point]:
    """Exclude points for ``prompt`` inside ``others`` (the other visible segments on the prompt's
    slice, 2D masks); see the module docstring. Empty for mask prompts and prompts without include
    points or a box."""
    if prompt.mask is not None or not _seeds(prompt):
        return []
    pixel_mm = np.asarray(pixel_mm, dtype=float)
    shape = others[0].shape if others else None
    if shape is None:
        return []
    near = _neighbourhood(prompt, shape, pixel_mm)
    box = _grown_box(prompt, shape, pixel_mm)
    seed_pixels = [(int(round(r)), int(round(c))) for r, c in _seeds(prompt)]
    seed_pixels = [(r, c) for r, c in seed_pixels if 0 <= r < shape[0] and 0 <= c < shape[1]]
    taken = {(int(round(p.row)), int(round(p.col))) for p in prompt.points}
    candidates = []
    for mask in others:
        mask = np.asarray(mask, dtype=bool)
        if not (mask & near).any():
            continue
        labels, _ = ndimage.label(mask)
        depth = ndimage.distance_transform_edt(mask, sampling=pixel_mm)
        for label in np.unique(labels[near & mask]):  # the components that reach the neighbourhood
            component = labels == label
            if any(component[r, c] for r, c in seed_pixels):
                continue
            where = component if box is None else component & box
            if not where.any():
                continue
            score = np.where(where, depth, -1.0)
            row, col = np.unravel_index(int(np.argmax(score)), shape)
            if (row, col) in taken:
                continue
            distance = min(np.hypot((row - r) * pixel_mm[0], (col - c) * pixel_mm[1]) for r, c in _seeds(prompt))
            candidates.append((distance, int(row), int(col)))
    candidates.sort()
    return [Point(float(r), float(c), positive=False) for _, r, c in candidates[:MAX_EXCLUDE_POINTS]]


def with_exclude_points(prompt: SlicePrompt, points: list[Point]) -> SlicePrompt:
    """The prompt with ``points`` added (after the user's own)."""
    return prompt if not points else replace(prompt, points=tuple(prompt.points) + tuple(points))
