"""LiteMedSAM's published 3D pipeline (evaluation.upstream_litemedsam): intensities, loop limits,
B's stop rule, views, and a reproduction of one reference figure on real data.

The loop tests use a tiny stand-in model whose mask is "bright pixels inside the box", so the
slices each protocol visits are known exactly; the others run LiteMedSAM's real weights.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from SAM3DSegmentLib.data.orientation import SliceView
from SAM3DSegmentLib.data.sample_volume import make_sample
from SAM3DSegmentLib.errors import InputError
from SAM3DSegmentLib.evaluation.upstream_litemedsam import (
    EmbeddingCache,
    StartBox,
    oracle_box_every_slice,
    upstream_3d_pipeline,
    upstream_intensities,
    upstream_middle,
)

torch = pytest.importorskip("torch")

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
REFERENCE_CSV = SHARED / "reference" / "litemedsam_upstream_pipeline.csv"


# --- intensities -------------------------------------------------------------------------------


def test_ct_intensities_clip_to_w400_l40_and_scale_the_clipped_range():
    ct = np.array([[[-1000, -160, 40, 100, 240, 3000]]], dtype=np.int16)
    # (x + 160) / 400 * 255, truncated: 40 -> 127.5 -> 127, 100 -> 165.75 -> 165
    assert upstream_intensities(ct, "CT").ravel().tolist() == [0, 0, 127, 165, 255, 255]
    # upstream scales by the clipped volume's own min/max, not the window's bounds
    narrow = np.array([[[0, 50, 100]]], dtype=np.int16)
    assert upstream_intensities(narrow, "CT").ravel().tolist() == [0, 127, 255]


def test_mr_intensities_use_nonzero_percentiles_and_keep_background_black():
    values = np.concatenate([np.zeros(50), -np.arange(1, 51), np.arange(1, 1001)]).astype(np.float32)
    mr = values.reshape(1, 1, -1)
    out = upstream_intensities(mr, "MR").ravel()
    low, high = np.percentile(values[values != 0], [0.5, 99.5])
    expected = ((np.clip(values, low, high) - low) / (high - low) * 255.0).astype(np.uint8)
    expected[values == 0] = 0
    assert out.dtype == np.uint8
    assert np.array_equal(out, expected)
    assert not out[:50].any() and out[-1] == 255
    # upstream's code takes the percentiles over voxels > 0: negatives all clip to black
    positive = upstream_intensities(mr, "MR-FLAIR", mr_voxels="positive").ravel()
    assert not positive[50:100].any() and out[50:100].any()


def test_uint8_volumes_are_kept_as_they_are_unless_asked():
    slab = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    assert np.array_equal(upstream_intensities(slab, "CT"), slab)
    windowed = upstream_intensities(slab, "CT", keep_uint8=False)
    assert windowed[0, 0, 0] == 0 and windowed.ravel()[-1] == 255 and not np.array_equal(windowed, slab)


def test_start_box_uses_upstreams_middle_slice():
    reference = np.zeros((20, 30, 30), dtype=bool)
    reference[4:12, 10:15, 5:9] = True  # z 4..11 -> int(3.5 + 4) = 7
    start = StartBox.from_reference(reference)
    assert (start.z_min, start.z_max, start.z_start) == (4, 11, 7) == (4, 11, upstream_middle(4, 11))
    assert (start.row0, start.col0, start.row1, start.col1) == (10, 5, 14, 8)
    with pytest.raises(InputError):
        StartBox.from_reference(np.zeros((3, 4, 4), dtype=bool))


# --- loop limits and stop rule, with a stand-in model ------------------------------------------


class _BoxAsPrompt:
    """Stand-in prompt encoder: the box itself is the 'sparse embedding'."""

    def __call__(self, points=None, boxes=None, masks=None):
        return boxes, None

    def get_dense_pe(self):
        return None


class BrightInBox(torch.nn.Module):
    """Stand-in for MedSAMLite: the 'embedding' is the normalised 256 px input, the mask its
    pixels > 0.5 inside the box. Counts the encoder calls."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the pipeline a device
        self.encoder_calls = 0
        self.prompt_encoder = _BoxAsPrompt()

    def image_encoder(self, x):
        self.encoder_calls += 1
        return x[:, :1]

    def mask_decoder(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                     multimask_output):
        x0, y0, x1, y1 = (int(v) for v in sparse_prompt_embeddings[0, 0])
        inside = torch.zeros_like(image_embeddings, dtype=torch.bool)
        inside[..., y0: y1 + 1, x0: x1 + 1] = True
        logits = torch.where(inside & (image_embeddings > 0.5), 10.0, -10.0)
        return logits, torch.ones(1, 1)


