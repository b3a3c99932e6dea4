"""The weight-free 2D predictor: a random walker (Grady 2006) seeded from the prompt.

No checkpoint is needed. On one slice, the prompt becomes seeds inside a region of interest (ROI)
around it, and the random walker of :mod:`.random_walk` (skimage's graph and solver, for the
foreground only) gives every other ROI pixel the probability of reaching a foreground seed
first. The mask is where that probability exceeds 0.5.

Seeds (all sizes are in millimetres and converted with the volume's in-plane spacing):

- include click: a small disk (``click_radius_mm``) of foreground; exclude click: a disk of
  background;
- box: everything outside the box is background, a shrunken inner core is foreground;
- mask (an anchor's mask, or the neighbouring slice's mask during propagation): the eroded mask
  is foreground, everything outside a dilated ring is background;
- intensity: "foreground statistics" (robust mean and spread) are measured once at the anchor,
  around the include clicks or in the box core / eroded mask, and carried along the propagation
  in ``SliceMask.extra``. ROI pixels whose (lightly smoothed) intensity is far from them become
  background, and propagated foreground seeds that are far from them are dropped, so the mask
  ends where the object ends;
- the ROI border is background. With clicks only, the ROI reaches ``click_roi_radius_mm``
  (80 mm: a kidney, a large lesion or most spleens fit) from the clicks; with a box or mask it reaches
  ``roi_margin_fraction`` of the object's size (at least ``roi_margin_mm``) beyond it.

The score is ``2 * mean(p) - 1`` over the mask (0 = a coin toss, 1 = certain), multiplied during
propagation by the fraction of the neighbour's eroded mask whose intensity still matches the
object (it falls where the object ends), so the propagation's
:class:`~SAM3DSegmentLib.engines.session.StopRule` (score < 0.5) can stop there; the stability is the
IoU of the masks at p > 0.6 and p > 0.4.

Used as a ``SlicePredictor`` of :mod:`SAM3DSegmentLib.engines.slicewise`, it makes the weight-free
engine: the same propagation logic as SAM's slice-by-slice engine with a different 2D model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..data.intensity import WindowSpec, window_volume
from ..data.prompts import Box, Point, SlicePrompt
from ..data.volume import Volume, get_slice
from .random_walk import BACKGROUND, FOREGROUND, foreground_probability
from .session import SliceMask

log = logging.getLogger(__name__)

SEED_PAD = 2
"""Pixels around the ROI the seeds are computed on (the erosion of the unlike pixels reaches two)."""


def _shifted(prompt: SlicePrompt, row0: int, col0: int) -> SlicePrompt:
    """``prompt``'s clicks and box in a window whose first pixel is (row0, col0) of the slice."""
    points = tuple(Point(p.row - row0, p.col - col0, p.positive) for p in prompt.points)
    box = prompt.box
    if box is not None:
        box = Box(box.row0 - row0, box.col0 - col0, box.row1 - row0, box.col1 - col0)
    return SlicePrompt(prompt.axis, prompt.index, points, box)


@dataclass(frozen=True)
class RandomWalkerOptions:
    """Tuning of the weight-free predictor (distances in mm, see the module docstring)."""

    beta: float = 130.0
    click_radius_mm: float = 2.0
    stats_radius_mm: float = 4.0
    click_roi_radius_mm: float = 80.0
    roi_margin_mm: float = 15.0
    roi_margin_fraction: float = 0.5
    box_core_fraction: float = 0.3
    mask_erosion_fraction: float = 0.3
    mask_ring_mm: float = 5.0
    mask_ring_fraction: float = 0.3
    intensity_sigmas: float = 4.0
    intensity_floor_fraction: float = 0.12
    smoothing_sigma_px: float = 1.0
    fill_holes: bool = True
    click_refinements: int = 1
    alike_full: float = 0.5


@dataclass(frozen=True)
class ForegroundStats:
    """Robust intensity statistics of the object, measured at the anchor."""

    centre: float
    spread: float


@dataclass
class RandomWalkerExtra:
    """What a result passes to the next slice's prediction."""

    stats: ForegroundStats
    probability_roi: tuple[slice, slice] = field(default=(slice(0, 0), slice(0, 0)), repr=False)


