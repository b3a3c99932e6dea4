"""The session interface every engine follows, and the bookkeeping they share.

An engine opens a :class:`Session` on one volume. A session holds, per object (segment), the
anchor prompts and the current 3D mask. ``add_prompt`` returns a fast 2D preview of the
prompted slice; ``propagate`` computes only the runs that the changed anchors affect (see
:mod:`anchors`), reports progress per slice, honours a cancel flag between slices, and leaves
the object's mask unchanged when cancelled or failed. Clicks of one sign that correct a
propagated result change it one way only (:attr:`Session.clicks_change_one_way`).

An engine subclass implements two methods:

- ``_predict_anchor(object_id, prompt) -> SliceMask``: the 2D result of an anchor's prompt;
- ``_propagate_runs(object_id, runs, options, tick) -> RunsOutput``: masks for the slices of
  the runs, calling ``tick(index)`` before computing each slice (progress and cancel).
"""

from __future__ import annotations

import logging
import numbers
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from ..data.prompts import SlicePrompt
from ..data.volume import Volume, get_slice
from ..errors import InputError, PromptError, PropagationCancelled
from .anchors import Direction, Run, plan_runs

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, int], None]
"""Called as ``progress(done, total, slice_index)``; ``total`` is an upper bound."""
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class StopRule:
    """When a run stops: after ``patience`` consecutive slices where the object is judged absent.

    A slice counts as absent when its mask has fewer than ``min_area`` pixels, or its score
    (the engine's own confidence: SAM's predicted IoU, SAM 2's object-score probability) is
    below ``min_score``, or its stability score is below ``min_stability``, or its overlap
    (Dice) with the previous slice's mask is below ``min_overlap``, or its likeness (the
    fraction of its pixels whose intensity lies in the range of the run's anchor mask) is below
    ``min_likeness``, or its median intensity lies more than ``max_shift`` interquartile ranges
    of the anchor mask's intensities from the anchor's median (a mask that slid onto a
    neighbouring tissue whose intensities still fall in the anchor's range). None disables a
    test. Absent slices are left empty in the result.

    Defaults from the sweep with LiteMedSAM on the 20 shared targets (docs/litemedsam.md):
    stability and overlap did not separate present from absent slices; the likeness did. The
    median's shift (off by default) stops some runs the likeness lets through and ends others a
    slice or two early at an object's tapering end: mixed on those targets (docs/litemedsam.md).
    """

    min_area: int = 10
    min_score: float | None = 0.6
    min_stability: float | None = None
    min_overlap: float | None = None
    min_likeness: float | None = 0.7
    max_shift: float | None = None
    patience: int = 1

    def __post_init__(self) -> None:
        for name, low in (("min_area", 0), ("patience", 1)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise InputError(f"Stop rule: {name} must be a whole number >= {low}; got {value!r}.")
        for name in ("min_score", "min_stability", "min_overlap", "min_likeness"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, numbers.Real) and 0 <= value <= 1):
                raise InputError(f"Stop rule: {name} must be None (off) or a number from 0 to 1; got {value!r}.")
        shift = self.max_shift
        if shift is not None and not (isinstance(shift, numbers.Real) and shift > 0):
            raise InputError(f"Stop rule: max_shift must be None (off) or a number above 0; got {shift!r}.")

    def absent_reason(
        self,
        mask: np.ndarray,
        score: float | None = None,
        stability: float | None = None,
        previous: np.ndarray | None = None,
        likeness: float | None = None,
        shift: float | None = None,
    ) -> str | None:
        """Why the object is judged absent on this slice, or None if it is present."""
        area = int(np.count_nonzero(mask))
        if area < self.min_area:
            return f"area {area} px < {self.min_area}"
        if self.min_score is not None and score is not None and score < self.min_score:
            return f"score {score:.2f} < {self.min_score}"
        if self.min_stability is not None and stability is not None and stability < self.min_stability:
            return f"stability {stability:.2f} < {self.min_stability}"
        if self.min_overlap is not None and previous is not None and previous.any():
            overlap = 2.0 * np.count_nonzero(mask & previous) / (area + np.count_nonzero(previous))
            if overlap < self.min_overlap:
                return f"overlap with previous slice {overlap:.2f} < {self.min_overlap}"
        if self.min_likeness is not None and likeness is not None and likeness < self.min_likeness:
            return f"likeness {likeness:.2f} < {self.min_likeness}"
        if self.max_shift is not None and shift is not None and abs(shift) > self.max_shift:
            return f"median intensity {shift:+.1f} interquartile ranges from the anchor's (limit {self.max_shift})"
        return None

    @property
    def uses_intensity(self) -> bool:
        """Whether a test needs the anchor mask's intensities (:class:`IntensityRange`)."""
        return self.min_likeness is not None or self.max_shift is not None