@pytest.fixture
def block_volume():
    """A bright block on slices 3..8 of 12 (background 50, block 200); blank slices are uniform."""
    image = np.full((12, 40, 48), 50, dtype=np.uint8)
    image[3:9, 10:26, 12:31] = 200
    return image, StartBox(z_min=3, z_max=8, z_start=5, row0=10, col0=12, row1=25, col1=30)


def test_a_encodes_upstreams_exclusive_range_or_the_inclusive_one(block_volume):
    image, start = block_volume
    model = BrightInBox()
    upstream = upstream_3d_pipeline(model, image, start)
    assert upstream.slices == (5, 6, 7, 4)  # range(5, 8) up, range(4, 3, -1) down: ends skipped
    assert upstream.slices_encoded == model.encoder_calls == 4
    assert np.flatnonzero(upstream.mask.any(axis=(1, 2))).tolist() == [4, 5, 6, 7]
    inclusive = upstream_3d_pipeline(model, image, start, limits="inclusive")
    assert inclusive.slices == (5, 6, 7, 8, 4, 3)
    assert np.flatnonzero(inclusive.mask.any(axis=(1, 2))).tolist() == [3, 4, 5, 6, 7, 8]
    block = np.zeros_like(inclusive.mask)
    block[3:9, 10:26, 12:31] = True
    # the start box is floored to the 256 frame (int(v * 256 / 48)), which loses the block's last
    # row and column on the start slice; the propagated boxes (+3 px) cover the block
    floored = block[5].copy()
    floored[25, :] = floored[:, 30] = False
    assert np.array_equal(inclusive.mask[5], floored)
    assert np.array_equal(np.delete(inclusive.mask, 5, axis=0), np.delete(block, 5, axis=0))


def test_a_falls_back_to_the_start_box_inside_the_z_range(block_volume):
    image, start = block_volume
    wide = StartBox(1, 10, 5, start.row0, start.col0, start.row1, start.col1)
    result = upstream_3d_pipeline(BrightInBox(), image, wide, limits="inclusive")
    assert result.slices == (5, 6, 7, 8, 9, 10, 4, 3, 2, 1)  # 10 and 1 follow an empty slice


def test_b_stops_after_the_slice_where_the_mask_vanishes(block_volume):
    image, start = block_volume
    model = BrightInBox()
    result = upstream_3d_pipeline(model, image, start, z_range=False)
    # 9 and 2 come out empty; 10 and 1 are never encoded
    assert result.slices == (5, 6, 7, 8, 9, 4, 3, 2)
    assert model.encoder_calls == 8
    assert np.flatnonzero(result.mask.any(axis=(1, 2))).tolist() == [3, 4, 5, 6, 7, 8]
    # a target touching the volume's ends: B runs to both ends
    full = np.full((5, 40, 48), 50, dtype=np.uint8)
    full[:, 10:26, 12:31] = 200
    whole = upstream_3d_pipeline(BrightInBox(), full, StartBox(0, 4, 2, 10, 12, 25, 30), z_range=False)
    assert sorted(whole.slices) == [0, 1, 2, 3, 4]


def test_cache_saves_encodes_but_not_the_count(block_volume):
    image, start = block_volume
    model, cache = BrightInBox(), EmbeddingCache(image)
    first = upstream_3d_pipeline(model, image, start, cache=cache)
    second = upstream_3d_pipeline(model, image, start, cache=cache)
    assert model.encoder_calls == 4 and first.slices_encoded == second.slices_encoded == 4
    assert np.array_equal(first.mask, second.mask)
    with pytest.raises(InputError):
        upstream_3d_pipeline(model, image.copy(), start, cache=cache)


def test_inputs_are_checked(block_volume):
    image, start = block_volume
    with pytest.raises(InputError):
        upstream_3d_pipeline(BrightInBox(), image.astype(np.int16), start)
    with pytest.raises(InputError):
        upstream_3d_pipeline(BrightInBox(), image, start, view=SliceView(shape=(48, 40)))


# --- real weights ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litemedsam():
    from SAM3DSegmentLib.errors import CheckpointError, DependencyError
    from SAM3DSegmentLib.models.builders import build_model
    from SAM3DSegmentLib.models.checkpoint_cache import resolve_checkpoint

    try:
        return build_model("litemedsam", resolve_checkpoint("litemedsam"), "cpu")
    except (CheckpointError, DependencyError) as exc:
        pytest.skip(f"LiteMedSAM weights unavailable: {exc}")


@pytest.fixture(scope="module")
def sample():
    case = make_sample(shape_kji=(16, 64, 80))
    image = upstream_intensities(case.volume.array, "CT")
    return image, case.truth, StartBox.from_reference(case.truth)


