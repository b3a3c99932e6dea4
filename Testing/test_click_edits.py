"""Exclude clicks that cut the mask, and include clicks on an empty slice next to the object
(engines/click_edits.py, and their use by the sliding-window session)."""

import numpy as np
import pytest

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.engines.click_edits import (
    added_around_clicks,
    carried_exclusions,
    carried_inclusions,
    cut_excluded,
    neighbour_box,
    within_region,
)
from SAM3DSegmentLib.engines.session import PropagationOptions, SliceMask, StopRule
from SAM3DSegmentLib.engines.slicewise import SlicewiseOptions, SlicewiseSession
from SAM3DSegmentLib.errors import InputError

ROWS, COLS = np.mgrid[:120, :160]
OBJECT = (ROWS - 60) ** 2 + (COLS - 50) ** 2 < 30 ** 2
LEAK = ((ROWS - 60) ** 2 + (COLS - 100) ** 2 < 15 ** 2) | (((ROWS - 60) ** 2 < 25) & (COLS > 60) & (COLS < 100))
LEAK &= ~OBJECT


def slice_image(seed=0, noise_sd=5.0):
    """The object bright, the leak darker, a neck between them: a model's over-segmentation."""
    noise = np.random.default_rng(seed).normal(0, noise_sd, OBJECT.shape)
    return np.where(OBJECT, 100.0, 0.0) + np.where(LEAK, 40.0, 0.0) + noise


def exclude(row, col, *more):
    return SlicePrompt(0, 0, points=(Point(row, col, False),) + tuple(more))


def test_an_exclude_click_on_a_leak_removes_the_leak_and_keeps_the_object():
    out = cut_excluded(OBJECT | LEAK, slice_image(), exclude(60, 102))
    assert (out & OBJECT).sum() >= 0.98 * OBJECT.sum()
    assert (out & LEAK).sum() <= 0.05 * LEAK.sum()


def test_a_click_in_a_filled_hole_removes_the_hole_not_the_slice():
    hole = (ROWS - 60) ** 2 + (COLS - 50) ** 2 < 10 ** 2  # the object is a ring; the model filled it
    image = slice_image() - np.where(hole, 100.0, 0.0)
    out = cut_excluded(OBJECT, image, exclude(60, 50))
    assert (out & hole).sum() <= 0.1 * hole.sum()
    assert (out & OBJECT & ~hole).sum() >= 0.95 * (OBJECT & ~hole).sum()


def test_a_click_in_a_separate_part_leaves_the_other_parts_alone():
    blob = (ROWS - 60) ** 2 + (COLS - 130) ** 2 < 12 ** 2
    out = cut_excluded(OBJECT | blob, slice_image(), exclude(60, 130))
    assert not out[60, 130]
    assert np.array_equal(out & OBJECT, OBJECT)


def test_an_include_click_in_the_part_keeps_its_pixel():
    blob = (ROWS - 60) ** 2 + (COLS - 130) ** 2 < 12 ** 2
    out = cut_excluded(blob, slice_image(), exclude(60, 130, Point(60, 139, True)))
    assert out[60, 139]
    assert not out[60, 130]


def test_clicks_outside_the_mask_change_nothing():
    mask = OBJECT | LEAK
    assert np.array_equal(cut_excluded(mask, slice_image(), exclude(5, 5)), mask)
    include_only = SlicePrompt(0, 0, points=(Point(60, 102, True),))
    assert np.array_equal(cut_excluded(mask, slice_image(), include_only), mask)


def three_slices_with_object(indices=(4, 5, 6), n=12):
    mask = np.zeros((n,) + OBJECT.shape, bool)
    mask[list(indices)] = OBJECT
    return mask