@dataclass(frozen=True)
class IntensityRange:
    """The intensities of an object on its anchor slice, to judge whether a later mask still
    covers the same tissue (the stop rule's likeness and shift)."""

    low: float
    high: float
    median: float = 0.0
    spread: float = 1.0
    """The interquartile range (at least 1e-6)."""

    @classmethod
    def of(cls, image: np.ndarray, mask: np.ndarray, widen: float = 0.1) -> "IntensityRange | None":
        """The 2.5-97.5 percentile range of ``image`` under ``mask``, widened by ``widen`` of its
        width, with the median and interquartile range."""
        values = np.asarray(image)[np.asarray(mask, dtype=bool)]
        if values.size == 0:
            return None
        low, q1, median, q3, high = np.percentile(values.astype(np.float64), [2.5, 25, 50, 75, 97.5])
        margin = widen * max(high - low, 1e-6)
        return cls(float(low - margin), float(high + margin), float(median), float(max(q3 - q1, 1e-6)))

    def likeness(self, image: np.ndarray, mask: np.ndarray) -> float | None:
        """The fraction of the mask's pixels whose intensity lies in the range (None for an empty mask)."""
        values = np.asarray(image)[np.asarray(mask, dtype=bool)]
        if values.size == 0:
            return None
        return float(np.count_nonzero((values >= self.low) & (values <= self.high)) / values.size)

    def shift(self, image: np.ndarray, mask: np.ndarray) -> float | None:
        """How far the mask's median intensity lies from the anchor's, in interquartile ranges
        (None for an empty mask)."""
        values = np.asarray(image)[np.asarray(mask, dtype=bool)]
        if values.size == 0:
            return None
        return float((np.median(values) - self.median) / self.spread)


class StopTracker:
    """Counts consecutive absent slices of one run against the rule's patience."""

    def __init__(self, rule: StopRule):
        self.rule = rule
        self.absent_in_a_row = 0
        self.reason: str | None = None

    def update(self, index: int, reason: str | None) -> bool:
        """Record slice ``index``; True when the run must stop."""
        if reason is None:
            self.absent_in_a_row = 0
            return False
        self.absent_in_a_row += 1
        if self.absent_in_a_row >= max(1, self.rule.patience):
            self.reason = f"stopped at slice {index}: {reason} for {self.absent_in_a_row} slice(s)"
            return True
        return False


@dataclass(frozen=True)
class PropagationOptions:
    """Direction of the outer runs, inclusive slice range, and the stop rule."""

    direction: Direction = "both"
    slice_range: tuple[int, int] | None = None
    stop: StopRule = field(default_factory=StopRule)


@dataclass
class SliceMask:
    """One slice's result: boolean mask, the engine's confidence, and engine-private data."""

    mask: np.ndarray
    score: float | None = None
    stability: float | None = None
    extra: Any = field(default=None, repr=False)


@dataclass
class Preview:
    """The 2D result on a prompted slice."""

    axis: int
    index: int
    mask: np.ndarray
    score: float | None
    seconds: float


@dataclass
class RunsOutput:
    """What an engine returns for a set of runs."""

    masks: dict[int, SliceMask]
    stop_reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class PropagationResult:
    """The object's 3D mask after a propagation, with what it cost.

    ``scores`` holds the engine's confidence per slice that has a result; ``slices_computed``
    lists the slices recomputed by this call; ``slices_encoded`` counts image-encoder runs this
    call needed (cached slices cost nothing).
    """

    object_id: int
    axis: int
    mask: np.ndarray
    scores: dict[int, float]
    slices_computed: list[int]
    slices_encoded: int
    stop_reasons: dict[str, str]
    seconds: float
    engine: str

    @property
    def slices_with_object(self) -> list[int]:
        other = tuple(a for a in range(3) if a != self.axis)
        return [int(i) for i in np.flatnonzero(self.mask.any(axis=other))]


@dataclass
class _ObjectState:
    anchors: dict[int, SlicePrompt] = field(default_factory=dict)
    anchor_results: dict[int, SliceMask] = field(default_factory=dict)
    mask: np.ndarray | None = None
    scores: dict[int, float] = field(default_factory=dict)
    changed: set[int] = field(default_factory=set)
    last_options: PropagationOptions | None = None
    edit: str | None = None
    """What was added since the last propagation: None (nothing), "include" or "exclude" (clicks
    of that sign alone on a filled volume), or "other"."""


