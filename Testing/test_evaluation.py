"""Simulated user, datasets, the oracle predictor and the evaluation pipeline."""

import csv

import numpy as np
import pytest

from SAM3DSegmentLib.commands.cli import main
from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.engines.session import PropagationOptions, StopRule
from SAM3DSegmentLib.engines.slicewise import SlicewiseOptions, SlicewiseSession
from SAM3DSegmentLib.errors import InputError
from SAM3DSegmentLib.evaluation.correction_rounds import (
    EvaluationConfig,
    evaluate_dataset,
    evaluate_target,
)
from SAM3DSegmentLib.evaluation.datasets import (
    Case,
    case_targets,
    load_case,
    open_dataset,
    select_cases,
    target_mask,
)
from SAM3DSegmentLib.evaluation.oracle import OraclePredictor, components_under_prompt
from SAM3DSegmentLib.evaluation.simulated_user import SimulatedUser, interior_point


def two_blobs(shape=(12, 40, 50)):
    """A 'target' ellipsoid-ish stack (slices 2..9, largest at 6) and a separate distractor."""
    reference = np.zeros(shape, bool)
    rows, cols = np.indices(shape[1:])
    for k, radius in zip(range(2, 10), (3, 5, 7, 8, 9, 10, 7, 4)):
        reference[k] = (rows - 15) ** 2 + (cols - 14) ** 2 <= radius**2
    distractor = np.zeros(shape, bool)
    distractor[3:8, 28:36, 35:45] = True
    return reference, distractor


# --- simulated user ---------------------------------------------------------------------------

def test_click_is_at_the_interior_most_point_of_the_largest_slice():
    reference, _ = two_blobs()
    prompt = SimulatedUser("click").initial_prompt(reference, axis=0)
    assert prompt.index == 7 and prompt.points == (Point(15, 14, True),)
    # anisotropic pixels: the deepest point of a rectangle is its centre in mm, on any axis
    mask = np.zeros((9, 31), bool)
    mask[1:8, 3:30] = True
    assert interior_point(mask, (1.0, 1.0)) == (4, 16)
    prompt_j = SimulatedUser("click").initial_prompt(reference, axis=1, spacing_kji=(3.0, 1.0, 1.0))
    assert prompt_j.axis == 1 and reference[prompt_j.points[0].row, prompt_j.index, prompt_j.points[0].col]


def test_box_is_the_bounding_box_and_jitter_is_seeded():
    reference, _ = two_blobs()
    assert SimulatedUser("box").initial_prompt(reference, 0).box == Box(5, 4, 25, 24)
    first = SimulatedUser("box", box_jitter=0.2, seed=3).initial_prompt(reference, 0).box
    again = SimulatedUser("box", box_jitter=0.2, seed=3).initial_prompt(reference, 0).box
    other = SimulatedUser("box", box_jitter=0.2, seed=4).initial_prompt(reference, 0).box
    assert first == again and first != other and first != Box(5, 4, 25, 24)
    with pytest.raises(InputError, match="jitter"):
        SimulatedUser("box", box_jitter=0.7)


def test_corrections_click_the_largest_error_on_the_worst_slice():
    reference, distractor = two_blobs()
    user = SimulatedUser("click")
    missing = reference.copy()
    missing[4] = False  # slice 4 entirely missed (radius 7 disc)
    fix = user.correction(missing, reference, 0, anchors=[7])
    assert fix.kind == "false_negative" and fix.prompt.index == 4
    point = fix.prompt.points[0]
    assert point.positive and reference[4, point.row, point.col]
    flooded = reference | distractor  # the distractor is a false positive on slices 3..7
    fix = user.correction(flooded, reference, 0, anchors=[7])
    assert fix.kind == "false_positive" and fix.prompt.index in range(3, 8)
    negative = [p for p in fix.prompt.points if not p.positive]
    assert len(negative) == 1 and distractor[fix.prompt.index, negative[0].row, negative[0].col]
    assert fix.prompt.index == 3  # equal errors on 3..7: the first
    assert fix.clicks == 2 and fix.prompt.points[0].positive  # a new anchor needs an include click too
    assert user.correction(reference, reference, 0) is None
    refining = SimulatedUser("click", corrections="click+mask").correction(flooded, reference, 0, anchors=[7])
    assert refining.prompt.index == 3 and refining.clicks == 1  # one exclude click refining the mask
    assert np.array_equal(refining.prompt.mask, flooded[3]) and not refining.prompt.points[0].positive
    refining.prompt.validate(reference.shape)


