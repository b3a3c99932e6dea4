"""SAM / MedSAM slice predictor: parity with segment_anything.SamPredictor, preprocessing,
lazy encoding and the embedding cache, propagation with a real (randomly initialised) model.

Most tests use a small SAM built from segment-anything's own classes (ImageEncoderViT,
PromptEncoder, MaskDecoder, TwoWayTransformer, Sam) at 128 px with a 2-block encoder: TEST-ONLY,
so that encodings cost milliseconds. One test runs the official ViT-B builder at 1024 px and
encodes a single slice (about 20-35 s on a CPU core).
"""

from functools import partial

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide

from SAM3DSegmentLib.data.intensity import WindowSpec, window_volume
from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt, box_xyxy
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.engines.sam_slice_predictor import (
    SamSlicePredictor,
    open_sam_session,
)
from SAM3DSegmentLib.engines.session import PropagationOptions, StopRule
from SAM3DSegmentLib.engines.slicewise import SlicewiseOptions
from SAM3DSegmentLib.errors import (
    CheckpointError,
    InputError,
    ModelOutOfMemoryError,
    PromptError,
)
from SAM3DSegmentLib.models.registry import ModelSpec, get_spec

TINY = 128
TINY_SAM_SPEC = ModelSpec(  # test-only: the small model below
    name="test_tiny_sam", family="sam", builder="vit_b", input_size=TINY, resize="longest_side",
    normalisation="imagenet", url="", filename="",
)
TINY_MEDSAM_SPEC = ModelSpec(  # test-only: MedSAM's preprocessing on the small model
    name="test_tiny_medsam", family="sam", builder="vit_b", input_size=TINY, resize="square",
    normalisation="minmax", url="", filename="",
)


def tiny_sam(seed=0) -> Sam:
    """A small SAM from the official classes (TEST-ONLY: 128 px, 2 encoder blocks)."""
    torch.manual_seed(seed)
    grid = TINY // 16
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=TINY, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            window_size=4, global_attn_indexes=(1,), out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(TINY, TINY), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=512, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_sam()


def asymmetric_volume(n_slices=5, rows=40, cols=58):
    """A bright off-centre rectangle and a gradient: no symmetry between rows and cols.

    Stored in the radiological view (i toward patient left, j toward posterior), so the model
    sees the raw array slices along axis 0 and the official predictor can be fed the same ones."""
    rng = np.random.default_rng(3)
    array = rng.normal(0, 5, (n_slices, rows, cols)).astype(np.float32)
    array += np.linspace(0, 40, cols)[None, None, :]
    array[:, 8:20, 30:52] += 150
    return Volume(array, np.diag([-1.0, -1.0, 1.0, 1.0]), name="asymmetric")


def sam_predictor_for(model, rgb):
    official = SamPredictor(model)
    official.set_image(rgb)
    return official


def test_click_and_box_match_the_official_sam_predictor(model):
    volume = asymmetric_volume()
    ours = SamSlicePredictor(volume, 0, model, TINY_SAM_SPEC, device="cpu")
    assert ours.view.is_identity
    rgb = ours.slice_rgb(2)
    official = sam_predictor_for(model, rgb)
    assert torch.equal(ours.embedding(2), official.features)

    click = SlicePrompt(0, 2, points=(Point(row=12, col=45),))
    result = ours.predict(2, click)
    masks, scores, low_res = official.predict(np.array([[45.0, 12.0]]), np.array([1]), multimask_output=True)
    best = int(np.argmax(scores))
    assert np.array_equal(result.mask, masks[best])
    assert result.score == pytest.approx(float(scores[best]), abs=1e-6)
    np.testing.assert_allclose(result.extra["low_res_logits"][0, 0].numpy(), low_res[best], atol=1e-5)
    swapped, _, swapped_low = official.predict(np.array([[12.0, 45.0]]), np.array([1]), multimask_output=True)
    assert not np.allclose(swapped_low, low_res, atol=1e-3)  # a row/col swap would be caught

    box = SlicePrompt(0, 2, box=Box(row0=6, col0=28, row1=22, col1=54), points=(Point(30, 10, False),))
    result = ours.predict(2, box)
    masks, scores, low_res = official.predict(
        np.array([[10.0, 30.0]]), np.array([0]), box=np.array([28.0, 6.0, 54.0, 22.0]), multimask_output=False
    )
    assert np.array_equal(result.mask, masks[0])
    assert result.score == pytest.approx(float(scores[0]), abs=1e-6)
    np.testing.assert_allclose(result.extra["low_res_logits"][0, 0].numpy(), low_res[0], atol=1e-5)
    assert 0.0 <= result.stability <= 1.0
    assert ours.slices_encoded == 1