class Session(ABC):
    """One volume, prompts along one axis, any number of objects."""

    engine_name = "engine"
    refines_propagated_slices = True
    clicks_change_one_way = True
    """Clicks of one sign that refine a propagated result move it their way only: include clicks
    add, exclude clicks remove, and only where the change reaches the clicked slices (3D
    connected); the rest of the volume stays as it was (CVPR 2025 protocol, docs/results.md).
    Not for engines that start over from include clicks (``refines_propagated_slices`` False)."""

    def __init__(self, volume: Volume, axis: int = 0):
        if axis not in (0, 1, 2):
            raise PromptError(f"Propagation axis must be 0, 1 or 2 (array axes k, j, i); got {axis}.")
        self.volume = volume
        self.axis = axis
        self._objects: dict[int, _ObjectState] = {}

    # --- what engines implement -------------------------------------------------------------

    @abstractmethod
    def _predict_anchor(self, object_id: int, prompt: SlicePrompt) -> SliceMask:
        """The 2D result of one anchor's prompt (decoder only when the slice is encoded)."""

    @abstractmethod
    def _propagate_runs(
        self,
        object_id: int,
        runs: list[Run],
        options: PropagationOptions,
        tick: Callable[[int], None],
    ) -> RunsOutput:
        """Masks for the slices of ``runs``; call ``tick(index)`` before each slice."""

    @property
    @abstractmethod
    def slices_encoded_total(self) -> int:
        """Image-encoder runs so far in this session."""

    # --- the shared interface -----------------------------------------------------------------

    @property
    def object_ids(self) -> list[int]:
        return sorted(self._objects)

    def anchors(self, object_id: int) -> dict[int, SlicePrompt]:
        return dict(self._object(object_id).anchors)

    def anchor_result(self, object_id: int, index: int) -> SliceMask:
        return self._object(object_id).anchor_results[index]

    def mask(self, object_id: int) -> np.ndarray | None:
        """The object's current 3D mask (None before the first propagation)."""
        return self._object(object_id).mask

    def add_prompt(self, object_id: int, prompt: SlicePrompt, replace_existing: bool = False) -> Preview:
        """Add clicks / a box / a mask on one slice (merged with earlier input on that slice
        unless ``replace_existing``) and return the 2D preview of that slice.

        On a slice that propagation already filled, the slice's current mask goes with the new
        clicks, so an include or exclude click corrects that result instead of starting over
        (engines with ``refines_propagated_slices = False`` start over from include clicks).
        """
        if prompt.axis != self.axis:
            raise PromptError(
                f"This session propagates along axis {self.axis}; the prompt is on axis {prompt.axis}. "
                "Open a session on the prompt's axis."
            )
        created = object_id not in self._objects
        state = self._objects.setdefault(object_id, _ObjectState())
        try:
            return self._add_to(object_id, state, prompt, replace_existing)
        except BaseException:
            if created:  # a refused first prompt leaves no empty object behind
                del self._objects[object_id]
            raise

    def _add_to(self, object_id: int, state: "_ObjectState", prompt: SlicePrompt, replace_existing: bool) -> Preview:
        previous = state.anchors.get(prompt.index)
        refine = self.refines_propagated_slices or not prompt.has_positive_input
        edit = self._edit_kind(state, prompt, replace_existing)
        current = None if state.mask is None else get_slice(state.mask, self.axis, prompt.index)
        if refine and previous is None and prompt.mask is None and current is not None and current.any():
            # clicks on a propagated slice refine its result, as in SAM's demos
            prompt = replace(prompt, mask=current.copy())
        combined = prompt if previous is None or replace_existing else previous.merged(prompt)
        combined.validate(self.volume.shape)
        started = time.perf_counter()
        if combined.is_mask_only:
            result = SliceMask(mask=np.asarray(combined.mask, dtype=bool).copy(), score=1.0)
        else:
            result = self._predict_anchor(object_id, combined)
        if edit == "include":
            result = replace(result, mask=result.mask | current)
        elif edit == "exclude":
            result = replace(result, mask=result.mask & current)
        state.edit = edit if state.edit in (None, edit) else "other"
        state.anchors[prompt.index] = combined
        state.anchor_results[prompt.index] = result
        state.changed.add(prompt.index)
        return Preview(self.axis, prompt.index, result.mask, result.score, time.perf_counter() - started)

    def _edit_kind(self, state: "_ObjectState", prompt: SlicePrompt, replace_existing: bool) -> str:
        """"include" / "exclude" for clicks of that sign alone that refine a filled volume (when
        :attr:`clicks_change_one_way`), else "other"."""
        one_way = self.clicks_change_one_way and self.refines_propagated_slices
        if not one_way or state.mask is None or replace_existing:
            return "other"
        if prompt.box is not None or prompt.mask is not None or not prompt.points:
            return "other"
        signs = {p.positive for p in prompt.points}
        return "other" if len(signs) > 1 else ("include" if signs.pop() else "exclude")

    def set_slice_mask(self, object_id: int, index: int, mask: np.ndarray) -> Preview:
        """Make an edited slice an anchor whose result is exactly ``mask``."""
        prompt = SlicePrompt(axis=self.axis, index=index, mask=np.asarray(mask, dtype=bool))
        return self.add_prompt(object_id, prompt, replace_existing=True)

    def remove_anchor(self, object_id: int, index: int) -> None:
        """Forget the prompt on slice ``index``; its neighbours' runs are recomputed next time."""
        state = self._object(object_id)
        if index not in state.anchors:
            return
        ordered = sorted(state.anchors)
        position = ordered.index(index)
        del state.anchors[index]
        del state.anchor_results[index]
        state.changed.discard(index)
        neighbours = ordered[max(0, position - 1): position] + ordered[position + 1: position + 2]
        state.changed.update(neighbours)
        state.edit = "other"
        if not state.anchors:
            del self._objects[object_id]

    def remove_object(self, object_id: int) -> None:
        self._objects.pop(object_id, None)

    def propagate(
        self,
        object_id: int,
        options: PropagationOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> PropagationResult:
        """Fill the volume from the anchors; recompute only what changed since last time."""
        options = options or PropagationOptions()
        state = self._object(object_id)
        started = time.perf_counter()
        encoded_before = self.slices_encoded_total
        n_slices = self.volume.n_slices(self.axis)
        first_time = state.mask is None or state.last_options != options
        runs = plan_runs(
            state.anchors, n_slices, options.direction, options.slice_range,
            changed=None if first_time else state.changed,
        )
        total = sum(len(r.slices) for r in runs)
        done = 0

        def tick(index: int) -> None:
            nonlocal done
            if cancel is not None and cancel():
                raise PropagationCancelled("Propagation cancelled; the segmentation was not changed.")
            if progress is not None:
                progress(done, total, index)
            done += 1

        output = self._propagate_runs(object_id, runs, options, tick)
        if progress is not None:
            progress(total, total, -1)

        mask = np.zeros(self.volume.shape, dtype=bool) if first_time else state.mask.copy()
        scores = {} if first_time else dict(state.scores)
        for run in runs:  # a rerun replaces its whole span, also beyond where it stopped
            for index in run.slices:
                get_slice(mask, self.axis, index)[...] = False
                scores.pop(index, None)
        for index, result in output.masks.items():
            get_slice(mask, self.axis, index)[...] = result.mask
            if result.score is not None:
                scores[index] = float(result.score)
        for index, result in state.anchor_results.items():
            get_slice(mask, self.axis, index)[...] = result.mask
            if result.score is not None:
                scores[index] = float(result.score)

        if not first_time and state.edit in ("include", "exclude"):
            mask = self._one_way(state.mask, mask, state.edit == "include", sorted(state.changed))
        state.mask, state.scores = mask, scores
        state.changed.clear()
        state.last_options = options
        state.edit = None
        return PropagationResult(
            object_id=object_id,
            axis=self.axis,
            mask=mask,
            scores=scores,
            slices_computed=sorted(output.masks),
            slices_encoded=self.slices_encoded_total - encoded_before,
            stop_reasons=output.stop_reasons,
            seconds=time.perf_counter() - started,
            engine=self.engine_name,
        )

    def _one_way(self, old: np.ndarray, new: np.ndarray, include: bool, clicked: list[int]) -> np.ndarray:
        """``old`` with the additions (``include``) or removals of ``new`` that are 3D connected
        to those on the ``clicked`` slices."""
        change = new & ~old if include else old & ~new
        labels, _ = ndimage.label(change, structure=np.ones((3, 3, 3), dtype=bool))
        picked = np.unique(np.concatenate([get_slice(labels, self.axis, k).ravel() for k in clicked]))
        kept = np.isin(labels, picked[picked > 0])
        return old | kept if include else old & ~kept

    def close(self) -> None:
        """Release features and model state held by the session."""
        self._objects.clear()

    def _object(self, object_id: int) -> _ObjectState:
        try:
            return self._objects[object_id]
        except KeyError:
            raise PromptError(
                f"Object {object_id} has no prompts yet; add a click, a box or a mask first."
            ) from None


def replace_options(options: PropagationOptions, **changes) -> PropagationOptions:
    """A copy of ``options`` with some fields changed (stop-rule fields are accepted too)."""
    stop_fields = {k: changes.pop(k) for k in list(changes) if hasattr(StopRule, k)}
    if stop_fields:
        changes["stop"] = replace(options.stop, **stop_fields)
    return replace(options, **changes)
