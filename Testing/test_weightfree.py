"""The weight-free random-walker predictor and engine, on synthetic volumes and real data."""

from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt, prompt_from_voxels
from SAM3DSegmentLib.data.sample_volume import make_sample
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.engines.choice import open_weightfree_session
from SAM3DSegmentLib.engines.session import PropagationOptions
from SAM3DSegmentLib.engines.slicewise import SlicePredictor
from SAM3DSegmentLib.engines.weightfree import (
    RandomWalkerOptions,
    RandomWalkerPredictor,
)
from SAM3DSegmentLib.errors import InputError, PropagationCancelled
from SAM3DSegmentLib.evaluation.metrics import dice


@pytest.fixture(scope="module")
def sample():
    return make_sample(shape_kji=(28, 96, 112))


def square_volume(spacing_ijk=(1.0, 1.0, 1.0), noise=5.0, seed=0) -> Volume:
    """A bright 24 x 40 px rectangle (rows 20..43, cols 20..59) on a dark background, 6 slices."""
    rng = np.random.default_rng(seed)
    array = np.full((6, 64, 80), 0.0, dtype=np.float32)
    array[:, 20:44, 20:60] = 100.0
    array += rng.normal(0, noise, array.shape).astype(np.float32)
    matrix = np.diag([*spacing_ijk, 1.0])
    return Volume(array, matrix, "square", "MR")


def assert_edges_within(mask: np.ndarray, edges: tuple[int, int, int, int], pixels: int) -> None:
    """The mask's bounding box (row0, row1, col0, col1) is within ``pixels`` of ``edges``."""
    rows, cols = np.nonzero(mask)
    found = (rows.min(), rows.max(), cols.min(), cols.max())
    assert all(abs(a - b) <= pixels for a, b in zip(found, edges)), (found, edges)


def test_is_a_slice_predictor(sample):
    predictor = RandomWalkerPredictor(sample.volume, 0)
    assert isinstance(predictor, SlicePredictor)


def test_one_click_segments_the_lesion_slice(sample):
    k, j, i = sample.click_kji
    predictor = RandomWalkerPredictor(sample.volume, 0)
    result = predictor.predict(k, SlicePrompt(0, k, points=(Point(j, i),)))
    assert result.mask[j, i]
    assert dice(result.mask, sample.truth[k]) > 0.8
    assert 0.5 < result.score <= 1.0
    assert predictor.slices_encoded == 1


def test_box_prompt_segments_the_boxed_object_only():
    volume = square_volume()
    volume.array[:, 10:50, 66:76] += 100.0  # a second bright object, outside the box
    predictor = RandomWalkerPredictor(volume, 0)
    result = predictor.predict(2, SlicePrompt(0, 2, box=Box(16, 16, 47, 63)))
    assert not result.mask[:, 64:].any() and not result.mask[:16].any()
    truth = np.zeros((64, 80), dtype=bool)
    truth[20:44, 20:60] = True
    assert dice(result.mask, truth) > 0.8
    assert_edges_within(result.mask, (20, 43, 20, 59), 2)


def test_exclude_click_removes_what_it_touches():
    volume = square_volume()
    predictor = RandomWalkerPredictor(volume, 0)
    include = SlicePrompt(0, 3, points=(Point(31, 25),))
    alone = predictor.predict(3, include)
    assert alone.mask[31, 55]  # the whole rectangle
    exclude = SlicePrompt(0, 3, points=(Point(31, 25), Point(31, 55, positive=False)))
    with_exclude = predictor.predict(3, exclude)
    assert not with_exclude.mask[31, 55]
    assert with_exclude.mask[31, 25]
    assert with_exclude.mask.sum() < alone.mask.sum()


def test_mask_prompt_refines_to_the_image_edges():
    volume = square_volume()
    predictor = RandomWalkerPredictor(volume, 0)
    rough = np.zeros((64, 80), dtype=bool)
    rough[23:41, 23:56] = True  # 3-4 px inside the rectangle's edges (the ring is 5 mm)
    result = predictor.predict(1, SlicePrompt(0, 1, mask=rough))
    truth = np.zeros((64, 80), dtype=bool)
    truth[20:44, 20:60] = True
    assert dice(result.mask, truth) > 0.8
    assert_edges_within(result.mask, (20, 43, 20, 59), 2)


def test_click_region_is_physically_sized():
    """With clicks only, the ROI reaches click_roi_radius_mm: in a uniform image the mask is bounded
    by that radius in millimetres, also with anisotropic pixels."""
    rng = np.random.default_rng(1)
    array = (100.0 + rng.normal(0, 2, (3, 120, 120))).astype(np.float32)
    volume = Volume(array, np.diag([0.5, 1.0, 3.0, 1.0]), "uniform", "MR")  # i 0.5 mm, j 1 mm
    options = RandomWalkerOptions(click_roi_radius_mm=20.0, click_refinements=0)
    result = RandomWalkerPredictor(volume, 0, options=options).predict(1, SlicePrompt(0, 1, points=(Point(60, 60),)))
    rows, cols = np.nonzero(result.mask)
    assert rows.max() - rows.min() <= 2 * 20 + 2  # 20 mm at 1 mm per row
    assert cols.max() - cols.min() <= 2 * 40 + 2  # 20 mm at 0.5 mm per column
    assert cols.max() - cols.min() > rows.max() - rows.min()


def test_raw_intensities_work_too():
    predictor = RandomWalkerPredictor(square_volume(), 0, window=None)
    result = predictor.predict(2, SlicePrompt(0, 2, points=(Point(30, 40),)))
    truth = np.zeros((64, 80), dtype=bool)
    truth[20:44, 20:60] = True
    assert dice(result.mask, truth) > 0.8
    assert_edges_within(result.mask, (20, 43, 20, 59), 2)