def test_neighbour_box_is_the_nearest_object_slice_box_moved_to_the_click():
    mask = three_slices_with_object()
    click = SlicePrompt(0, 8, points=(Point(60, 95, True),))
    box = neighbour_box(click, mask, axis=0, max_gap=3)
    assert (box.row0, box.col0, box.row1) == (31.0, 21.0, 89.0)
    assert box.col1 >= 95  # grown to take in the click
    assert neighbour_box(SlicePrompt(0, 10, points=(Point(60, 50, True),)), mask, 0, max_gap=3) is None  # too far
    assert neighbour_box(SlicePrompt(0, 5, points=(Point(60, 50, True),)), mask, 0, max_gap=3) is None  # not empty
    with_box = SlicePrompt(0, 8, points=(Point(60, 50, True),), box=Box(40, 40, 70, 70))
    assert neighbour_box(with_box, mask, 0, max_gap=3) is None
    assert neighbour_box(click, None, 0, max_gap=3) is None


def test_an_exclude_click_carries_where_it_is_no_deeper_inside_the_mask_than_on_its_own_slice():
    """On slice 5 the click sits in the leak, 15 px from the mask's edge. Slice 6 with the same
    mask takes it; on slice 7 the mask is a large organ around the click (40 px deep): there the
    click is on the object and does not carry."""
    click = Point(60, 100, False)
    anchors = {5: SlicePrompt(0, 5, points=(click,), mask=OBJECT | LEAK)}
    image = slice_image()
    organ = (ROWS - 60) ** 2 + (COLS - 100) ** 2 < 40 ** 2

    def carried(index, mask):
        return carried_exclusions(anchors, index, lambda k: image, reach=3, tolerance=1.0, mask=mask)

    assert carried(6, OBJECT | LEAK).points == (click,)
    assert carried(7, organ) is None
    assert carried(9, OBJECT | LEAK) is None  # beyond the reach


def test_an_include_click_on_a_missed_part_carries_where_the_mask_misses_it_and_the_tissue_matches():
    """On slice 5 the click lies in the missed part (the leak), 15 px from the mask: slices 4 and
    6 whose masks also miss it take it; not a slice whose mask holds it, one beyond the reach, one
    whose tissue there differs, nor a click beside the mask's rim or from a slice without the
    object (no box, no mask); a click on the box's slice carries."""
    click = Point(60, 100, True)
    anchors = {5: SlicePrompt(0, 5, points=(click,), mask=OBJECT)}
    image = slice_image()

    def carried(index, mask, here=image, given=anchors):
        return carried_inclusions(given, index, lambda k: here if k == index else image, reach=3, tolerance=1.0,
                                  mask=mask)

    assert carried(6, OBJECT).points == (click,) and carried(4, OBJECT).index == 4
    assert carried(6, OBJECT | LEAK) is None  # the mask holds the click there
    assert carried(9, OBJECT) is None  # beyond the reach
    assert carried(6, OBJECT, here=image + 50) is None  # other tissue under the click
    rim = {5: SlicePrompt(0, 5, points=(Point(60, 81, True),), mask=OBJECT)}  # 2 px beyond its edge
    assert carried(6, OBJECT, given=rim) is None
    assert carried(6, OBJECT, given={5: SlicePrompt(0, 5, points=(click,))}) is None
    assert carried(6, OBJECT, given={5: SlicePrompt(0, 5, points=(click,), box=Box(20, 10, 100, 130))}).points == (click,)


def test_a_neighbours_box_is_cut_to_the_clicks_region_where_that_holds_the_clicks():
    box = Box(30, 20, 90, 80)
    click = SlicePrompt(0, 8, points=(Point(60, 50, True),))
    assert within_region(box, Box(50, 40, 70, 100), click) == Box(50, 40, 70, 80)
    assert within_region(box, None, click) == box  # no region (the weight-free engine)
    assert within_region(box, Box(62, 40, 70, 100), click) == box  # the click would fall outside
    assert within_region(box, Box(0, 90, 10, 120), click) == box  # no overlap


class LeakyBoxOnlyPredictor:
    """A test double (not a model) that behaves like a box-trained model: it ignores clicks'
    labels, answers a click alone with the whole bright-and-leak region it lands in plus a second
    organ, a box or mask with the object and leak inside the box."""

    name = "leaky-box-only"
    slices_encoded = 0

    def __init__(self, object_slices):
        self.object_slices = set(object_slices)

    def predict(self, index, prompt, previous=None):
        present = OBJECT | LEAK if index in self.object_slices else np.zeros_like(OBJECT)
        if prompt.box is None and prompt.mask is None:
            organ = np.zeros_like(OBJECT)
            organ[10:110, 10:150] = True  # the organ around the click
            return SliceMask(organ, 1.0, 1.0)
        if prompt.box is not None:
            b = prompt.box
            inside = np.zeros_like(OBJECT)
            inside[int(b.row0): int(b.row1) + 1, int(b.col0): int(b.col1) + 1] = True
            present = present & inside
        return SliceMask(present, 1.0 if present.any() else 0.0, 1.0)


