"""Sliding-window propagation with any 2D promptable model (Slide-SAM style).

A :class:`SlicePredictor` segments one slice of one volume from a prompt. A
:class:`SlicewiseSession` carries an object from slice to slice: the mask found on slice k is
projected into the prompt for slice k +/- 1 (a box with a margin, the previous mask / logits,
interior and exterior points, or one point), the predictor answers, and the session's stop rule
decides when the object has ended. Runs between two anchors meet in the middle (see
:mod:`anchors`); the base :class:`~SAM3DSegmentLib.engines.session.Session` assembles the 3D mask.

The default projection is "box" (provisional: the final default is to be chosen by measurement
with the evaluation's oracle clicks).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Literal, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage

from ..data.prompts import Box, Point, SlicePrompt
from ..data.volume import Volume, get_slice
from ..errors import InputError
from .anchors import Run
from .click_edits import (
    CARRY_MM,
    CARRY_TOLERANCE,
    NEIGHBOUR_MAX_GAP,
    added_around_clicks,
    carried_exclusions,
    carried_inclusions,
    cut_excluded,
    neighbour_box,
    within_region,
)
from .postprocess import ComponentChoice, fill_holes_2d, keep_component
from .session import (
    CancelCheck,
    IntensityRange,
    ProgressCallback,
    PropagationOptions,
    PropagationResult,
    RunsOutput,
    Session,
    SliceMask,
    StopRule,
    StopTracker,
)

log = logging.getLogger(__name__)

Projection = Literal["box", "mask", "box+mask", "points", "points+mask", "point"]
PROJECTIONS: tuple[str, ...] = ("box", "mask", "box+mask", "points", "points+mask", "point")
ExcludeClicks = Literal["model", "cut"]
EmptySliceClicks = Literal["as_given", "neighbour_box"]
EMPTY_MASK_ENDS = StopRule(min_area=1, min_score=None, min_stability=None, min_overlap=None, min_likeness=None,
                           patience=1)
"""The stop rule between two anchors that hold the object: only an empty mask ends a run."""
TIGHT_BOX_MARGIN_PX = 1.0
"""The margin of ``tight_box``'s second box, in pixels."""
TIGHT_BOX_PREFERENCE = 0.02
"""The score by which the margined box must beat the tight one to be kept (``tight_box``)."""


@runtime_checkable
class SlicePredictor(Protocol):
    """A 2D promptable model on the slices of one volume along one axis.

    ``predict`` returns the mask for ``prompt`` on slice ``index``. When ``prompt.mask`` is set
    the predictor uses it as a dense mask input; if ``previous`` is given and
    ``prompt.mask is previous.mask``, it may use its own private data in ``previous.extra``
    (e.g. SAM's low-resolution logits) instead. ``previous`` is the neighbouring slice's result
    and is passed in every projection mode. ``slices_encoded`` counts image-encoder runs.
    """

    slices_encoded: int

    def predict(self, index: int, prompt: SlicePrompt, previous: SliceMask | None = None) -> SliceMask:
        ...


