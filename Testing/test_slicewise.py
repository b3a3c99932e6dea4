"""Sliding-window propagation logic, driven by a test double that answers from a reference mask."""

import numpy as np
import pytest
from scipy import ndimage

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt
from SAM3DSegmentLib.data.volume import Volume, get_slice
from SAM3DSegmentLib.engines.session import IntensityRange, PropagationOptions, SliceMask, StopRule
from SAM3DSegmentLib.engines.slicewise import (
    PROJECTIONS,
    SlicePredictor,
    SlicewiseOptions,
    SlicewiseSession,
    exterior_points,
    interior_points,
    mask_box,
    project_prompt,
)
from SAM3DSegmentLib.errors import InputError, PromptError, PropagationCancelled


class ReferenceMaskPredictor:
    """A test double (not a model): answers each slice from a reference mask, using the prompt
    the way a promptable model would. It keeps the reference's 2D components that contain a
    positive point, overlap the prompt mask, or lie in the box (clipped to the box), and drops
    components containing a negative point. Records every call."""

    name = "reference-mask"

    def __init__(self, reference: np.ndarray, axis: int = 0, scores: dict[int, float] | None = None):
        self.reference = reference
        self.axis = axis
        self.scores = scores or {}
        self.encoded: set[int] = set()
        self.calls: list[tuple[int, SlicePrompt, int | None]] = []
        self._index_of_result: dict[int, int] = {}

    @property
    def slices_encoded(self) -> int:
        return len(self.encoded)

    def predict(self, index, prompt, previous=None):
        self.encoded.add(index)
        previous_index = None if previous is None else self._index_of_result.get(id(previous))
        self.calls.append((index, prompt, previous_index))
        truth = get_slice(self.reference, self.axis, index)
        labels, _ = ndimage.label(truth)
        keep = np.zeros(truth.shape, bool)
        for p in prompt.points:
            if p.positive and labels[int(p.row), int(p.col)]:
                keep |= labels == labels[int(p.row), int(p.col)]
        if prompt.mask is not None:
            keep |= np.isin(labels, np.unique(labels[prompt.mask & truth])) & truth
        if prompt.box is not None:
            b = prompt.box
            in_box = np.zeros(truth.shape, bool)
            in_box[int(b.row0): int(b.row1) + 1, int(b.col0): int(b.col1) + 1] = True
            keep |= truth & in_box
        for p in prompt.points:
            if not p.positive and labels[int(p.row), int(p.col)]:
                keep &= labels != labels[int(p.row), int(p.col)]
        result = SliceMask(keep, self.scores.get(index, 1.0 if keep.any() else 0.0), 1.0)
        self._index_of_result[id(result)] = index
        return result


def moving_ellipse(n_slices=30, first=5, last=24, shape=(40, 52)):
    """An ellipse (wider than high) drifting diagonally on slices first..last."""
    reference = np.zeros((n_slices,) + shape, bool)
    rows, cols = np.indices(shape)
    for k in range(first, last + 1):
        centre_r, centre_c = 12 + 0.5 * (k - first), 15 + (k - first)
        reference[k] = ((rows - centre_r) / 5) ** 2 + ((cols - centre_c) / 8) ** 2 <= 1
    return Volume(reference.astype(np.float32) * 100), reference


def click_on(reference, index):
    r, c = np.argwhere(reference[index]).mean(axis=0)
    return SlicePrompt(0, index, points=(Point(float(round(r)), float(round(c))),))


STOP = PropagationOptions(stop=StopRule(min_area=1, min_score=0.5, patience=2))


def test_reference_predictor_satisfies_the_protocol():
    assert isinstance(ReferenceMaskPredictor(np.zeros((2, 3, 3), bool)), SlicePredictor)


def test_mask_box_grows_by_margin_and_clips():
    mask = np.zeros((20, 30), bool)
    mask[4:8, 10:20] = True  # rows 4..7, cols 10..19
    assert mask_box(mask) == Box(4, 10, 7, 19)
    assert mask_box(mask, margin_pixels=2) == Box(2, 8, 9, 21)
    assert mask_box(mask, margin_pixels=0, margin_fraction=0.5) == Box(2, 5, 9, 24)
    assert mask_box(mask, margin_pixels=10) == Box(0, 0, 17, 29)
    single = np.zeros((20, 30), bool)
    single[19, 29] = True
    tiny = mask_box(single)
    assert tiny.row1 - tiny.row0 >= 1 and tiny.col1 - tiny.col0 >= 1
    assert mask_box(np.zeros((5, 5), bool)) is None


