"""The benchmark pipeline runs end to end on small random models and its figures are consistent.

Models are randomly initialised through the official builders/classes at 256 px (test-only
configurations, with the registry entry's input size changed to match). No timing is asserted.
"""

from dataclasses import replace
from functools import partial

import numpy as np
import pytest

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.errors import InputError
from SAM3DSegmentLib.evaluation.baselines import (
    sam2_jpeg_video_pipeline,
    sam_box_chaining_pipeline,
)
from SAM3DSegmentLib.evaluation.benchmark import (
    BenchReport,
    PeakRss,
    benchmark_engine,
    correction_prompt,
    load_bench_case,
)
from SAM3DSegmentLib.models.registry import get_spec

torch = pytest.importorskip("torch")
SIZE = 256


def tiny_volume():
    """Six 48 x 56 slices with a bright block on slices 1..4."""
    array = np.full((6, 48, 56), -100.0, np.float32)
    reference = np.zeros(array.shape, bool)
    reference[1:5, 14:30, 18:40] = True
    array[reference] = 60.0
    return Volume(array, np.diag([0.8, 0.8, 3.0, 1.0]), "tiny", "CT"), reference


@pytest.fixture(scope="module")
def tiny_sam2():
    from SAM3DSegmentLib.models.builders import build_model

    torch.manual_seed(0)
    model = build_model("sam2.1_hiera_tiny", device="cpu", video=True, overrides=[f"++model.image_size={SIZE}"])
    return model, replace(get_spec("sam2.1_hiera_tiny"), input_size=SIZE)


@pytest.fixture(scope="module")
def tiny_sam():
    """segment-anything's own classes, a 2-block ViT at 256 px (test-only size)."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        depth=2, embed_dim=64, img_size=SIZE, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=4,
        out_chans=256,
    )
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(SIZE // 16, SIZE // 16),
                                   input_image_size=(SIZE, SIZE), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=512, num_heads=8), transformer_dim=256, iou_head_depth=3,
        iou_head_hidden_dim=256)
    model = Sam(encoder, prompt_encoder, decoder, pixel_mean=[123.675, 116.28, 103.53],
                pixel_std=[58.395, 57.12, 57.375]).eval()
    return model, replace(get_spec("sam_vit_b"), input_size=SIZE)


def check_report(report: BenchReport, n_slices: int):
    lines = "\n".join(report.lines())
    for figure in ("slices encoded, ours", "ratio ours/baseline", "overhead", "re-propagation",
                   "preview latency", "peak RSS"):
        assert figure in lines
    for r in report.repeats:
        # ours encodes only the target range (+ patience); the baseline encodes every slice
        assert r.first_encoded <= min(n_slices, report.extent + 2 * report.patience)
        assert r.baseline_encoded >= n_slices
        assert r.repropagation_encoded == 0  # embeddings are cached
        assert 0 < r.repropagation_slices_computed < r.first_slices_computed
        assert r.first_seconds > 0 and r.baseline_seconds > 0 and r.encoder_seconds > 0


def test_sam2_engine_against_the_jpeg_video_predictor_pipeline(tiny_sam2):
    model, spec = tiny_sam2
    volume, reference = tiny_volume()
    report = benchmark_engine("sam2", model, spec, volume, reference, case_name="tiny", target="block",
                              repeats=1, patience=1)
    assert report.extent == 4
    check_report(report, volume.n_slices(0))
    assert not hasattr(model, "forward_image") or "forward_image" not in vars(model)  # counter removed


def test_slicewise_engine_against_sam_box_chaining(tiny_sam):
    model, spec = tiny_sam
    volume, reference = tiny_volume()
    report = benchmark_engine("slicewise", model, spec, volume, reference, repeats=1, patience=1)
    check_report(report, volume.n_slices(0))


def test_baselines_cover_every_slice(tiny_sam, tiny_sam2):
    image = np.zeros((5, 40, 48), np.uint8)
    image[:, 10:30, 12:36] = 200
    prompt = SlicePrompt(0, 2, box=Box(10, 12, 29, 35))
    chained = sam_box_chaining_pipeline(tiny_sam[0], image, 0, prompt)
    assert chained.slices_encoded == 5 and chained.mask.shape == image.shape
    video = sam2_jpeg_video_pipeline(tiny_sam2[0], image, 0, SlicePrompt(0, 2, points=(Point(20, 24),)))
    assert video.slices_encoded >= 5 and video.mask.shape == image.shape


def test_correction_prompt_lies_inside_the_computed_range():
    _, reference = tiny_volume()
    fix = correction_prompt(reference, 0, anchor=2, lo=0, hi=5, spacing=(3.0, 0.8, 0.8))
    assert fix.index == 3 and fix.points[0].positive and reference[3, fix.points[0].row, fix.points[0].col]


def test_peak_rss_sees_an_allocation():
    import mmap

    size = 64 * 2**20
    with PeakRss() as memory:  # fresh pages: a freed heap block reused by numpy would add nothing
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
    block.close()
    assert memory.increase_mb > 30


def test_bench_slab_keeps_the_target_and_the_geometry(shared_data):
    case, volume, reference, slab = load_bench_case(shared_data, "ct_upper_abdomen_totalseg", "kidney_left", 10)
    assert volume.n_slices(0) == 10 and reference.any() and "--max-slices 10" in slab
    assert np.allclose(volume.spacing_kji, (3.0, 3.0, 3.0))
    with pytest.raises(InputError, match="Unknown case"):
        load_bench_case(shared_data, "no_such_case", "x", None)
