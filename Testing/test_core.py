"""Prompts, slice access, anchor planning, the shared session bookkeeping and the cache."""

import numpy as np
import pytest
from doubles import ReferenceMaskSession

from SAM3DSegmentLib.data.prompts import (
    Box,
    Point,
    SlicePrompt,
    box_xyxy,
    points_xy,
    prompt_from_voxels,
)
from SAM3DSegmentLib.data.volume import Volume, get_slice, kji_to_slice, slice_to_kji
from SAM3DSegmentLib.engines.anchors import Run, plan_runs
from SAM3DSegmentLib.engines.feature_cache import FeatureCache
from SAM3DSegmentLib.engines.session import PropagationOptions, StopRule, StopTracker
from SAM3DSegmentLib.errors import PromptError, PropagationCancelled


def test_slice_coordinates_round_trip_on_every_axis():
    array = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    for axis in range(3):
        for kji in [(1, 2, 3), (2, 0, 4)]:
            index, row, col = kji_to_slice(axis, kji)
            assert slice_to_kji(axis, index, row, col) == kji
            assert get_slice(array, axis, index)[row, col] == array[kji]


def test_points_and_boxes_convert_to_x_col_y_row():
    coords, labels = points_xy([Point(row=2, col=7), Point(row=5, col=1, positive=False)])
    assert coords.tolist() == [[7, 2], [1, 5]]
    assert labels.tolist() == [1, 0]
    assert box_xyxy(Box(row0=10, col0=3, row1=4, col1=30)).tolist() == [3, 4, 30, 10]


def test_prompt_validation_errors():
    shape = (5, 20, 30)
    with pytest.raises(PromptError, match="slices 0..4"):
        SlicePrompt(0, 7, points=(Point(1, 1),)).validate(shape)
    with pytest.raises(PromptError, match="outside"):
        SlicePrompt(0, 2, points=(Point(25, 1),)).validate(shape)
    with pytest.raises(PromptError, match="degenerate"):
        SlicePrompt(0, 2, box=Box(3, 3, 3, 9)).validate(shape)
    with pytest.raises(PromptError, match="shape"):
        SlicePrompt(0, 2, mask=np.ones((30, 20), bool)).validate(shape)
    with pytest.raises(PromptError, match="empty"):
        SlicePrompt(0, 2, mask=np.zeros((20, 30), bool)).validate(shape)
    with pytest.raises(PromptError, match="no positive"):
        SlicePrompt(0, 2, points=(Point(1, 1, positive=False),)).validate(shape)
    SlicePrompt(1, 10, points=(Point(4, 29),)).validate(shape)  # rows are k on axis 1


def test_prompt_from_voxels_requires_one_slice():
    prompt = prompt_from_voxels(0, positive_kji=[(3, 4, 5)], negative_kji=[(3, 1, 1)])
    assert prompt.index == 3 and prompt.points[0] == Point(4, 5, True)
    with pytest.raises(PromptError, match="one slice"):
        prompt_from_voxels(0, positive_kji=[(3, 4, 5), (4, 4, 5)])


def test_plan_runs_meets_in_the_middle_and_limits_to_changed_anchors():
    runs = plan_runs([10, 20], 40)
    assert Run(10, -1, 0) in runs and Run(20, +1, 39) in runs
    assert Run(10, +1, 15, toward=20) in runs and Run(20, -1, 16, toward=10) in runs
    covered = sorted(i for r in runs for i in r.slices)
    assert covered == [i for i in range(40) if i not in (10, 20)]
    only_new = plan_runs([10, 14, 20], 40, changed={14})
    assert {r.start for r in only_new} == {10, 14, 20}
    assert all(r.toward == 14 or r.start == 14 for r in only_new)
    assert plan_runs([10], 40, direction="forward", slice_range=(5, 30)) == [Run(10, 1, 30)]
    with pytest.raises(PromptError, match="inside the slice range"):
        plan_runs([3], 40, slice_range=(10, 20))


def test_stop_tracker_needs_patience():
    tracker = StopTracker(StopRule(min_area=5, patience=2))
    rule = tracker.rule
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert not tracker.update(1, rule.absent_reason(empty))
    assert not tracker.update(2, rule.absent_reason(full))
    assert not tracker.update(3, rule.absent_reason(empty))
    assert tracker.update(4, rule.absent_reason(empty))
    assert "slice 4" in tracker.reason


def _sphere_case():
    reference = np.zeros((30, 20, 20), bool)
    reference[8:22, 5:15, 5:15] = True
    return Volume(reference.astype(np.float32)), reference