def test_interior_and_exterior_points_fall_inside_and_outside():
    mask = np.zeros((30, 60), bool)
    mask[5:15, 10:50] = True  # long in cols: a row/col swap would land outside
    inside = interior_points(mask, 3)
    assert len(inside) == 3 and all(mask[int(p.row), int(p.col)] and p.positive for p in inside)
    assert len({(p.row, p.col) for p in inside}) == 3
    assert inside[0].row in (9.0, 10.0)  # deepest row of rows 5..14
    distance_outside = ndimage.distance_transform_edt(~mask)
    outside = exterior_points(mask, 4, distance=4)
    assert len(outside) >= 3
    for p in outside:
        assert not p.positive and 4 <= distance_outside[int(p.row), int(p.col)] < 5.5


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_project_prompt_gives_each_mode_its_inputs(projection):
    mask = np.zeros((30, 60), bool)
    mask[5:15, 10:50] = True
    prompt = project_prompt(mask, axis=0, index=3, options=SlicewiseOptions(projection=projection))
    assert prompt.index == 3
    assert (prompt.box is not None) == ("box" in projection)
    assert (prompt.mask is not None) == projection.endswith("mask")
    positives = [p for p in prompt.points if p.positive]
    negatives = [p for p in prompt.points if not p.positive]
    if projection == "point":
        assert len(positives) == 1 and not negatives
    elif projection.startswith("points"):
        assert len(positives) == 3 and len(negatives) == 2
    else:
        assert not prompt.points
    prompt.validate((5, 30, 60))


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_every_projection_carries_the_object_through_its_extent(projection):
    volume, reference = moving_ellipse()
    predictor = ReferenceMaskPredictor(reference)
    session = SlicewiseSession(volume, 0, predictor, SlicewiseOptions(projection=projection))
    preview = session.add_prompt(1, click_on(reference, 14))
    assert np.array_equal(preview.mask, reference[14])
    result = session.propagate(1, STOP)
    assert np.array_equal(result.mask, reference)
    # patience 2: two empty slices past each end, then stop; nothing else encoded
    assert result.slices_computed == list(range(3, 14)) + list(range(15, 27))
    assert result.slices_encoded == len(range(3, 27)) - 1
    assert session.slices_encoded_total == len(range(3, 27))
    assert set(result.stop_reasons) == {"14-1", "14+1"}
    assert result.engine == "slicewise:reference-mask"
    assert sorted(result.scores) == list(range(5, 25))


def test_mask_projection_passes_the_previous_result():
    volume, reference = moving_ellipse()
    predictor = ReferenceMaskPredictor(reference)
    session = SlicewiseSession(volume, 0, predictor, SlicewiseOptions(projection="mask"))
    session.add_prompt(1, click_on(reference, 14))
    session.propagate(1, STOP)
    for index, prompt, previous_index in predictor.calls[1:]:
        assert previous_index == (index - 1 if index > 14 else index + 1) or not reference[index].any()
        assert prompt.mask is not None


def test_box_margin_too_small_loses_a_fast_moving_object():
    volume, reference = moving_ellipse()
    reference[15:] = np.roll(reference[15:], 20, axis=2)  # a jump of 20 columns after slice 14
    predictor = ReferenceMaskPredictor(reference)
    session = SlicewiseSession(volume, 0, predictor, SlicewiseOptions(box_margin_pixels=2, box_margin_fraction=0))
    session.add_prompt(1, click_on(reference, 10))
    result = session.propagate(1, STOP)
    assert result.mask[:15].sum() == reference[:15].sum()
    assert not result.mask[15:].any()
    assert "area 0 px" in result.stop_reasons["10+1"]


