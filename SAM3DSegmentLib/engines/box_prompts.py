"""Clicks into boxes, for models trained with box prompts only (LiteMedSAM, MedSAM).

A box-trained model given a lone click often returns nothing (LiteMedSAM on the demo lesion:
an empty mask). So on such models the user's clicks are turned into a box before the model
sees them, in one of these ways (chosen by measurement, docs/litemedsam.md):

Start (clicks only, no box or mask on the slice) -- ``ClickStart``:
- ``point``: the clicks as they are (what SAM expects);
- ``region_box``: the weight-free 2D region grown from the clicks (:mod:`weightfree`), its
  bounding box with a margin;
- ``region_box+points``: that box and the clicks;
- ``mm_box``: a square of ``click_box_mm`` around the include clicks;
- ``best_box``: the region's box (grown by 20 %) and squares of 50 and 80 mm, each decoded
  (one encoder run, three decoder runs); the model's predicted IoU picks the mask. Best on
  average over the shared organs and tumours, but it can pick the organ around a clicked
  lesion (the demo's liver lesion), so it is not the default.

Correction (clicks on a slice that already has a mask: an anchor or a propagated slice) --
``Correction``:
- ``points+mask``: the clicks with the slice's mask as dense input (what SAM expects);
- ``region_box``: the weight-free region from the mask and the clicks, its box;
- ``box_update``: the mask's box, grown to take in include clicks and cut back to leave out
  exclude clicks;
- ``region_grow``: the box of the mask and, for include clicks outside the mask, the weight-free
  region together (an include click never shrinks the slice's box; one inside the mask keeps
  it), and an include click the model still leaves out adds the region's part around it. Exclude clicks are the session's business
  (:func:`~SAM3DSegmentLib.engines.click_edits.cut_excluded`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np

from ..data.prompts import Box, SlicePrompt
from ..errors import InputError

ClickStart = Literal["point", "region_box", "region_box+points", "mm_box", "best_box"]
Correction = Literal["points+mask", "region_box", "box_update", "region_grow"]
CLICK_STARTS: tuple[str, ...] = ("point", "region_box", "region_box+points", "mm_box", "best_box")
CORRECTIONS: tuple[str, ...] = ("points+mask", "region_box", "box_update", "region_grow")


def check_strategies(click_start: str, correction: str) -> None:
    if click_start not in CLICK_STARTS:
        raise InputError(f"Unknown click start {click_start!r}; use one of {', '.join(CLICK_STARTS)}.")
    if correction not in CORRECTIONS:
        raise InputError(f"Unknown correction {correction!r}; use one of {', '.join(CORRECTIONS)}.")


def bounding_box(mask: np.ndarray, margin_px: tuple[float, float] = (0.0, 0.0)) -> Box | None:
    """The mask's inclusive bounding box grown by ``margin_px`` (rows, cols), clipped; None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    n_rows, n_cols = mask.shape
    return Box(
        float(max(0.0, np.floor(rows[0] - margin_px[0]))), float(max(0.0, np.floor(cols[0] - margin_px[1]))),
        float(min(n_rows - 1.0, np.ceil(rows[-1] + margin_px[0]))), float(min(n_cols - 1.0, np.ceil(cols[-1] + margin_px[1]))),
    )


def padded_box(box: Box, padding_px: tuple[float, float], shape: tuple[int, int]) -> Box:
    """``box`` grown by ``padding_px`` (rows, cols) on each side, clipped to a slice of ``shape``."""
    b = box.normalised()
    return Box(
        max(0.0, b.row0 - padding_px[0]), max(0.0, b.col0 - padding_px[1]),
        min(shape[0] - 1.0, b.row1 + padding_px[0]), min(shape[1] - 1.0, b.col1 + padding_px[1]),
    )


def box_around_clicks(prompt: SlicePrompt, shape: tuple[int, int], half_size_px: tuple[float, float]) -> Box | None:
    """A box of ``2 * half_size_px`` around the include clicks (None without one)."""
    positive = [p for p in prompt.points if p.positive]
    if not positive:
        return None
    rows, cols = [p.row for p in positive], [p.col for p in positive]
    return Box(
        float(max(0.0, min(rows) - half_size_px[0])), float(max(0.0, min(cols) - half_size_px[1])),
        float(min(shape[0] - 1.0, max(rows) + half_size_px[0])), float(min(shape[1] - 1.0, max(cols) + half_size_px[1])),
    )


def updated_box(box: Box, prompt: SlicePrompt, shape: tuple[int, int]) -> Box:
    """``box`` grown to take in each include click and cut back to leave out each exclude click.

    An exclude click inside the box moves the box side nearest to it just past the click.
    """
    r0, c0, r1, c1 = box.row0, box.col0, box.row1, box.col1
    for p in prompt.points:
        if p.positive:
            r0, c0, r1, c1 = min(r0, p.row), min(c0, p.col), max(r1, p.row), max(c1, p.col)
    for p in prompt.points:
        if not p.positive and r0 <= p.row <= r1 and c0 <= p.col <= c1:
            gaps = {"r0": p.row - r0, "r1": r1 - p.row, "c0": p.col - c0, "c1": c1 - p.col}
            side = min(gaps, key=gaps.get)
            if side == "r0":
                r0 = p.row + 1
            elif side == "r1":
                r1 = p.row - 1
            elif side == "c0":
                c0 = p.col + 1
            else:
                c1 = p.col - 1
    r0, r1 = sorted((float(np.clip(r0, 0, shape[0] - 1)), float(np.clip(r1, 0, shape[0] - 1))))
    c0, c1 = sorted((float(np.clip(c0, 0, shape[1] - 1)), float(np.clip(c1, 0, shape[1] - 1))))
    return Box(r0, c0, r1, c1)


def as_box_prompt(prompt: SlicePrompt, box: Box | None, keep_points: bool) -> SlicePrompt:
    """``prompt`` with ``box`` in place of its mask (and of its clicks unless ``keep_points``)."""
    if box is None:
        return prompt
    return replace(prompt, box=box, mask=None, points=prompt.points if keep_points else ())