def test_session_propagates_with_stop_rule_and_recomputes_only_changed_runs():
    volume, reference = _sphere_case()
    session = ReferenceMaskSession(volume, reference)
    session.add_prompt(1, SlicePrompt(0, 15, points=(Point(10, 10),)))
    first = session.propagate(1, PropagationOptions(stop=StopRule(min_area=1, patience=2)))
    assert np.array_equal(first.mask, reference)
    assert min(first.slices_computed) == 6 and max(first.slices_computed) == 23  # patience 2
    session.set_slice_mask(1, 10, get_slice(reference, 0, 10))
    second = session.propagate(1, PropagationOptions(stop=StopRule(min_area=1, patience=2)))
    assert set(second.slices_computed) == set(range(6, 10)) | set(range(11, 15))
    assert np.array_equal(second.mask, reference)


def test_cancel_leaves_the_previous_result():
    volume, reference = _sphere_case()
    session = ReferenceMaskSession(volume, reference)
    session.add_prompt(1, SlicePrompt(0, 15, points=(Point(10, 10),)))
    first = session.propagate(1).mask.copy()
    session.add_prompt(1, SlicePrompt(0, 9, mask=np.ones((20, 20), bool)))
    with pytest.raises(PropagationCancelled):
        session.propagate(1, cancel=lambda: True)
    assert np.array_equal(session.mask(1), first)


def test_feature_cache_holds_its_budget():
    cache = FeatureCache(budget_bytes=3 * 800)
    for key in range(5):
        cache.put(key, np.zeros(100))  # 800 bytes each
    assert len(cache) == 3 and cache.used_bytes <= cache.budget_bytes
    assert cache.get(0) is None and cache.get(4) is not None


def test_clicks_on_a_propagated_slice_carry_its_current_mask():
    volume, reference = _sphere_case()
    session = ReferenceMaskSession(volume, reference)
    session.add_prompt(1, SlicePrompt(0, 15, points=(Point(10, 10),)))
    session.propagate(1)
    # an exclude click alone is a valid correction on a propagated slice: it refines that mask
    session.add_prompt(1, SlicePrompt(0, 12, points=(Point(6, 6, positive=False),)))
    anchor = session.anchors(1)[12]
    assert anchor.mask is not None and np.array_equal(anchor.mask, reference[12])
    # on a slice without a result a lone exclude click is still refused
    with pytest.raises(PromptError, match="no positive"):
        session.add_prompt(1, SlicePrompt(0, 2, points=(Point(6, 6, positive=False),)))



KEEP_GOING = PropagationOptions(stop=StopRule(min_area=1, patience=10))


def _changed_answer(reference):
    """The double's next answer: a bump joined to the object on the clicked slice 17, a
    separate blob on slices 25-26, and a part lost on slices 19-20 (as a re-propagated model
    might answer)."""
    answer = reference.copy()
    answer[16:19, 15:18, 8:12] = True
    answer[25:27, 2:4, 2:4] = True
    answer[19:21, 5:8] = False
    return answer


def _propagated_session(volume, reference):
    session = ReferenceMaskSession(volume, reference)
    session.add_prompt(1, SlicePrompt(0, 15, points=(Point(10, 10),)))
    session.propagate(1, KEEP_GOING)
    return session


@pytest.mark.parametrize("one_way", [True, False])
def test_include_clicks_only_add_what_joins_the_clicked_slice(one_way):
    volume, reference = _sphere_case()
    session = _propagated_session(volume, reference)
    session.clicks_change_one_way = one_way
    session.reference = _changed_answer(reference)
    preview = session.add_prompt(1, SlicePrompt(0, 17, points=(Point(16, 9),)))
    mask = session.propagate(1, KEEP_GOING).mask
    if not one_way:
        assert np.array_equal(mask, session.reference)
        return
    assert np.array_equal(preview.mask, session.reference[17])
    expected = reference.copy()
    expected[16:19, 15:18, 8:12] = True
    assert np.array_equal(mask, expected)  # no far blob, nothing lost on slices 19-20


def test_exclude_clicks_only_remove_what_joins_the_clicked_slice():
    volume, reference = _sphere_case()
    session = _propagated_session(volume, reference)
    answer = reference.copy()
    answer[16:19, 5:8] = False  # through the clicked slice 17
    answer[20:22, 12:15] = False  # a separate removal
    answer[25:27, 2:4, 2:4] = True  # an addition
    session.reference = answer
    session.add_prompt(1, SlicePrompt(0, 17, points=(Point(6, 6, positive=False),)))
    mask = session.propagate(1, KEEP_GOING).mask
    expected = reference.copy()
    expected[16:19, 5:8] = False
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("prompt", [SlicePrompt(0, 17, box=Box(5, 5, 17, 17)),
                                    SlicePrompt(0, 17, points=(Point(16, 9), Point(6, 6, positive=False)))])
def test_a_box_or_a_mixed_prompt_changes_the_mask_freely(prompt):
    volume, reference = _sphere_case()
    session = _propagated_session(volume, reference)
    session.reference = _changed_answer(reference)
    session.add_prompt(1, prompt)
    assert np.array_equal(session.propagate(1, KEEP_GOING).mask, session.reference)