# --- oracle -----------------------------------------------------------------------------------

def test_oracle_answers_with_the_components_under_the_prompt():
    reference, distractor = two_blobs()
    both = (reference | distractor)[5]
    first = components_under_prompt(both, SlicePrompt(0, 5, points=(Point(15, 14),)))
    assert np.array_equal(first, reference[5])
    boxed = components_under_prompt(both, SlicePrompt(0, 5, box=Box(25, 30, 39, 49)))
    assert np.array_equal(boxed, distractor[5])
    excluded = components_under_prompt(
        both, SlicePrompt(0, 5, box=Box(0, 0, 39, 49), points=(Point(30, 40, False),)))
    assert np.array_equal(excluded, reference[5])
    from_mask = components_under_prompt(both, SlicePrompt(0, 5, mask=reference[4]))
    assert np.array_equal(from_mask, reference[5])
    predictor = OraclePredictor(reference | distractor)
    predictor.predict(5, SlicePrompt(0, 5, points=(Point(15, 14),)))
    predictor.predict(5, SlicePrompt(0, 5, points=(Point(15, 14),)))
    assert predictor.slices_encoded == 1


def test_oracle_in_the_sliding_window_recovers_the_prompted_object_only():
    reference, distractor = two_blobs()
    volume = Volume(np.zeros(reference.shape, np.float32))
    session = SlicewiseSession(volume, 0, OraclePredictor(reference | distractor), SlicewiseOptions(projection="mask"))
    session.add_prompt(1, SlicePrompt(0, 7, points=(Point(15, 14),)))
    result = session.propagate(1, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
    assert np.array_equal(result.mask, reference)
    assert result.slices_encoded == 7 + 2  # the 7 other object slices and one empty slice past each end


# --- datasets ---------------------------------------------------------------------------------

def write_pair(folder, image, label, spacing=(0.8, 0.9, 2.5), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)):
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    for name, array in (("image", image), ("label", label)):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(spacing)
        itk.SetDirection(direction)
        itk.SetOrigin((10.0, 20.0, 30.0))
        sitk.WriteImage(itk, str(folder / f"{name}.nii.gz"))


def test_folder_of_pairs_reads_geometry_and_targets(tmp_path):
    reference, distractor = two_blobs()
    label = reference.astype(np.uint8) + 2 * distractor.astype(np.uint8)
    image = (reference * 100.0 + distractor * 50.0).astype(np.float32)
    write_pair(tmp_path / "pairs" / "case_a", image, label)
    cases = open_dataset(tmp_path / "pairs")
    assert [c.name for c in cases] == ["case_a"]
    volume, labels = load_case(cases[0])
    assert np.allclose(volume.spacing_kji, (2.5, 0.9, 0.8))
    # NIfTI/ITK are LPS; RAS flips the first two axes; the i axis goes along -L = +R here
    assert np.allclose(volume.ijk_to_ras[:3, 0], (0.8, 0, 0)) and np.allclose(volume.ijk_to_ras[:3, 3], (-10, -20, 30))
    assert case_targets(cases[0], labels) == ["label_1", "label_2"]
    assert np.array_equal(target_mask(cases[0], labels, "label_1"), reference)
    with pytest.raises(InputError, match="No image/label pairs"):
        open_dataset(tmp_path)  # holds only a folder of folders