def test_real_model_encodes_only_the_z_range_and_segments_the_lesion(litemedsam, sample):
    image, truth, start = sample
    z = start.z_start
    narrow = StartBox(z - 1, z + 1, z, start.row0, start.col0, start.row1, start.col1)
    cache = EmbeddingCache(image)
    inclusive = upstream_3d_pipeline(litemedsam, image, narrow, limits="inclusive", cache=cache)
    assert inclusive.slices == (z, z + 1, z - 1)
    assert np.flatnonzero(inclusive.mask.any(axis=(1, 2))).tolist() == [z - 1, z, z + 1]
    upstream = upstream_3d_pipeline(litemedsam, image, narrow, cache=cache)
    assert upstream.slices == (z,)  # range(z, z + 1) up, range(z - 1, z - 1, -1) down
    assert np.flatnonzero(upstream.mask.any(axis=(1, 2))).tolist() == [z]
    assert np.array_equal(upstream.mask[z], inclusive.mask[z])
    on_start = inclusive.mask[z]
    dice = 2 * (on_start & truth[z]).sum() / (on_start.sum() + truth[z].sum())
    assert dice > 0.7, f"LiteMedSAM missed the synthetic lesion on its start slice (Dice {dice:.2f})"


def test_real_model_view_round_trips_to_array_coordinates(litemedsam, sample):
    image, truth, start = sample
    z = start.z_start
    narrow = StartBox(z - 1, z + 2, z, start.row0, start.col0, start.row1, start.col1)  # slices z, z + 1
    view = SliceView(shape=image.shape[1:], transpose=True, flip_rows=True)
    shown = np.stack([view.to_view(s) for s in image])  # the array pre-transformed to the view
    cache_view, cache_pre = EmbeddingCache(image), EmbeddingCache(shown)
    in_view = upstream_3d_pipeline(litemedsam, image, narrow, view=view, cache=cache_view)
    # the same run on the pre-transformed array, its mask transformed back
    box = view.box_to_view(narrow.box)
    pre_start = StartBox(narrow.z_min, narrow.z_max, z, int(box.row0), int(box.col0), int(box.row1), int(box.col1))
    pre = upstream_3d_pipeline(litemedsam, shown, pre_start, cache=cache_pre)
    back = np.stack([view.from_view(s) for s in pre.mask])
    assert in_view.slices == pre.slices == (z, z + 1)  # z + 1's box comes from z's mask, in the view
    assert in_view.mask.shape == image.shape and in_view.mask[z].any() and in_view.mask[z + 1].any()
    assert np.array_equal(in_view.mask, back)
    # the oracle shows the reference in the view too (same slices, same embeddings)
    reference = np.zeros_like(truth)
    reference[z] = truth[z]
    oracle_view = oracle_box_every_slice(litemedsam, image, reference, view=view, cache=cache_view)
    shown_reference = np.stack([view.to_view(s) for s in reference])
    oracle_pre = oracle_box_every_slice(litemedsam, shown, shown_reference, cache=cache_pre)
    assert oracle_view.slices == (z,)
    assert np.array_equal(oracle_view.mask[z], view.from_view(oracle_pre.mask[z]))


def test_real_case_oracle_reproduces_the_reference_figure(litemedsam):
    """mr_brain_tumour_pyradiomics (raw): the oracle's Dice / NSD as in the reference CSV."""
    if not (DATA / "cases.json").is_file() or not REFERENCE_CSV.is_file():
        pytest.skip(f"real data or reference figures not found under {SHARED}")
    from SAM3DSegmentLib.evaluation.datasets import (
        load_case,
        open_dataset,
        select_cases,
        target_mask,
    )
    from SAM3DSegmentLib.evaluation.metrics import evaluate_masks

    case = select_cases(open_dataset(DATA), ["mr_brain_tumour_pyradiomics"])[0]
    volume, label = load_case(case)
    truth = target_mask(case, label, "tumour")
    image = upstream_intensities(volume.array, case.modality)
    result = oracle_box_every_slice(litemedsam, image, truth)
    with REFERENCE_CSV.open(newline="", encoding="utf-8") as handle:
        row = next(r for r in csv.DictReader(handle)
                   if (r["case"], r["target"], r["orientation"]) == (case.name, "tumour", "raw"))
    metrics = evaluate_masks(result.mask, truth, volume.spacing_kji)
    assert result.slices_encoded == int(row["gt_slices"])
    assert metrics.dice == pytest.approx(float(row["dice_oracle"]), abs=2e-4)
    assert metrics.nsd == pytest.approx(float(row["nsd_oracle"]), abs=2e-4)
