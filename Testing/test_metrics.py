"""Metrics against shapes whose answer is known analytically."""

import numpy as np
import pytest

from SAM3DSegmentLib.errors import InputError
from SAM3DSegmentLib.evaluation.metrics import (
    dice,
    evaluate_masks,
    hausdorff95,
    normalised_surface_dice,
    surface_distances,
    volume_diagonal_mm,
)


def cube(shape, low, high):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo, hi) for lo, hi in zip(low, high))] = True
    return mask


def test_dice_of_overlapping_cubes():
    a = cube((10, 10, 10), (0, 0, 0), (4, 4, 4))  # 64 voxels
    b = cube((10, 10, 10), (2, 0, 0), (6, 4, 4))  # 64 voxels, 32 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0


def test_shifted_cube_distances_follow_the_anisotropic_spacing():
    shape = (20, 20, 20)
    reference = cube(shape, (5, 5, 5), (12, 12, 12))
    shifted_k = cube(shape, (8, 5, 5), (15, 12, 12))  # 3 voxels along k
    shifted_i = cube(shape, (5, 5, 8), (12, 12, 15))  # 3 voxels along i
    spacing = (2.5, 1.0, 0.5)
    assert hausdorff95(shifted_k, reference, spacing) == pytest.approx(7.5)
    assert hausdorff95(shifted_i, reference, spacing) == pytest.approx(1.5)
    # every surface voxel is within 1.5 mm of the other surface along i, not along k
    assert normalised_surface_dice(shifted_i, reference, spacing, tolerance_mm=1.5) == pytest.approx(1.0)
    assert normalised_surface_dice(shifted_k, reference, spacing, tolerance_mm=1.5) < 0.9


def test_concentric_spheres_hd95_is_the_radius_difference():
    grid = np.indices((61, 61, 61)) - 30
    radius = np.sqrt((grid**2).sum(axis=0))
    inner, outer = radius <= 20, radius <= 25
    assert hausdorff95(inner, outer, 1.0) == pytest.approx(5.0, abs=1.0)
    pred_to_ref, ref_to_pred = surface_distances(inner, outer, 1.0)
    assert np.median(pred_to_ref) == pytest.approx(5.0, abs=1.0)
    # at a tolerance below the gap almost nothing is close; above it everything is
    assert normalised_surface_dice(inner, outer, 1.0, tolerance_mm=3.0) < 0.05
    assert normalised_surface_dice(inner, outer, 1.0, tolerance_mm=7.0) == 1.0


def test_identical_masks_are_perfect_even_when_touching_the_border():
    mask = cube((6, 8, 8), (0, 0, 0), (6, 3, 8))
    result = evaluate_masks(mask, mask, (3.0, 1.0, 1.0))
    assert (result.dice, result.nsd, result.hd95_mm) == (1.0, 1.0, 0.0)


def test_empty_masks_have_documented_values():
    shape, spacing = (4, 5, 6), (2.0, 1.0, 1.0)
    empty, full = np.zeros(shape, bool), cube(shape, (1, 1, 1), (3, 3, 3))
    both = evaluate_masks(empty, empty, spacing)
    assert (both.dice, both.nsd, both.hd95_mm) == (1.0, 1.0, 0.0)
    for prediction, reference in [(empty, full), (full, empty)]:
        one = evaluate_masks(prediction, reference, spacing)
        assert (one.dice, one.nsd) == (0.0, 0.0)
        assert one.hd95_mm == pytest.approx(volume_diagonal_mm(shape, spacing)) == pytest.approx(np.sqrt(64 + 25 + 36))
    assert evaluate_masks(empty, full, spacing).prediction_empty


def test_evaluate_masks_agrees_with_the_single_metrics():
    rng = np.random.default_rng(0)
    reference = cube((12, 16, 16), (2, 3, 3), (9, 12, 13))
    prediction = reference ^ (rng.random(reference.shape) < 0.05)
    spacing = (3.0, 0.8, 0.8)
    combined = evaluate_masks(prediction, reference, spacing, tolerance_mm=1.0)
    assert combined.dice == pytest.approx(dice(prediction, reference))
    assert combined.nsd == pytest.approx(normalised_surface_dice(prediction, reference, spacing, 1.0))
    assert combined.hd95_mm == pytest.approx(hausdorff95(prediction, reference, spacing))


def test_mismatched_shapes_and_bad_spacing_raise_clear_errors():
    with pytest.raises(InputError, match="same grid"):
        dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))
    with pytest.raises(InputError, match="positive"):
        hausdorff95(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1.0, 0.0, 1.0))