@dataclass(frozen=True)
class SlicewiseOptions:
    """How one slice's mask becomes the next slice's prompt, and optional clean-up.

    - ``projection``: "box" (bounding box grown by the margin), "mask" (the previous mask /
      low-res logits), "box+mask", "points" (``n_positive`` interior points by distance
      transform and ``n_negative`` points ``negative_distance`` px outside the mask),
      "points+mask", or "point" (the single deepest interior point).
    - ``box_margin_pixels`` / ``box_margin_fraction``: each side of the box grows by
      pixels + fraction x the box's extent along that side's axis.
    - ``fill_holes``: fill holes in every predicted slice (before the stop rule sees it).
    - ``keep_component``: after propagation keep the 3D component touching the anchor slices'
      masks ("prompted"), the largest ("largest"), or everything ("none").
    - ``exclude_clicks``: "model" (the predictor alone answers an exclude click) or "cut" (the
      part of the slice's mask around the click is then removed, :func:`click_edits.cut_excluded`).
    - ``empty_slice_clicks``: "as_given", or "neighbour_box" (include clicks on an empty slice next
      to the object become the neighbour's box moved to the clicks, :func:`click_edits.neighbour_box`,
      cut to the box of the region grown from the clicks where the predictor grows one).
    - ``tight_box``: with a box projection, also decode the previous mask's box grown by
      :data:`TIGHT_BOX_MARGIN_PX` only, and keep that mask unless the margined box's score is
      higher by :data:`TIGHT_BOX_PREFERENCE` (a box-trained model fills a loose box with the
      tissue next to the object; measured in docs/litemedsam.md). One more decoder run per slice.
      Not between two anchors that hold the object: it may grow on the way.
    - ``carry_include_clicks``: an include click on a part the model left out also adds the
      region grown around it on the slices propagated within :data:`click_edits.CARRY_MM` of it,
      where their masks miss it too (:func:`click_edits.carried_inclusions`; for predictors that
      grow regions).
    """

    projection: Projection = "box"
    box_margin_pixels: float = 3.0
    box_margin_fraction: float = 0.05
    n_positive: int = 3
    n_negative: int = 2
    negative_distance: float = 5.0
    fill_holes: bool = False
    keep_component: ComponentChoice = "none"
    exclude_clicks: ExcludeClicks = "model"
    empty_slice_clicks: EmptySliceClicks = "as_given"
    tight_box: bool = False
    carry_include_clicks: bool = False

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise InputError(f"Projection must be one of {', '.join(PROJECTIONS)}; got {self.projection!r}.")
        if self.box_margin_pixels < 0 or self.box_margin_fraction < 0:
            raise InputError("Box margins must be zero or positive.")
        if self.n_positive < 1 or self.n_negative < 0:
            raise InputError("Points projection needs n_positive >= 1 and n_negative >= 0.")
        if self.negative_distance < 1:
            raise InputError("negative_distance must be at least 1 pixel.")
        if self.keep_component not in ("none", "prompted", "largest"):
            raise InputError(
                f"keep_component must be 'none', 'prompted' or 'largest'; got {self.keep_component!r}."
            )
        if self.exclude_clicks not in ("model", "cut"):
            raise InputError(f"exclude_clicks must be 'model' or 'cut'; got {self.exclude_clicks!r}.")
        if self.empty_slice_clicks not in ("as_given", "neighbour_box"):
            raise InputError(f"empty_slice_clicks must be 'as_given' or 'neighbour_box'; got {self.empty_slice_clicks!r}.")


# --- projection of a mask into the next slice's prompt ------------------------------------------

def mask_box(mask: np.ndarray, margin_pixels: float = 0.0, margin_fraction: float = 0.0) -> Box | None:
    """The mask's bounding box grown by the margins and clipped to the slice (None if empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    n_rows, n_cols = mask.shape
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    grow_r = margin_pixels + margin_fraction * (r1 - r0 + 1)
    grow_c = margin_pixels + margin_fraction * (c1 - c0 + 1)
    r0, r1 = max(0.0, r0 - grow_r), min(n_rows - 1.0, r1 + grow_r)
    c0, c1 = max(0.0, c0 - grow_c), min(n_cols - 1.0, c1 + grow_c)
    r0, r1 = _at_least_one_pixel(r0, r1, n_rows)
    c0, c1 = _at_least_one_pixel(c0, c1, n_cols)
    return Box(float(round(r0)), float(round(c0)), float(round(r1)), float(round(c1)))


def _at_least_one_pixel(low: float, high: float, size: int) -> tuple[float, float]:
    if high - low >= 1 or size < 2:
        return low, high
    return (low, low + 1) if low + 1 <= size - 1 else (high - 1, high)


def interior_points(mask: np.ndarray, count: int) -> list[Point]:
    """Up to ``count`` positive points deep inside the mask, spread apart.

    The first is the pixel farthest from the background (distance transform); each further
    point is the deepest pixel outside the discs already covered by the chosen points.
    """
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    rows, cols = np.indices(mask.shape)
    points: list[Point] = []
    for _ in range(count):
        flat = int(np.argmax(depth))
        r, c = divmod(flat, mask.shape[1])
        radius = depth[r, c]
        if radius <= 0:
            break
        points.append(Point(float(r), float(c), True))
        depth = np.where((rows - r) ** 2 + (cols - c) ** 2 <= radius**2, 0.0, depth)
    return points


def exterior_points(mask: np.ndarray, count: int, distance: float) -> list[Point]:
    """Up to ``count`` negative points about ``distance`` px outside the mask, at evenly spaced
    angles around its centroid (none if the ring lies outside the slice)."""
    if count <= 0 or not mask.any():
        return []
    outside = ndimage.distance_transform_edt(~mask)
    ring_r, ring_c = np.nonzero((outside >= distance) & (outside < distance + 1.5))
    if ring_r.size == 0:
        return []
    centre_r, centre_c = np.argwhere(mask).mean(axis=0)
    angles = np.arctan2(ring_r - centre_r, ring_c - centre_c)
    points: list[Point] = []
    for t in range(count):
        target = -math.pi + 2 * math.pi * t / count
        gap = np.abs(np.angle(np.exp(1j * (angles - target))))
        best = int(np.argmin(gap))
        point = Point(float(ring_r[best]), float(ring_c[best]), False)
        if point not in points:
            points.append(point)
    return points


def project_prompt(mask: np.ndarray, axis: int, index: int, options: SlicewiseOptions) -> SlicePrompt:
    """The prompt for slice ``index`` made from the neighbouring slice's ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    mode = options.projection
    box = mask_box(mask, options.box_margin_pixels, options.box_margin_fraction) if "box" in mode else None
    points: tuple[Point, ...] = ()
    if mode == "point":
        points = tuple(interior_points(mask, 1))
    elif mode.startswith("points"):
        points = tuple(interior_points(mask, options.n_positive))
        points += tuple(exterior_points(mask, options.n_negative, options.negative_distance))
    with_mask = mode in ("mask", "box+mask", "points+mask")
    return SlicePrompt(axis=axis, index=index, points=points, box=box, mask=mask if with_mask else None)


