"""The CVPR 2025 challenge's protocol: scores by hand, the click simulation, files, the runner."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from SAM3DSegmentLib.commands.cli import main
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.evaluation.correction_rounds import EvaluationConfig
from SAM3DSegmentLib.evaluation.cvpr25 import (
    ChallengeBox,
    ChallengeImage,
    ChallengeTarget,
    box_prompt,
    challenge_box,
    class_dice,
    click_prompt,
    error_click,
    evaluate_image,
    interaction_auc,
    label_map,
    open_image_sessions,
    read_csv,
    score_step,
    surface_dice,
)
from SAM3DSegmentLib.evaluation.cvpr25_files import read_challenge_case, write_challenge_case

CORNER = math.sqrt(3) / 8  # area of the surfel cutting one voxel's corner (spacing 1)
EDGE = math.sqrt(2) / 2  # area of the surfel across a cube with two voxels on an edge


def voxels(shape, *points):
    mask = np.zeros(shape, bool)
    for p in points:
        mask[p] = True
    return mask


# --- scores computed by hand ------------------------------------------------------------------


def test_dice_by_hand_and_its_empty_cases():
    reference = np.zeros((4, 4, 4), bool)
    reference[:2, :2, :2] = True  # 8 voxels
    half = np.zeros_like(reference)
    half[:2, :2, :1] = True  # 4 of them
    assert class_dice(reference, half) == pytest.approx(2 * 4 / 12)
    assert class_dice(reference, np.zeros_like(reference)) == 0.0  # empty prediction
    assert class_dice(np.zeros_like(reference), half) == 0.0  # empty reference
    assert math.isnan(class_dice(np.zeros_like(reference), np.zeros_like(reference)))  # both: NaN, as the challenge


def test_nsd_by_hand_with_surfel_areas():
    shape = (6, 5, 5)
    one = voxels(shape, (2, 2, 2))
    shifted = voxels(shape, (3, 2, 2))
    # 8 corner surfels each; half of each side's corners coincide with the other's, half are 1 voxel off
    assert surface_dice(one, shifted, (1, 1, 1), tolerance_mm=0.5) == pytest.approx(0.5)
    assert surface_dice(one, shifted, (1, 1, 1), tolerance_mm=1.0) == pytest.approx(1.0)
    assert surface_dice(one, shifted, (2.0, 1, 1), tolerance_mm=1.5) == pytest.approx(0.5)  # 2 mm apart
    two = voxels(shape, (2, 2, 2), (3, 2, 2))
    # reference: 8 corners, all on the prediction's surface; prediction: 8 corners + 4 edge surfels,
    # its 4 far corners 1 mm away
    expected = (8 * CORNER + 4 * CORNER + 4 * EDGE) / (8 * CORNER + 8 * CORNER + 4 * EDGE)
    assert surface_dice(one, two, (1, 1, 1), tolerance_mm=0.5) == pytest.approx(expected)
    assert surface_dice(one, two, (1, 1, 1), tolerance_mm=2.0) == pytest.approx(1.0)


def test_nsd_empty_cases_as_the_challenge():
    shape = (4, 4, 4)
    one, empty = voxels(shape, (1, 1, 1)), np.zeros(shape, bool)
    assert surface_dice(one, empty, (1, 1, 1)) == 0.0  # empty prediction
    assert surface_dice(empty, one, (1, 1, 1)) == 0.0  # empty reference
    assert math.isnan(surface_dice(empty, empty, (1, 1, 1)))
    assert surface_dice(one, one, (0.7, 1.3, 2.0)) == 1.0


def test_auc_integrates_the_five_click_steps_only():
    assert interaction_auc([0.0, 0.6, 0.7, 0.8, 0.9, 1.0]) == pytest.approx(0.65 + 0.75 + 0.85 + 0.95)
    assert interaction_auc([0.9, 0.6, 0.7, 0.8, 0.9, 1.0]) == pytest.approx(3.2)  # the box step does not count
    assert interaction_auc([1.0] * 6) == pytest.approx(4.0)


def test_multi_class_score_is_the_mean_and_nsd_needs_dice_above_0_2():
    shape = (6, 6, 6)
    first, second = voxels(shape, (1, 1, 1)), voxels(shape, (4, 4, 4))
    empty = np.zeros(shape, bool)
    scores = score_step([first, second], [first, empty], (1, 1, 1))
    assert scores.dice == [1.0, 0.0]
    assert scores.image_dice == 0.5 and scores.image_nsd == pytest.approx(0.5)
    assert scores.nsd == [1.0, 0.0]
    low = score_step([first, second, second | first], [empty, empty, first], (1, 1, 1))
    assert low.image_dice == pytest.approx((0 + 0 + 2 / 3) / 3)  # 0.22 > 0.2: NSD is computed
    assert low.image_nsd > 0
    lower = score_step([first, second, second, second], [empty, empty, empty, second], (1, 1, 1))
    assert lower.image_dice == 0.25 and lower.image_nsd == pytest.approx(0.25)
    gated = score_step([first, second, second, second, second], [empty] * 4 + [second], (1, 1, 1))
    assert gated.image_dice == pytest.approx(0.2) and gated.image_nsd == 0.0  # 0.2 is not above 0.2


# --- the simulated user ---------------------------------------------------------------------------


def test_click_at_the_centre_of_the_largest_error_component():
    shape = (12, 12, 12)
    reference = np.zeros(shape, bool)
    reference[2:7, 2:7, 2:7] = True  # 125 voxels missed
    prediction = np.zeros(shape, bool)
    prediction[9:11, 9:11, 9:11] = True  # 8 voxels over-segmented
    click = error_click(prediction, reference)
    assert click.kji == (4, 4, 4) and click.positive and click.component_voxels == 125
    prediction[0:12, 8:12, 8:12] = True  # now the over-segmentation is the largest
    click = error_click(prediction | reference, reference)
    assert not click.positive and prediction[click.kji] and not reference[click.kji]
    assert error_click(reference, reference) is None


def test_click_distance_is_in_voxels_ties_by_raster_order_and_seed_42():
    shape = (8, 8, 8)
    reference = np.zeros(shape, bool)
    reference[1:3, 1:3, 1:3] = True  # two 8-voxel components: the first in raster order wins
    reference[5:7, 5:7, 5:7] = True
    click = error_click(np.zeros(shape, bool), reference)
    candidates = np.argwhere(reference[:4, :4, :4])  # all 8 voxels are 1 voxel from the boundary
    assert click.kji == tuple(candidates[6])  # np.random.RandomState(42).choice(8) == 6
    slab = np.zeros((9, 9, 9), bool)
    slab[1:8, 1:8, 3:6] = True  # thin along the last axis; a spacing-aware EDT would prefer others
    assert error_click(np.zeros_like(slab), slab).kji[2] == 4


def test_box_as_the_challenge_makes_it_and_its_prompt():
    reference = np.zeros((10, 300, 280), bool)
    reference[2:6, 100:120, 50:60] = True

    class Fixed:
        def randint(self, low, high):
            return 5

    box = challenge_box(reference, 0, Fixed())
    assert (box.z_min, box.z_max, box.z_mid) == (2, 5, 4)  # the middle of slices 2..5
    assert (box.y_min, box.y_max) == (100 - 5, 119 + 5)  # 5 * 300 / 256 = 5 px
    assert (box.x_min, box.x_max) == (50 - 5, 59 + 5)  # 5 * 280 / 256 = 5 px
    prompt = box_prompt(box, 0, reference.shape)
    assert prompt.index == 4 and (prompt.box.row0, prompt.box.col0, prompt.box.row1, prompt.box.col1) == (95, 45, 124, 64)
    thin = box_prompt(ChallengeBox(0, 0, 0, 7, 3, 7, 3), 0, (1, 20, 20))
    assert thin.box.row1 - thin.box.row0 == 1 and thin.box.col1 - thin.box.col0 == 1
    point = click_prompt(error_click(np.zeros_like(reference), reference), 0)
    assert point.points[0].positive and 2 <= point.index <= 5


# --- files and the runner -------------------------------------------------------------------------


def two_class_image(with_boxes=True):
    shape = (14, 40, 40)
    gts = np.zeros(shape, np.uint8)
    gts[3:10, 5:15, 5:15] = 1
    gts[4:12, 22:34, 20:32] = 2
    zz, yy, xx = np.indices(shape)
    imgs = (40 + 150 * (gts > 0) + 10 * np.sin(xx / 3.0) + 5 * np.cos(yy / 5.0 + zz)).astype(np.uint8)
    boxes = [challenge_box(gts == v, 0, np.random.RandomState(v)) for v in (1, 2)] if with_boxes else None
    return imgs, gts, boxes


def test_challenge_npz_with_separate_references(tmp_path):
    imgs, gts, boxes = two_class_image()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gts").mkdir()
    write_challenge_case(tmp_path / "imgs" / "CT_Demo_001.npz", imgs, (2.5, 0.8, 0.8), boxes=boxes)
    np.savez_compressed(tmp_path / "gts" / "CT_Demo_001.npz", gts=gts)
    image = read_challenge_case(tmp_path / "imgs" / "CT_Demo_001.npz", tmp_path / "gts")
    assert image.modality == "CT" and [t.value for t in image.targets] == [1, 2]
    assert image.targets[1].box == boxes[1] and image.targets[0].reference.sum() == (gts == 1).sum()
    assert np.allclose(image.volume.spacing_kji, (2.5, 0.8, 0.8))
    write_challenge_case(tmp_path / "imgs" / "MR_NoBox.npz", imgs, (1, 1, 1), gts=gts)
    assert all(t.box is None for t in read_challenge_case(tmp_path / "imgs" / "MR_NoBox.npz").targets)


def challenge_image(with_boxes=True):
    imgs, gts, boxes = two_class_image(with_boxes)
    volume = Volume(imgs, np.diag([0.8, 0.8, 2.5, 1.0]), name="demo")
    targets = [ChallengeTarget(f"label_{v}", v, gts == v, boxes[v - 1] if boxes else None) for v in (1, 2)]
    return ChallengeImage("demo", "demo", "CT", volume, targets)


def test_protocol_keeps_classes_apart_and_scores_the_label_map():
    image = challenge_image()
    prompts = []

    def recording(config, img):
        sessions = open_image_sessions(config, img)
        for session in sessions:
            original = session.add_prompt

            def add_prompt(object_id, prompt, original=original, **kwargs):
                prompts.append((object_id, prompt))
                return original(object_id, prompt, **kwargs)

            session.add_prompt = add_prompt
        return sessions

    result = evaluate_image(EvaluationConfig(engine="oracle"), image, open_sessions=recording)
    first, second, whole = result.rows
    assert (first.target, second.target, whole.target, whole.classes) == ("label_1", "label_2", "all", 2)
    assert [p.box is not None for _, p in prompts[:2]] == [True, True]
    assert prompts[0][1].index == image.targets[0].box.z_mid and prompts[1][1].index == image.targets[1].box.z_mid
    for object_id, prompt in prompts[2:]:  # each click comes from its own class's error
        assert object_id in (1, 2) and prompt.points
    assert len(result.all_segs) == 6 and set(np.unique(result.all_segs[-1])) <= {0, 1, 2}
    assert whole.dsc == pytest.approx([(a + b) / 2 for a, b in zip(first.dsc, second.dsc)])
    assert len(first.dsc) == 6 and first.dsc[-1] > 0.9 and whole.dsc_auc <= 4.0


def test_no_box_means_no_first_step():
    result = evaluate_image(EvaluationConfig(engine="oracle"), challenge_image(with_boxes=False))
    whole = result.rows[-1]
    assert whole.dsc[0] == 0.0 and whole.nsd[0] == 0.0 and whole.seconds[0] == 0.0
    assert len(result.all_segs) == 5 and whole.dsc[1] > 0  # the first click already finds the objects


def test_label_map_resolves_overlaps_in_label_order():
    a, b = np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2), bool)
    a[0] = True
    b[:, 0] = True
    segs = label_map([b, a], [2, 1], a.shape)
    assert segs[0, 0, 0] == 2 and segs[0, 1, 0] == 1 and segs[1, 0, 0] == 2 and segs[1, 1, 1] == 0


def test_sam3d_eval_cvpr25_on_challenge_npz(tmp_path):
    imgs, gts, boxes = two_class_image()
    data, references, out = tmp_path / "imgs", tmp_path / "gts", tmp_path / "out"
    data.mkdir(), references.mkdir()
    write_challenge_case(data / "CT_Demo_001.npz", imgs, (2.5, 0.8, 0.8), boxes=boxes)
    np.savez_compressed(references / "CT_Demo_001.npz", gts=gts)
    code = main(["eval", "--protocol", "cvpr25", "--data", str(data), "--gts", str(references),
                 "--engine", "oracle", "weightfree", "--out", str(out)])
    assert code == 0
    for engine in ("oracle", "weightfree"):
        with np.load(out / engine / "CT_Demo_001.npz") as saved:
            assert saved["segs"].shape == gts.shape and saved["all_segs"].shape == (6,) + gts.shape
            assert np.array_equal(saved["segs"], saved["all_segs"][-1])
    with open(out / "cvpr25.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert {(r["engine"], r["target"]) for r in lines} >= {("oracle", "all"), ("weightfree", "label_2")}
    assert (out / "cvpr25_dice.png").stat().st_size > 0 and (out / "cvpr25_summary.md").is_file()
    rows = read_csv(out / "cvpr25.csv")
    assert [(r.engine, r.target, r.clicks, r.classes) for r in rows] == [
        (r["engine"], r["target"], r["clicks"].split(" "), 2 if r["target"] == "all" else 1) for r in lines]
    assert [round(r.dsc[-1], 4) for r in rows] == [float(r["dsc_final"]) for r in lines]