class PartMissingPredictor:
    """A test double (not a model): it answers every prompt on the object's slices with the
    object alone, leaving out the part beside it (the leak region), as a box-trained model that
    keeps missing a part of an organ; its ``click_region`` is the bright region (object and part),
    which it adds around the prompt's own include clicks (as ``region_grow`` does)."""

    name = "part-missing"
    slices_encoded = 0

    def __init__(self, object_slices):
        self.object_slices = set(object_slices)

    def predict(self, index, prompt, previous=None):
        present = index in self.object_slices
        mask = OBJECT.copy() if present else np.zeros_like(OBJECT)
        if previous is None and present:
            mask = added_around_clicks(mask, self.click_region(index, prompt), prompt)
        return SliceMask(mask, 1.0 if present else 0.0, 1.0)

    def click_region(self, index, prompt):
        return (OBJECT | LEAK) if index in self.object_slices else np.zeros_like(OBJECT)


def test_an_include_click_on_a_missed_part_carries_onto_the_slices_propagated_from_it():
    image = np.stack([slice_image(k, 1.0) if k in range(3, 9) else np.zeros(OBJECT.shape) for k in range(12)])
    for setting in (False, True):
        session = SlicewiseSession(Volume(image.astype(np.float32)), 0, PartMissingPredictor(range(3, 9)),
                                   SlicewiseOptions(carry_include_clicks=setting))
        session.add_prompt(1, SlicePrompt(0, 5, box=Box(25, 15, 95, 120)))
        session.propagate(1, RULE)
        session.add_prompt(1, SlicePrompt(0, 5, points=(Point(60, 100, True),)))  # on the missed part
        mask = session.propagate(1, RULE).mask
        for k in (4, 6, 7, 8):
            assert bool(mask[k][60, 100]) == setting, (setting, k)
            assert np.array_equal(mask[k] & OBJECT, OBJECT)
        assert not mask[9:].any() and not mask[:3].any()  # no slice the object is not on


def leaky_session(**options):
    image = np.stack([slice_image(k, 1.0) if k in range(3, 9) else np.zeros(OBJECT.shape) for k in range(12)])
    predictor = LeakyBoxOnlyPredictor(range(3, 9))
    return SlicewiseSession(Volume(image.astype(np.float32)), 0, predictor, SlicewiseOptions(**options))


RULE = PropagationOptions(stop=StopRule(min_area=1, min_score=0.5, min_stability=None, min_overlap=None,
                                        min_likeness=None, patience=1))


def test_exclude_clicks_cut_the_slice_only_when_the_session_is_set_to():
    for setting, leak_left in (("model", True), ("cut", False)):
        session = leaky_session(exclude_clicks=setting)
        session.add_prompt(1, SlicePrompt(0, 5, box=Box(25, 15, 95, 120)))
        session.propagate(1, RULE)
        preview = session.add_prompt(1, SlicePrompt(0, 6, points=(Point(60, 102, False),)))
        assert bool((preview.mask & LEAK).sum() > 0.5 * LEAK.sum()) == leak_left, setting
        assert (preview.mask & OBJECT).sum() >= 0.98 * OBJECT.sum()


def test_an_exclude_click_carries_onto_the_slices_propagated_from_it():
    for setting, leak_left in (("model", True), ("cut", False)):
        session = leaky_session(exclude_clicks=setting)
        session.add_prompt(1, SlicePrompt(0, 5, box=Box(25, 15, 95, 120)))
        session.propagate(1, RULE)
        session.add_prompt(1, SlicePrompt(0, 6, points=(Point(60, 102, False),)))
        mask = session.propagate(1, RULE).mask
        for k in (7, 8):
            assert bool((mask[k] & LEAK).sum() > 0.5 * LEAK.sum()) == leak_left, (setting, k)
            assert (mask[k] & OBJECT).sum() >= 0.98 * OBJECT.sum()
        assert (mask[5] & LEAK).sum() > 0.5 * LEAK.sum()  # the user's box on slice 5 stays as it was