def test_stop_rules_score_area_overlap_and_patience():
    volume, reference = moving_ellipse()
    # predicted IoU below the threshold from slice 20 on
    predictor = ReferenceMaskPredictor(reference, scores={k: 0.3 for k in range(20, 30)})
    session = SlicewiseSession(volume, 0, predictor)
    session.add_prompt(1, click_on(reference, 14))
    result = session.propagate(1, STOP)
    assert max(result.slices_with_object) == 19 and "score 0.30" in result.stop_reasons["14+1"]
    assert max(result.slices_computed) == 21  # patience 2

    # minimum area
    session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(reference))
    session.add_prompt(1, click_on(reference, 14))
    big = int(reference.sum(axis=(1, 2)).max()) + 1
    result = session.propagate(1, PropagationOptions(stop=StopRule(min_area=big, patience=1)))
    assert result.slices_with_object == [14] and result.slices_computed == [13, 15]

    # overlap with the previous slice: the object halves at slice 18
    shrunk = reference.copy()
    shrunk[18:, :, :] &= np.indices(reference.shape[1:])[1][None] < 22
    session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(shrunk))
    session.add_prompt(1, click_on(shrunk, 14))
    result = session.propagate(1, PropagationOptions(stop=StopRule(min_area=1, min_overlap=0.7, patience=1)))
    assert max(result.slices_with_object) == 17 and "overlap" in result.stop_reasons["14+1"]

    # one missing slice: patience 2 bridges it (projecting from the last good slice), patience 1 stops
    gap = reference.copy()
    gap[18] = False
    for patience, last in ((2, 24), (1, 17)):
        session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(gap))
        session.add_prompt(1, click_on(gap, 14))
        result = session.propagate(1, PropagationOptions(stop=StopRule(min_area=1, patience=patience)))
        assert max(result.slices_with_object) == last
        assert not result.mask[18].any()


def test_direction_and_slice_range():
    volume, reference = moving_ellipse()
    session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(reference))
    session.add_prompt(1, click_on(reference, 14))
    result = session.propagate(1, PropagationOptions(direction="forward", slice_range=(0, 20)))
    assert result.slices_computed == list(range(15, 21))
    assert result.slices_with_object == list(range(14, 21))


def test_anchors_meet_in_the_middle():
    volume, reference = moving_ellipse()
    predictor = ReferenceMaskPredictor(reference)
    session = SlicewiseSession(volume, 0, predictor)
    session.add_prompt(1, click_on(reference, 8))
    session.add_prompt(1, click_on(reference, 20))
    result = session.propagate(1, STOP)
    assert np.array_equal(result.mask, reference)
    came_from = {index: prev for index, _, prev in predictor.calls if prev is not None}
    assert all(came_from[i] == i - 1 for i in range(9, 15))  # 8 -> 14 forwards
    assert all(came_from[i] == i + 1 for i in range(15, 20))  # 20 -> 15 backwards
    assert came_from[9] == 8 and came_from[19] == 20


def test_between_two_anchors_only_an_empty_mask_stops_a_run():
    """The run from slice 20 towards slice 8 meets low scores at once; the stop rule would leave
    slices 15..19 empty although both anchors hold the object. Outer runs keep the rule."""
    volume, reference = moving_ellipse()
    low = {k: 0.1 for k in range(16, 20)} | {k: 0.1 for k in range(22, 25)}
    session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(reference, scores=low))
    session.add_prompt(1, click_on(reference, 8))
    session.add_prompt(1, click_on(reference, 20))
    result = session.propagate(1, STOP)
    expected = reference.copy()
    expected[22:] = False  # beyond the last anchor the low scores stop the run (patience 2)
    assert np.array_equal(result.mask, expected)


def test_correction_recomputes_only_the_affected_range_and_reuses_encodings():
    volume, reference = moving_ellipse()
    predictor = ReferenceMaskPredictor(reference)
    session = SlicewiseSession(volume, 0, predictor)
    session.add_prompt(1, click_on(reference, 14))
    session.propagate(1, STOP)
    corrected = reference[10].copy()
    corrected[:, :16] = False  # the user trims slice 10
    session.set_slice_mask(1, 10, corrected)
    calls_before = len(predictor.calls)
    second = session.propagate(1, STOP)
    recomputed = sorted(index for index, _, _ in predictor.calls[calls_before:])
    assert recomputed == list(range(3, 10)) + list(range(11, 14)) and second.slices_computed == recomputed
    assert second.slices_encoded == 0  # every slice was encoded by the first propagation
    assert np.array_equal(second.mask[10], corrected)
    assert np.array_equal(second.mask[15:], reference[15:])