class RandomWalkerPredictor:
    """A promptable 2D segmenter on the slices of one volume along one axis (no weights).

    ``window`` maps intensities to 0..255 once per volume (None keeps raw intensities).
    """

    name = "random walker"

    def __init__(
        self,
        volume: Volume,
        axis: int = 0,
        window: WindowSpec | None = WindowSpec(),
        options: RandomWalkerOptions | None = None,
    ):
        self.volume = volume
        self.axis = axis
        self.options = options or RandomWalkerOptions()
        if window is None:
            self.image = np.asarray(volume.array, dtype=np.float32)
        else:
            self.image = window_volume(volume.array, window, volume.modality).astype(np.float32)
        low, high = np.percentile(self.image[:: max(1, self.image.shape[0] // 16)], [1, 99])
        self.intensity_range = float(max(high - low, 1e-6))
        spacing = np.delete(volume.spacing_kji, axis)
        self.pixel_mm = np.asarray(spacing, dtype=float)  # (row, col) spacing in mm
        self.slices_encoded = 0
        self._smoothed: dict[int, np.ndarray] = {}

    # --- the SlicePredictor protocol -----------------------------------------------------------

    def predict(self, index: int, prompt: SlicePrompt, previous: SliceMask | None = None) -> SliceMask:
        """The mask on slice ``index`` for ``prompt``; ``previous`` is the neighbour's result."""
        image = self._slice(index)  # lightly smoothed: the random walker is sensitive to noise
        mask_prompt = prompt.mask
        if mask_prompt is not None and not np.any(mask_prompt):
            mask_prompt = None
        if mask_prompt is None and previous is not None and np.any(previous.mask):
            mask_prompt = previous.mask
        mask_prompt = None if mask_prompt is None else np.asarray(mask_prompt, dtype=bool)

        stats = None
        if previous is not None and isinstance(previous.extra, RandomWalkerExtra):
            stats = previous.extra.stats
        if stats is None:
            stats = self._anchor_stats(image, prompt, mask_prompt)

        empty = SliceMask(np.zeros(image.shape, dtype=bool), 0.0, 0.0, RandomWalkerExtra(stats))
        if mask_prompt is None and prompt.box is None and not any(p.positive for p in prompt.points):
            return empty
        mask, probability, roi, alike = self._segment(image, prompt, mask_prompt, stats)
        clicks_only = mask_prompt is None and prompt.box is None
        for _ in range(self.options.click_refinements if clicks_only else 0):
            if not mask.any():
                break
            # a click seeds only a small disk: segment again with the first result as a mask prompt
            mask, probability, roi, _ = self._segment(image, prompt, mask, stats)
        if not mask.any():
            return empty
        inside = probability[mask[roi]]
        certainty = float(np.clip(2.0 * inside.mean() - 1.0, 0.0, 1.0))
        likeness = min(1.0, alike / self.options.alike_full) if previous is not None else 1.0
        score = certainty * likeness
        high, low = probability > 0.6, probability > 0.4
        stability = float(high.sum() / max(low.sum(), 1))
        return SliceMask(mask, score, stability, RandomWalkerExtra(stats, roi))

    # --- pieces ---------------------------------------------------------------------------------

    def _segment(self, image, prompt, mask_prompt, stats):
        """(mask, ROI probabilities, ROI, alike) of one random walk; ``alike`` is the fraction of
        the eroded mask prompt whose intensity still matches the object (1 without a mask)."""
        roi = self._roi(image.shape, prompt, mask_prompt)
        seeds, alike = self._seeds(image, prompt, mask_prompt, stats, roi)
        mask = np.zeros(image.shape, dtype=bool)
        if not np.any(seeds == FOREGROUND):
            return mask, np.zeros(seeds.shape, dtype=np.float32), roi, alike
        probability = self._random_walk(image[roi], seeds)
        mask[roi] = probability > 0.5
        if self.options.fill_holes:
            mask[roi] = ndimage.binary_fill_holes(mask[roi])
        return mask, probability, roi, alike

    # --- seeds ---------------------------------------------------------------------------------

    def _slice(self, index: int) -> np.ndarray:
        if index not in self._smoothed:
            raw = get_slice(self.image, self.axis, index)
            sigma = self.options.smoothing_sigma_px
            self._smoothed[index] = ndimage.gaussian_filter(raw, sigma) if sigma > 0 else raw.copy()
            self.slices_encoded += 1
        return self._smoothed[index]

    def _px(self, mm: float) -> np.ndarray:
        """A distance in mm as (rows, cols) pixels, at least one pixel."""
        return np.maximum(mm / self.pixel_mm, 1.0)

    def _disk(self, shape, row: float, col: float, radius_mm: float) -> np.ndarray:
        rr, cc = np.ogrid[: shape[0], : shape[1]]
        radius = self._px(radius_mm)
        return ((rr - row) / radius[0]) ** 2 + ((cc - col) / radius[1]) ** 2 <= 1.0

    def _anchor_stats(self, image, prompt: SlicePrompt, mask_prompt) -> ForegroundStats:
        region = np.zeros(image.shape, dtype=bool)
        for p in prompt.points:
            if p.positive:
                region |= self._disk(image.shape, p.row, p.col, self.options.stats_radius_mm)
        if not region.any() and prompt.box is not None:
            region = self._box_core(image.shape, prompt)
        if not region.any() and mask_prompt is not None:
            region = self._eroded(mask_prompt)
        values = image[region] if region.any() else image.ravel()
        centre = float(np.median(values))
        spread = float(1.4826 * np.median(np.abs(values - centre)))
        return ForegroundStats(centre, spread)

    def _box_core(self, shape, prompt: SlicePrompt) -> np.ndarray:
        b = prompt.box.normalised()
        core = np.zeros(shape, dtype=bool)
        half = self.options.box_core_fraction / 2.0
        rc, cc = (b.row0 + b.row1) / 2.0, (b.col0 + b.col1) / 2.0
        hr, hc = max(half * (b.row1 - b.row0), 0.5), max(half * (b.col1 - b.col0), 0.5)
        core[int(round(rc - hr)): int(round(rc + hr)) + 1, int(round(cc - hc)): int(round(cc + hc)) + 1] = True
        return core

    def _eroded(self, mask: np.ndarray) -> np.ndarray:
        """The mask eroded by a fraction of its equivalent radius; its deepest pixels if that empties it."""
        distance = ndimage.distance_transform_edt(mask, sampling=self.pixel_mm)
        radius_mm = np.sqrt(mask.sum() * np.prod(self.pixel_mm) / np.pi)
        core = distance > self.options.mask_erosion_fraction * radius_mm
        if not core.any() and mask.any():
            core = distance >= distance.max()
        return core

    def _roi(self, shape, prompt: SlicePrompt, mask_prompt) -> tuple[slice, slice]:
        rows, cols = [], []
        extent_mm = 0.0
        if prompt.box is not None:
            b = prompt.box.normalised()
            rows += [b.row0, b.row1]
            cols += [b.col0, b.col1]
        if mask_prompt is not None and mask_prompt.any():
            r, c = np.nonzero(mask_prompt)
            rows += [r.min(), r.max()]
            cols += [c.min(), c.max()]
        if rows:
            extent_mm = max((max(rows) - min(rows) + 1) * self.pixel_mm[0], (max(cols) - min(cols) + 1) * self.pixel_mm[1])
            margin = self._px(max(self.options.roi_margin_mm, self.options.roi_margin_fraction * extent_mm))
        else:
            margin = self._px(self.options.click_roi_radius_mm)
        for p in prompt.points:
            if p.positive or not rows:
                rows.append(p.row)
                cols.append(p.col)
        r0 = max(0, int(np.floor(min(rows) - margin[0])))
        r1 = min(shape[0], int(np.ceil(max(rows) + margin[0])) + 1)
        c0 = max(0, int(np.floor(min(cols) - margin[1])))
        c1 = min(shape[1], int(np.ceil(max(cols) + margin[1])) + 1)
        return slice(r0, r1), slice(c0, c1)

    def _seeds(self, image, prompt: SlicePrompt, mask_prompt, stats: ForegroundStats, roi) -> tuple[np.ndarray, float]:
        """The random walk's seeds on ``roi`` and ``alike`` (see :meth:`_segment`).

        They are computed on the ROI grown by :data:`SEED_PAD` pixels, not the whole slice: the
        two-pixel erosion then sees every pixel it would see on the slice, and the ROI holds the
        whole mask prompt, so its distance maps are the slice's (the seeds are the same; a
        512 px slice costs a few ms instead of tens)."""
        o = self.options
        shape = image.shape
        (r0, r1), (c0, c1) = [(max(0, s.start - SEED_PAD), min(n, s.stop + SEED_PAD)) for s, n in zip(roi, shape)]
        image = image[r0:r1, c0:c1]
        if mask_prompt is not None:
            mask_prompt = mask_prompt[r0:r1, c0:c1]
        prompt = _shifted(prompt, r0, c0)
        window = image.shape
        foreground = np.zeros(window, dtype=bool)
        background = np.zeros(window, dtype=bool)
        tolerance = max(o.intensity_sigmas * stats.spread, o.intensity_floor_fraction * self.intensity_range)
        unlike = np.abs(image - stats.centre) > tolerance
        # leave a band of two pixels next to object-like pixels unseeded: edges are blurred,
        # and the random walker places the boundary better than a threshold
        background |= ndimage.binary_erosion(unlike, iterations=2, border_value=1)

        clicked = np.zeros(window, dtype=bool)
        excluded = np.zeros(window, dtype=bool)
        for p in prompt.points:
            disk = self._disk(window, p.row, p.col, o.click_radius_mm)
            if p.positive:
                clicked |= disk
            else:
                excluded |= disk
        if prompt.box is not None:
            b = prompt.box.normalised()
            outside = np.ones(window, dtype=bool)
            outside[max(0, int(np.ceil(b.row0))): int(np.floor(b.row1)) + 1,
                    max(0, int(np.ceil(b.col0))): int(np.floor(b.col1)) + 1] = False
            background |= outside
            foreground |= self._box_core(window, prompt) & ~unlike
        alike = 1.0
        if mask_prompt is not None and mask_prompt.any():
            core = self._eroded(mask_prompt)
            foreground |= core & ~unlike
            alike = float(np.count_nonzero(core & ~unlike) / np.count_nonzero(core))
            radius_mm = np.sqrt(mask_prompt.sum() * np.prod(self.pixel_mm) / np.pi)
            ring_mm = max(o.mask_ring_mm, o.mask_ring_fraction * radius_mm)
            outside_distance = ndimage.distance_transform_edt(~mask_prompt, sampling=self.pixel_mm)
            ring = outside_distance > ring_mm
            for p in prompt.points:  # an include click beyond the mask may grow it there
                if p.positive:
                    ring &= ~self._disk(window, p.row, p.col, ring_mm)
            background |= ring
        # the user's clicks win over every automatic rule
        foreground = (foreground | clicked) & ~excluded
        background = (background | excluded) & ~foreground

        seeds = np.zeros(window, dtype=np.int32)
        seeds[background] = BACKGROUND
        seeds[foreground] = FOREGROUND
        seeds = seeds[roi[0].start - r0: roi[0].stop - r0, roi[1].start - c0: roi[1].stop - c0].copy()
        border = np.ones(seeds.shape, dtype=bool)
        border[1:-1, 1:-1] = False
        on_image_edge = np.zeros(seeds.shape, dtype=bool)  # the image edge is not an object edge
        if roi[0].start == 0:
            on_image_edge[0, :] = True
        if roi[0].stop == shape[0]:
            on_image_edge[-1, :] = True
        if roi[1].start == 0:
            on_image_edge[:, 0] = True
        if roi[1].stop == shape[1]:
            on_image_edge[:, -1] = True
        seeds[border & ~on_image_edge & (seeds == 0)] = BACKGROUND
        return seeds, alike

    def _random_walk(self, image: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Probability of each ROI pixel of belonging to the foreground."""
        data = image if image.std() > 0 else image + np.random.default_rng(0).normal(0, 1e-3, image.shape)
        return foreground_probability(data, seeds, self.options.beta, self.pixel_mm / self.pixel_mm.min(), tol=1e-3)