def test_previous_logits_are_the_mask_input(model):
    volume = asymmetric_volume()
    ours = SamSlicePredictor(volume, 0, model, TINY_SAM_SPEC, device="cpu")
    first = ours.predict(2, SlicePrompt(0, 2, box=Box(6, 28, 22, 54)))
    official = sam_predictor_for(model, ours.slice_rgb(3))
    follow = ours.predict(3, SlicePrompt(0, 3, mask=first.mask), previous=first)
    masks, scores, _ = official.predict(mask_input=first.extra["low_res_logits"][0].numpy(), multimask_output=False)
    assert np.array_equal(follow.mask, masks[0]) and follow.score == pytest.approx(float(scores[0]), abs=1e-6)


def test_official_vit_b_parity_on_one_encoded_slice():
    """The official ViT-B builder at 1024 px: our input tensor equals SamPredictor's, and with the
    one encoding our click and box masks equal SamPredictor's (its encoder is the same module on
    the same input, so its features are set from ours to encode once)."""
    from SAM3DSegmentLib.models.builders import build_model

    torch.manual_seed(0)
    spec = get_spec("sam_vit_b")
    vit_b = build_model(spec, None, "cpu")
    volume = asymmetric_volume(n_slices=3)
    ours = SamSlicePredictor(volume, 0, vit_b, spec, device="cpu")
    rgb = ours.slice_rgb(1)
    transform = ResizeLongestSide(1024)
    official_input = vit_b.preprocess(torch.as_tensor(transform.apply_image(rgb)).permute(2, 0, 1)[None])
    assert torch.equal(ours.preprocess(rgb), official_input)

    click = ours.predict(1, SlicePrompt(0, 1, points=(Point(row=14, col=40),)))
    official = SamPredictor(vit_b)
    official.original_size = rgb.shape[:2]
    official.input_size = transform.get_preprocess_shape(*rgb.shape[:2], 1024)
    official.features, official.is_image_set = ours.embedding(1), True
    masks, scores, _ = official.predict(np.array([[40.0, 14.0]]), np.array([1]))
    assert np.array_equal(click.mask, masks[int(np.argmax(scores))])
    boxed = ours.predict(1, SlicePrompt(0, 1, box=Box(6, 28, 22, 54)))
    masks, _, _ = official.predict(box=box_xyxy(Box(6, 28, 22, 54)), multimask_output=False)
    assert np.array_equal(boxed.mask, masks[0])
    assert ours.slices_encoded == 1