def test_cancel_leaves_the_mask_unchanged():
    volume, reference = moving_ellipse()
    session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(reference))
    session.add_prompt(1, click_on(reference, 14))
    first = session.propagate(1, STOP).mask.copy()
    session.set_slice_mask(1, 20, np.zeros_like(reference[20]) | reference[19])
    ticks = []
    with pytest.raises(PropagationCancelled):
        session.propagate(1, STOP, progress=lambda done, total, index: ticks.append(index),
                          cancel=lambda: len(ticks) >= 3)
    assert np.array_equal(session.mask(1), first)
    assert len(ticks) == 3


def test_fill_holes_and_keep_prompted_component():
    volume, reference = moving_ellipse()
    with_hole = reference.copy()
    with_hole[16, 16:19, 24:28] = False  # a hole inside the ellipse on slice 16

    session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(with_hole), SlicewiseOptions(fill_holes=True))
    session.add_prompt(1, click_on(with_hole, 8))
    result = session.propagate(1, STOP)
    assert result.mask[16, 17, 25] and not with_hole[16, 17, 25]
    assert np.array_equal(result.mask, reference)

    blob = np.zeros_like(reference)
    blob[17:19, 32:35, 2:5] = True  # away from the ellipse, inside the slice range
    data = reference | blob
    options = SlicewiseOptions(projection="box", box_margin_pixels=60)  # the box takes the whole slice
    session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(data), options)
    session.add_prompt(1, click_on(data, 14))
    assert session.propagate(1, STOP).mask[17:19, 32:35, 2:5].all()
    options = SlicewiseOptions(box_margin_pixels=60, keep_component="prompted")
    cleaned = SlicewiseSession(volume, 0, ReferenceMaskPredictor(data), options)
    cleaned.add_prompt(1, click_on(data, 14))
    result = cleaned.propagate(1, STOP)
    assert np.array_equal(result.mask, reference)
    assert 17 in result.scores and np.array_equal(cleaned.mask(1), reference)


def test_invalid_options_raise_with_advice():
    with pytest.raises(InputError, match="Projection must be one of"):
        SlicewiseOptions(projection="lasso")
    with pytest.raises(InputError, match="keep_component"):
        SlicewiseOptions(keep_component="all")


def test_empty_anchor_prediction_is_reported_not_propagated():
    volume, reference = moving_ellipse()
    session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(reference))
    preview = session.add_prompt(1, SlicePrompt(0, 2, points=(Point(1, 1),)))  # background click
    assert not preview.mask.any()
    result = session.propagate(1, STOP)
    assert not result.mask.any() and "empty mask" in result.stop_reasons["2+1"]


def test_a_refused_first_prompt_leaves_no_object_behind():
    volume, reference = moving_ellipse()
    session = SlicewiseSession(volume, 0, ReferenceMaskPredictor(reference))
    with pytest.raises(PromptError):
        session.add_prompt(1, SlicePrompt(0, 10, points=(Point(1000.0, 1000.0),)))  # outside the slice
    assert session.object_ids == []
    session.add_prompt(1, click_on(reference, 10))
    session.add_prompt(2, click_on(reference, 12))
    with pytest.raises(PromptError):
        session.add_prompt(1, SlicePrompt(0, 11, points=(Point(1000.0, 1000.0),)))
    assert 10 in session.anchors(1)  # an object that had prompts keeps them


class FilledBoxPredictor:
    """A test double (not a model) that fills whatever box it is given, as a box-trained model
    does next to tissue like the object's; its score is ``loose_score`` for boxes more than two
    pixels wider than the previous mask, 0.9 otherwise."""

    name = "filled-box"
    slices_encoded = 0

    def __init__(self, loose_score: float):
        self.loose_score = loose_score

    def predict(self, index, prompt, previous=None):
        mask = np.zeros((64, 64), bool)
        b = prompt.box
        mask[int(b.row0): int(b.row1) + 1, int(b.col0): int(b.col1) + 1] = True
        loose = previous is not None and mask.sum(axis=1).max() > previous.mask.sum(axis=1).max() + 2
        return SliceMask(mask, self.loose_score if loose else 0.9, 0.9)


@pytest.mark.parametrize("tight_box, loose_score, growth", [(False, 0.9, "margin"), (True, 0.9, "one pixel"),
                                                            (True, 0.91, "one pixel"), (True, 0.95, "margin")])