def test_label_groups_and_unknown_targets():
    case = Case("c", None, None, labels={1: "necrosis", 2: "edema"}, label_groups={"whole": [1, 2]})
    label = np.array([[[0, 1, 2]]])
    assert target_mask(case, label, "whole").tolist() == [[[False, True, True]]]
    assert target_mask(case, label, "edema").tolist() == [[[False, False, True]]]
    with pytest.raises(InputError, match="no structure 'liver'"):
        target_mask(case, label, "liver")
    with pytest.raises(InputError, match="Unknown case"):
        select_cases([case], ["d"])


# --- the pipeline -----------------------------------------------------------------------------

def test_evaluate_target_with_the_oracle_and_corrections():
    reference, distractor = two_blobs()
    volume = Volume(np.zeros(reference.shape, np.float32), np.diag([0.8, 0.8, 3.0, 1.0]))
    case = Case("synthetic", None, None, dataset="synthetic")
    config = EvaluationConfig(engine="oracle", rounds=2, engine_options={"projection": "box"},
                              propagation=PropagationOptions(stop=StopRule(min_area=1, patience=1)))
    rows, mask = evaluate_target(config, case, volume, reference, "blob")
    assert [r.round for r in rows] == [0, 1, 2]
    assert rows[0].dice == pytest.approx(1.0) and rows[-1].hd95_mm == 0.0
    assert rows[0].target_slices == 8 and rows[0].clicks == 1
    assert np.array_equal(mask, reference)
    assert rows[-1].correction.startswith("no error")


def test_sam3d_eval_on_a_real_case(shared_data, tmp_path):
    out = tmp_path / "eval"
    code = main(["eval", "--data", str(shared_data), "--cases", "mr_abdomen_totalseg", "--targets",
                 "kidney_left", "--engine", "oracle", "--rounds", "1", "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [r["round"] for r in rows] == ["0", "1"]
    assert float(rows[-1]["dice"]) > 0.95 and rows[0]["dataset"] == "TotalSegmentator"
    assert (out / "mr_abdomen_totalseg_kidney_left.png").stat().st_size > 1000
    assert "| all | all |" in (out / "summary.md").read_text(encoding="utf-8")


def test_weightfree_engine_evaluates_on_a_real_case(shared_data):
    case = select_cases(open_dataset(shared_data), ["mr_abdomen_totalseg"])[0]
    rows = evaluate_dataset(EvaluationConfig(engine="weightfree", rounds=1), [case], ["kidney_left"])
    assert len(rows) == 2 and rows[0].engine == "weightfree"
    assert 0.0 <= rows[-1].dice <= 1.0 and rows[-1].clicks >= 2
    assert rows[-1].slices_encoded <= rows[-1].n_slices


def test_litemedsam_and_its_published_pipeline_on_one_real_target(shared_data):
    """Ours (box, no z-range), upstream's 3D pipeline (z-range and middle box given) and the
    box-on-every-slice ceiling, with the real LiteMedSAM weights, on the same target."""
    case = select_cases(open_dataset(shared_data), ["ct_lesion_000002"])[0]
    dice = {}
    for engine in ("slicewise", "litemedsam-upstream", "litemedsam-oracle-box"):
        config = EvaluationConfig(engine=engine, model="litemedsam" if engine == "slicewise" else None, prompt="box")
        rows = evaluate_dataset(config, [case], ["lesion"])
        assert len(rows) == 1 and rows[0].engine == ("slicewise:litemedsam" if engine == "slicewise" else engine)
        dice[engine] = rows[0].dice
        if engine == "litemedsam-upstream":  # the reference figure of this target (../shared/reference)
            assert rows[0].dice == pytest.approx(0.9381, abs=1e-3)
            assert rows[0].slices_encoded == rows[0].target_slices
    assert dice["litemedsam-oracle-box"] > 0.9 and dice["slicewise"] > 0.85