def test_propagation_finds_the_lesion_and_stops_at_its_ends(sample):
    session = open_weightfree_session(sample.volume, 0)
    session.add_prompt(1, prompt_from_voxels(0, [sample.click_kji]))
    result = session.propagate(1, PropagationOptions())
    assert result.engine == "weightfree"
    assert dice(result.mask, sample.truth) > 0.8
    truth_slices = np.flatnonzero(sample.truth.any(axis=(1, 2)))
    found = result.slices_with_object
    assert truth_slices[0] - 2 <= found[0] and found[-1] <= truth_slices[-1] + 2
    assert result.stop_reasons  # both runs ended by the stop rule, not the volume's end
    assert result.slices_encoded < sample.volume.shape[0]


def test_corrected_slice_recomputes_only_its_neighbourhood(sample):
    session = open_weightfree_session(sample.volume, 0)
    k = sample.click_kji[0]
    session.add_prompt(1, prompt_from_voxels(0, [sample.click_kji]))
    session.propagate(1)
    session.set_slice_mask(1, k + 2, sample.truth[k + 2])
    again = session.propagate(1)
    assert set(again.slices_computed) <= set(range(k + 1, sample.volume.shape[0]))
    assert np.array_equal(again.mask[k + 2], sample.truth[k + 2])


def test_cancelled_propagation_changes_nothing(sample):
    session = open_weightfree_session(sample.volume, 0)
    session.add_prompt(1, prompt_from_voxels(0, [sample.click_kji]))
    calls = []

    def cancel_on_third_slice() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(PropagationCancelled):
        session.propagate(1, cancel=cancel_on_third_slice)
    assert session.mask(1) is None
    assert len(calls) == 3


def test_unknown_option_is_a_clear_error(sample):
    with pytest.raises(InputError, match="Unknown option"):
        open_weightfree_session(sample.volume, 0, betta=3)


def test_kidney_on_real_ct(shared_data):
    """One click in the right kidney of the upper-abdomen CT (measured Dice 0.74; floor 0.6)."""
    from scipy import ndimage

    from SAM3DSegmentLib.data.volume_files import read_label_map, read_volume

    folder = shared_data / "ct_upper_abdomen_totalseg"
    volume = read_volume(folder / "image.nii.gz", modality="CT")
    truth = read_label_map(folder / "label.nii.gz", volume) == 2  # kidney_right
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    depth = ndimage.distance_transform_edt(truth[k])
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    session = open_weightfree_session(volume, 0)
    session.add_prompt(1, SlicePrompt(0, k, points=(Point(row, col),)))
    result = session.propagate(1)
    assert dice(result.mask, truth) > 0.6


# --- the two-label random walker (engines/random_walk.py) against skimage's -----------------------


def noisy_disk_and_seeds(seed: int, rows: int = 60, cols: int = 80):
    """A bright disk on a dark, noisy background; a few foreground seeds inside, background seeds
    along the border and in a corner block."""
    rng = np.random.default_rng(seed)
    rr, cc = np.ogrid[:rows, :cols]
    disk = (rr - rows / 2) ** 2 + (cc - cols / 2) ** 2 < (rows / 4) ** 2
    image = (np.where(disk, 180.0, 60.0) + rng.normal(0, 2, (rows, cols))).astype(np.float32)
    seeds = np.zeros((rows, cols), dtype=np.int32)
    seeds[rows // 2 - 2: rows // 2 + 3, cols // 2 - 2: cols // 2 + 3] = 1
    seeds[0, :] = seeds[-1, :] = seeds[:, 0] = seeds[:, -1] = 2
    seeds[:8, :8] = 2
    return image, seeds


@pytest.mark.filterwarnings("ignore:The probability range is outside")  # skimage's, within its tolerance
@pytest.mark.parametrize("seed, spacing", [(0, (1.0, 1.0)), (1, (1.0, 2.5)), (2, (3.0, 1.0))])
def test_foreground_probability_equals_skimage_random_walker(seed, spacing):
    from skimage.segmentation import random_walker

    from SAM3DSegmentLib.engines.random_walk import foreground_probability

    image, seeds = noisy_disk_and_seeds(seed)
    ours = foreground_probability(image, seeds, beta=130.0, spacing=spacing, tol=1e-3)
    theirs = random_walker(image, seeds, beta=130.0, mode="cg_j", tol=1e-3, return_full_prob=True, spacing=spacing)[0]
    assert ours.dtype == np.float32 and ours.shape == image.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert np.array_equal(ours > 0.5, theirs > 0.5)
    assert np.all(ours[seeds == 1] == 1) and np.all(ours[seeds == 2] == 0)
    assert 0.12 < (ours > 0.5).mean() < 0.18  # the disk (0.147 of the image), not the seeds alone


def test_foreground_probability_without_background_or_free_pixels():
    from SAM3DSegmentLib.engines.random_walk import foreground_probability

    image, seeds = noisy_disk_and_seeds(0)
    only_foreground = np.where(seeds == 2, 0, seeds)
    assert np.all(foreground_probability(image, only_foreground, 130.0) == 1)
    all_seeded = np.where(seeds == 0, 2, seeds)
    assert np.array_equal(foreground_probability(image, all_seeded, 130.0), (all_seeded == 1).astype(np.float32))
    with pytest.raises(ValueError, match="same 2D shape"):
        foreground_probability(image, seeds[:-1], 130.0)