def test_tight_box_keeps_the_tight_mask_unless_the_loose_box_scores_clearly_higher(tight_box, loose_score, growth):
    rule = PropagationOptions(stop=StopRule(min_area=1, min_score=None, min_likeness=None, patience=1),
                              slice_range=(10, 11))
    session = SlicewiseSession(Volume(np.zeros((16, 64, 64), np.float32)), 0, FilledBoxPredictor(loose_score),
                               SlicewiseOptions(box_margin_pixels=3.0, box_margin_fraction=0.05, tight_box=tight_box))
    session.add_prompt(1, SlicePrompt(0, 10, box=Box(20, 20, 39, 39)))  # 20 px wide
    width = session.propagate(1, rule).mask[11].sum(axis=1).max()
    assert width == (22 if growth == "one pixel" else 28)  # 20 + 2 x 1, or 20 + 2 x (3 + 5 % of 20)


def test_tight_box_is_not_used_between_two_anchors_that_hold_the_object():
    rule = PropagationOptions(stop=StopRule(min_area=1, min_score=None, min_likeness=None, patience=1),
                              slice_range=(10, 13))
    session = SlicewiseSession(Volume(np.zeros((16, 64, 64), np.float32)), 0, FilledBoxPredictor(0.9),
                               SlicewiseOptions(box_margin_pixels=3.0, box_margin_fraction=0.05, tight_box=True))
    session.add_prompt(1, SlicePrompt(0, 10, box=Box(20, 20, 39, 39)))
    session.add_prompt(1, SlicePrompt(0, 13, box=Box(20, 20, 39, 39)))
    assert session.propagate(1, rule).mask[11].sum(axis=1).max() == 28  # the margin, not one pixel


def anchor_and_brighter_slices() -> np.ndarray:
    """12 slices; in rows/cols 20..39 a dark object (45..55) with a rim of every intensity 0..100
    on slices 3..7, and from slice 8 on a brighter tissue (75..85), inside the object's range."""
    image = np.zeros((12, 64, 64), np.float32)
    inner = np.tile(np.linspace(45, 55, 16, dtype=np.float32), (16, 1))
    rim = np.tile(np.linspace(0, 100, 20, dtype=np.float32), (20, 1))
    for k in range(3, 8):
        image[k, 20:40, 20:40] = rim
        image[k, 22:38, 22:38] = inner
    image[8:, 20:40, 20:40] = np.tile(np.linspace(75, 85, 20, dtype=np.float32), (20, 1))
    return image


def test_intensity_range_measures_the_median_shift_in_interquartile_ranges():
    image = anchor_and_brighter_slices()
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    tissue = IntensityRange.of(image[5], mask)
    assert tissue.low < 0 and tissue.high > 100 and 45 <= tissue.median <= 55 and tissue.spread < 20
    assert tissue.likeness(image[9], mask) == 1.0  # the brighter tissue is inside the range...
    assert tissue.shift(image[9], mask) > 1.5  # ...but its median has moved by more than 1.5 IQRs
    assert abs(tissue.shift(image[6], mask)) < 0.1
    assert tissue.shift(image[9], np.zeros_like(mask)) is None


@pytest.mark.parametrize("max_shift, last_slice", [(1.5, 7), (None, 11)])
def test_the_stop_rule_ends_a_run_that_slides_onto_brighter_tissue_within_the_range(max_shift, last_slice):
    session = SlicewiseSession(Volume(anchor_and_brighter_slices()), 0, FilledBoxPredictor(0.9),
                               SlicewiseOptions(box_margin_pixels=0.0, box_margin_fraction=0.0))
    session.add_prompt(1, SlicePrompt(0, 5, box=Box(20, 20, 39, 39)))
    rule = StopRule(min_area=1, min_score=None, max_shift=max_shift, patience=1)
    result = session.propagate(1, PropagationOptions(stop=rule, direction="forward"))
    assert result.slices_with_object[-1] == last_slice
    if max_shift is not None:
        assert "median intensity" in result.stop_reasons["5+1"]


@pytest.mark.parametrize("value", [0, -1.0, "1"])
def test_stop_rule_rejects_a_max_shift_that_is_not_a_positive_number(value):
    with pytest.raises(InputError, match="max_shift"):
        StopRule(max_shift=value)