# --- the session -----------------------------------------------------------------------------

class SlicewiseSession(Session):
    """A :class:`Session` that propagates slice by slice with a :class:`SlicePredictor`."""

    engine_name = "slicewise"

    def __init__(
        self,
        volume: Volume,
        axis: int,
        predictor: SlicePredictor,
        options: SlicewiseOptions = SlicewiseOptions(),
    ):
        super().__init__(volume, axis)
        self.predictor = predictor
        self.options = options
        self._carry_tolerance: float | None = None
        name = getattr(predictor, "name", None)
        if name:
            self.engine_name = f"slicewise:{name}"

    @property
    def slices_encoded_total(self) -> int:
        return int(self.predictor.slices_encoded)

    def _predict_anchor(self, object_id: int, prompt: SlicePrompt) -> SliceMask:
        given = prompt
        if self.options.empty_slice_clicks == "neighbour_box":
            state = self._objects.get(object_id)
            box = neighbour_box(prompt, state.mask if state else None, self.axis, NEIGHBOUR_MAX_GAP)
            if box is not None:
                region_box = getattr(self.predictor, "region_box", None)  # SAM-family predictors
                if region_box is not None:
                    box = within_region(box, region_box(prompt.index, prompt), prompt)
                given = replace(prompt, box=box, points=())
        result = self._cleaned(self.predictor.predict(prompt.index, given, previous=None))
        if self.options.exclude_clicks == "cut" and any(not p.positive for p in prompt.points):
            image = get_slice(self.volume.array, self.axis, prompt.index)
            result = SliceMask(cut_excluded(result.mask, image, prompt), result.score, result.stability, result.extra)
        return result

    def _propagate_runs(
        self,
        object_id: int,
        runs: list[Run],
        options: PropagationOptions,
        tick: Callable[[int], None],
    ) -> RunsOutput:
        masks: dict[int, SliceMask] = {}
        reasons: dict[str, str] = {}
        for run in runs:
            key = f"{run.start}{run.step:+d}"
            source = self.anchor_result(object_id, run.start)
            if not source.mask.any():
                reasons[key] = f"anchor slice {run.start} has an empty mask; nothing to propagate"
                continue
            between = self._between_filled_anchors(object_id, run)
            rule = EMPTY_MASK_ENDS if between else options.stop
            tracker = StopTracker(rule)
            tissue = None
            if rule.uses_intensity:
                tissue = IntensityRange.of(get_slice(self.volume.array, self.axis, run.start), source.mask)
            for index in run.slices:
                tick(index)
                result = self._next_slice(index, source, tight_box=self.options.tight_box and not between)
                if self.options.exclude_clicks == "cut":
                    result = self._with_carried_exclusions(object_id, index, result)
                if self.options.carry_include_clicks:
                    result = self._with_carried_inclusions(object_id, index, result)
                likeness = shift = None
                if tissue is not None:
                    image = get_slice(self.volume.array, self.axis, index)
                    likeness = tissue.likeness(image, result.mask)
                    shift = None if rule.max_shift is None else tissue.shift(image, result.mask)
                reason = rule.absent_reason(result.mask, result.score, result.stability, source.mask, likeness, shift)
                if reason is None:
                    masks[index] = result
                    source = result
                else:
                    log.debug("slice %d: object absent (%s)", index, reason)
                    masks[index] = SliceMask(np.zeros_like(result.mask, dtype=bool))
                if tracker.update(index, reason):
                    reasons[key] = tracker.reason or reason
                    break
        return RunsOutput(masks, reasons)

    def _next_slice(self, index: int, source: SliceMask, tight_box: bool) -> SliceMask:
        """The predictor's mask on slice ``index`` prompted from ``source``, the previous slice's."""
        prompt = project_prompt(source.mask, self.axis, index, self.options)
        result = self._cleaned(self.predictor.predict(index, prompt, previous=source))
        if not (tight_box and prompt.box is not None):
            return result
        tight = replace(prompt, box=mask_box(source.mask, TIGHT_BOX_MARGIN_PX))
        other = self._cleaned(self.predictor.predict(index, tight, previous=source))
        return other if other.score > result.score - TIGHT_BOX_PREFERENCE else result

    def _with_carried_exclusions(self, object_id: int, index: int, result: SliceMask) -> SliceMask:
        """``result`` cut by the exclude clicks of nearby anchors that carry onto this slice."""
        if not result.mask.any():
            return result
        carried = carried_exclusions(self._object(object_id).anchors, index, *self._carry_terms(), result.mask)
        if carried is None:
            return result
        image = get_slice(self.volume.array, self.axis, index)
        return SliceMask(cut_excluded(result.mask, image, carried), result.score, result.stability, result.extra)

    def _with_carried_inclusions(self, object_id: int, index: int, result: SliceMask) -> SliceMask:
        """``result`` with the region grown around the include clicks of nearby anchors that
        carry onto this slice (predictors that grow regions: the SAM family)."""
        click_region = getattr(self.predictor, "click_region", None)
        if click_region is None or not result.mask.any():
            return result
        carried = carried_inclusions(self._object(object_id).anchors, index, *self._carry_terms(), result.mask)
        if carried is None:
            return result
        region = click_region(index, replace(carried, mask=result.mask))
        return SliceMask(added_around_clicks(result.mask, region, carried), result.score, result.stability, result.extra)

    def _carry_terms(self) -> tuple:
        """(slice getter, reach in slices, intensity tolerance) for carrying clicks to nearby slices."""
        if self._carry_tolerance is None:
            sample = self.volume.array[:: max(1, self.volume.shape[0] // 16)]
            low, high = np.percentile(sample, (1, 99))
            self._carry_tolerance = CARRY_TOLERANCE * float(high - low)
        reach = max(1, int(round(CARRY_MM / float(self.volume.spacing_kji[self.axis]))))
        return (lambda k: get_slice(self.volume.array, self.axis, k)), reach, self._carry_tolerance

    def _between_filled_anchors(self, object_id: int, run: Run) -> bool:
        """Whether ``run`` goes toward another anchor that holds the object. The object is then
        there on every slice between them, and may grow on the way: only an empty mask ends such
        a run (a click on a slice the object barely touches must not leave a gap), and it gets no
        ``tight_box``. Toward an anchor the user left empty the object ends on the way."""
        return run.toward is not None and bool(self.anchor_result(object_id, run.toward).mask.any())

    def propagate(
        self,
        object_id: int,
        options: PropagationOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> PropagationResult:
        """As :meth:`Session.propagate`, then keep the chosen 3D component if the options ask."""
        result = super().propagate(object_id, options, progress, cancel)
        if self.options.keep_component == "none":
            return result
        state = self._object(object_id)
        seeds = np.zeros(self.volume.shape, dtype=bool)
        for index, anchor in state.anchor_results.items():
            get_slice(seeds, self.axis, index)[...] = anchor.mask
        kept = keep_component(result.mask, self.options.keep_component, seeds)
        for index, anchor in state.anchor_results.items():  # anchors stay exactly as given
            get_slice(kept, self.axis, index)[...] = anchor.mask
        other = tuple(a for a in range(3) if a != self.axis)
        present = set(np.flatnonzero(kept.any(axis=other)).tolist())
        scores = {i: s for i, s in result.scores.items() if i in present}
        state.mask, state.scores = kept, scores
        result.mask, result.scores = kept, scores
        return result

    def close(self) -> None:
        super().close()
        release = getattr(self.predictor, "close", None)
        if callable(release):
            release()

    def _cleaned(self, result: SliceMask) -> SliceMask:
        mask = np.asarray(result.mask, dtype=bool)
        if self.options.fill_holes and mask.any():
            mask = fill_holes_2d(mask)
        if mask is result.mask:
            return result
        return SliceMask(mask, result.score, result.stability, result.extra)