def test_medsam_preprocessing_follows_medsam_inference(model):
    """MedSAM's own recipe: 3-channel uint8 -> bicubic resize to a square -> uint8 -> min-max to
    [0, 1] -> encoder; box scaled by size/[W, H, W, H]; sigmoid of the upsampled logits > 0.5."""
    from skimage import transform

    volume = asymmetric_volume()
    ours = SamSlicePredictor(volume, 0, model, TINY_MEDSAM_SPEC, device="cpu")
    rgb = ours.slice_rgb(1)
    square = transform.resize(rgb, (TINY, TINY), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    square = (square - square.min()) / np.clip(square.max() - square.min(), 1e-8, None)
    image = torch.tensor(square).float().permute(2, 0, 1)[None]
    torch.testing.assert_close(ours.preprocess(rgb), image)

    rows, cols = rgb.shape[:2]
    box = Box(6, 28, 22, 54)
    box_sq = box_xyxy(box) / np.array([cols, rows, cols, rows]) * TINY
    with torch.inference_mode():
        features = model.image_encoder(image)
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.as_tensor(box_sq[None]), masks=None)
        low, _ = model.mask_decoder(features, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
        probability = torch.nn.functional.interpolate(torch.sigmoid(low), (rows, cols), mode="bilinear")
    expected = (probability[0, 0] > 0.5).numpy()
    assert np.array_equal(ours.predict(1, SlicePrompt(0, 1, box=box)).mask, expected)


def test_three_slice_window_uses_neighbours_with_replicated_edges(model):
    volume = asymmetric_volume(n_slices=4)
    windowed = window_volume(volume.array, WindowSpec(), volume.modality)
    ours = SamSlicePredictor(volume, 0, model, TINY_SAM_SPEC, device="cpu", window_mode="three_slice")
    assert np.array_equal(ours.slice_rgb(0), np.stack([windowed[0], windowed[0], windowed[1]], axis=2))
    assert np.array_equal(ours.slice_rgb(3), np.stack([windowed[2], windowed[3], windowed[3]], axis=2))
    along_i = SamSlicePredictor(volume, 2, model, TINY_SAM_SPEC, device="cpu", orientation="array")
    assert np.array_equal(along_i.slice_rgb(5)[:, :, 0], windowed[:, :, 5])


def test_propagation_encodes_each_reached_slice_once_and_previews_without_encoding(model):
    volume = asymmetric_volume(n_slices=8)
    session = open_sam_session(volume, 0, model, TINY_SAM_SPEC, device="cpu", projection="box")
    predictor = session.predictor
    session.add_prompt(1, SlicePrompt(0, 4, box=Box(6, 28, 22, 54)))
    assert predictor.slices_encoded == 1
    preview = session.add_prompt(1, SlicePrompt(0, 4, points=(Point(30, 10, False),)))
    assert predictor.slices_encoded == 1 and preview.mask.shape == (40, 58)  # decoder only

    keep_going = PropagationOptions(slice_range=(2, 6), stop=StopRule(min_area=0, min_score=None))
    ticks = []
    result = session.propagate(1, keep_going, progress=lambda done, total, index: ticks.append(index))
    assert result.slices_computed == [2, 3, 5, 6] and result.slices_encoded == 4
    assert predictor.slices_encoded == 5 and sorted(i for i in ticks if i >= 0) == [2, 3, 5, 6]
    assert result.engine == "slicewise:test_tiny_sam"

    session.set_slice_mask(1, 6, np.ones((40, 58), bool))
    again = session.propagate(1, keep_going)
    assert again.slices_computed == [5] and again.slices_encoded == 0
    assert again.mask[6].all()


def test_stop_rule_ends_a_run_on_a_real_model_and_cache_budget_forces_reencoding(model):
    volume = asymmetric_volume(n_slices=8)
    one_embedding = 256 * (TINY // 16) ** 2 * 4
    session = open_sam_session(volume, 0, model, TINY_SAM_SPEC, device="cpu",
                               cache_budget_bytes=2 * one_embedding)
    session.add_prompt(1, SlicePrompt(0, 4, box=Box(6, 28, 22, 54)))
    impossible = StopRule(min_area=40 * 58 + 1, patience=2)  # no slice can be this large
    result = session.propagate(1, PropagationOptions(stop=impossible))
    assert result.slices_computed == [2, 3, 5, 6] and result.slices_with_object == [4]
    assert set(result.stop_reasons) == {"4-1", "4+1"}
    assert len(session.predictor.cache) == 2
    session.add_prompt(1, SlicePrompt(0, 2, box=Box(6, 28, 22, 54)))  # evicted: encoded again
    assert session.predictor.slices_encoded == 6


def test_real_case_propagation_stays_within_its_range(model, shared_data, cases):
    from SAM3DSegmentLib.data.volume_files import read_volume

    case = next(c for c in cases if c["modality"] == "CT")
    volume = read_volume(shared_data / case["case"] / "image.nii.gz")
    volume.modality = "CT"
    session = open_sam_session(volume, 0, model, TINY_SAM_SPEC, device="cpu", projection="mask")
    middle = volume.shape[0] // 2
    rows, cols = volume.shape[1:]
    session.add_prompt(1, SlicePrompt(0, middle, points=(Point(rows // 2, cols // 3),)))
    result = session.propagate(1, PropagationOptions(slice_range=(middle - 2, middle + 2)))
    assert result.mask.shape == volume.shape
    assert set(result.slices_computed) <= set(range(middle - 2, middle + 3))
    assert session.slices_encoded_total == 1 + len(result.slices_computed)


class FailingEncoder(torch.nn.Module):
    """A test double of an image encoder that runs out of memory (no model output is faked)."""

    img_size = TINY

    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_errors_tell_the_user_what_to_do(model):
    volume = asymmetric_volume()
    with pytest.raises(CheckpointError, match="sam2 engine"):
        SamSlicePredictor(volume, 0, model, get_spec("sam2.1_hiera_tiny"), device="cpu")
    with pytest.raises(CheckpointError, match="1024 px"):
        SamSlicePredictor(volume, 0, model, get_spec("sam_vit_b"), device="cpu")
    with pytest.raises(InputError, match="uint8"):
        SamSlicePredictor(volume.array, 0, model, TINY_SAM_SPEC, device="cpu")
    with pytest.raises(InputError, match="window_mode"):
        SamSlicePredictor(volume, 0, model, TINY_SAM_SPEC, device="cpu", window_mode="five")
    with pytest.raises(InputError, match="Unknown option"):
        open_sam_session(volume, 0, model, TINY_SAM_SPEC, device="cpu", projection="box", margin=3)
    predictor = SamSlicePredictor(volume, 0, model, TINY_SAM_SPEC, device="cpu")
    with pytest.raises(PromptError, match="outside"):
        predictor.slice_rgb(9)

    broken = tiny_sam()
    broken.image_encoder = FailingEncoder()
    failing = SamSlicePredictor(volume, 0, broken, TINY_SAM_SPEC, device="cpu")
    with pytest.raises(ModelOutOfMemoryError, match="smaller embedding cache budget"):
        failing.predict(1, SlicePrompt(0, 1, box=Box(6, 28, 22, 54)))
    assert failing.slices_encoded == 0


def test_session_options_are_passed_through(model):
    session = open_sam_session(asymmetric_volume(), 0, model, TINY_SAM_SPEC, device="cpu",
                               options=SlicewiseOptions(projection="points", fill_holes=True))
    assert session.options.projection == "points" and session.options.fill_holes


class EncoderRunningOutOfMemory(torch.nn.Module):
    """A test double wrapping the real encoder: it runs ``allowed`` times, then runs out of memory."""

    def __init__(self, encoder, allowed):
        super().__init__()
        self.encoder, self.allowed, self.img_size = encoder, allowed, encoder.img_size

    def forward(self, x):
        if self.allowed <= 0:
            raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")
        self.allowed -= 1
        return self.encoder(x)


def test_failed_propagation_leaves_the_mask_unchanged():
    model = tiny_sam()
    model.image_encoder = EncoderRunningOutOfMemory(model.image_encoder, allowed=3)
    session = open_sam_session(asymmetric_volume(n_slices=8), 0, model, TINY_SAM_SPEC, device="cpu")
    session.add_prompt(1, SlicePrompt(0, 4, box=Box(6, 28, 22, 54)))
    keep_going = StopRule(min_area=0, min_score=None)
    first = session.propagate(1, PropagationOptions(slice_range=(3, 5), stop=keep_going)).mask.copy()
    with pytest.raises(ModelOutOfMemoryError, match="--device cpu"):
        session.propagate(1, PropagationOptions(slice_range=(0, 7), stop=keep_going))
    assert np.array_equal(session.mask(1), first)