def test_an_include_click_next_to_the_object_continues_it_instead_of_taking_the_organ():
    for setting, organ_taken in (("as_given", True), ("neighbour_box", False)):
        session = leaky_session(empty_slice_clicks=setting)
        session.add_prompt(1, SlicePrompt(0, 5, box=Box(25, 15, 95, 120)))
        session.propagate(1, PropagationOptions(stop=RULE.stop, slice_range=(4, 7)))
        preview = session.add_prompt(1, SlicePrompt(0, 8, points=(Point(60, 50, True),)))
        assert bool(preview.mask[15, 140]) == organ_taken, setting
        assert preview.mask[60, 50]


def test_the_session_cuts_the_neighbours_box_to_the_predictors_region_box():
    """A predictor that grows regions (the SAM family) has its region's box cut the neighbour's
    box: here the region box is a small box around the click."""
    session = leaky_session(empty_slice_clicks="neighbour_box")
    session.add_prompt(1, SlicePrompt(0, 5, box=Box(25, 15, 95, 120)))
    session.propagate(1, PropagationOptions(stop=RULE.stop, slice_range=(4, 7)))
    given = []
    predict = session.predictor.predict
    session.predictor.predict = lambda index, prompt, previous=None: given.append(prompt) or predict(index, prompt, previous)
    session.predictor.region_box = lambda index, prompt: Box(40, 30, 80, 70)
    session.add_prompt(1, SlicePrompt(0, 8, points=(Point(60, 50, True),)))
    assert given[0].box == Box(40, 30, 80, 70) and given[0].points == ()


def test_the_options_are_checked():
    with pytest.raises(InputError, match="exclude_clicks"):
        SlicewiseOptions(exclude_clicks="erase")
    with pytest.raises(InputError, match="empty_slice_clicks"):
        SlicewiseOptions(empty_slice_clicks="box")


def test_an_include_click_left_out_adds_the_regions_part_around_it():
    from SAM3DSegmentLib.engines.click_edits import added_around_clicks

    blob = (ROWS - 60) ** 2 + (COLS - 130) ** 2 < 12 ** 2
    region = OBJECT | blob
    clicks = SlicePrompt(0, 0, points=(Point(60, 130, True), Point(60, 50, False)))
    assert np.array_equal(added_around_clicks(OBJECT, region, clicks), OBJECT | blob)
    assert np.array_equal(added_around_clicks(OBJECT, OBJECT, clicks), OBJECT)  # not in the region: nothing


def test_box_trained_models_get_the_click_edits_and_the_tight_box_and_others_do_not():
    from SAM3DSegmentLib.data.sample_volume import make_sample
    from SAM3DSegmentLib.engines.sam_slice_predictor import open_sam_session
    from SAM3DSegmentLib.models.builders import build_model

    volume = make_sample(shape_kji=(4, 32, 32)).volume
    lite = open_sam_session(volume, 0, build_model("litemedsam", None, "cpu"), "litemedsam", device="cpu")
    assert (lite.options.exclude_clicks, lite.options.empty_slice_clicks) == ("cut", "neighbour_box")
    assert lite.options.tight_box and lite.options.carry_include_clicks and lite.predictor.correction == "region_grow"
    chosen = open_sam_session(volume, 0, build_model("litemedsam", None, "cpu"), "litemedsam", device="cpu",
                              exclude_clicks="model")
    assert chosen.options.exclude_clicks == "model" and chosen.options.empty_slice_clicks == "neighbour_box"
    sam = open_sam_session(volume, 0, build_model("sam_vit_b", None, "cpu"), "sam_vit_b", device="cpu")
    assert (sam.options.exclude_clicks, sam.options.empty_slice_clicks) == ("model", "as_given")
    assert not sam.options.tight_box and not sam.options.carry_include_clicks
    assert sam.predictor.correction == "points+mask"
