"""The SAM 2 memory engine on a randomly initialised official SAM 2.1 tiny model.

The model is built once by ``sam2.build_sam.build_sam2_video_predictor`` from the official
``configs/sam2.1/sam2.1_hiera_t.yaml`` with the hydra override ``++model.image_size=256`` (the
official code supports other input sizes: RoPE tables are recomputed for the feature size), so
every forward runs at 256 px on the CPU. The parity tests drive the official
``SAM2VideoPredictor`` through its public API on JPEG frames written by the test, and feed our
session the very pixels the official loader decoded.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from SAM3DSegmentLib.data.intensity import WindowSpec
from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.engines.sam2_video import Sam2Session
from SAM3DSegmentLib.engines.session import PropagationOptions, StopRule
from SAM3DSegmentLib.errors import (
    CheckpointError,
    ModelOutOfMemoryError,
    PromptError,
    PropagationCancelled,
)
from SAM3DSegmentLib.models.registry import get_spec

# The official predictor warns on every frame that sam2's compiled extension is missing (hole filling).
pytestmark = pytest.mark.filterwarnings("ignore:cannot import name '_C':UserWarning")

IMAGE_SIZE = 256
N_SLICES, HEIGHT, WIDTH = 7, 48, 64  # asymmetric slices catch (x, y) / (row, col) swaps
IDENTITY_WINDOW = WindowSpec.window(255.0, 127.5)  # uint8 pixels pass through unchanged
NO_STOP = PropagationOptions(stop=StopRule(min_area=0, min_score=None))


@pytest.fixture(scope="module")
def model():
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(0)
    return build_sam2_video_predictor(
        "configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu",
        hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}"],
    )


@pytest.fixture(scope="module")
def spec():
    return replace(get_spec("sam2.1_hiera_tiny"), input_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A growing off-centre disc with noise, as JPEG frames (test only) and as the decoded pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    volume = np.full((N_SLICES, HEIGHT, WIDTH), 40, np.uint8)
    for k in range(N_SLICES):
        volume[k][(rows - 24) ** 2 + (cols - 30) ** 2 < (10 + 2 * k) ** 2 // 2] = 200
    volume = (volume + rng.integers(0, 20, volume.shape)).astype(np.uint8)
    folder = tmp_path_factory.mktemp("jpeg_frames")
    for k in range(N_SLICES):
        Image.fromarray(volume[k]).save(folder / f"{k:05d}.jpg", quality=95)
    decoded = np.stack([np.asarray(Image.open(folder / f"{k:05d}.jpg")) for k in range(N_SLICES)])
    return folder, decoded


@pytest.fixture
def session(model, spec, frames):
    _, decoded = frames
    # Raw array slices, as the official predictor gets its frames (orientation is tested on its own below).
    return Sam2Session(Volume(decoded.astype(np.float32)), 0, model, spec, window=IDENTITY_WINDOW, device="cpu",
                       orientation="array")


def _official_masks(model, state, anchor, add_prompt) -> dict[int, np.ndarray]:
    """Forward, then reset and re-prompt, then reverse: the official predictor's public API."""
    masks = {}
    for reverse in (False, True):
        model.reset_state(state)
        add_prompt(state)
        for frame, _, logits in model.propagate_in_video(state, start_frame_idx=anchor, reverse=reverse):
            masks[frame] = (logits[0, 0] > 0).numpy()
    return masks


def _assert_same(official: dict[int, np.ndarray], ours: np.ndarray) -> None:
    assert sorted(official) == list(range(N_SLICES))
    for k in range(N_SLICES):
        assert np.array_equal(official[k], ours[k]), f"slice {k}: {np.count_nonzero(official[k] != ours[k])} px differ"
    areas = [int(ours[k].sum()) for k in range(N_SLICES)]
    assert 0 < min(areas) and max(areas) < HEIGHT * WIDTH, "masks must be non-trivial for parity to mean anything"


@pytest.fixture(scope="module")
def official_state(model, frames):
    folder, _ = frames
    return model.init_state(str(folder))


def test_frames_are_the_official_loader_tensors(session, official_state):
    for k in (0, N_SLICES - 1):
        assert torch.equal(session.frames.tensor(k)[0], official_state["images"][k])


def test_parity_with_official_video_predictor_clicks(model, session, official_state):
    anchor = 3
    official = _official_masks(
        model, official_state, anchor,
        lambda s: model.add_new_points_or_box(
            s, anchor, 1, points=np.array([[30.0, 22.0], [5.0, 40.0]], np.float32),
            labels=np.array([1, 0], np.int32)),
    )
    session.add_prompt(1, SlicePrompt(0, anchor, points=(Point(22.0, 30.0), Point(40.0, 5.0, positive=False))))
    result = session.propagate(1, NO_STOP)
    _assert_same(official, result.mask)


def test_parity_with_official_video_predictor_box_and_mask(model, session, official_state, frames):
    box_anchor = 2
    official = _official_masks(
        model, official_state, box_anchor,
        lambda s: model.add_new_points_or_box(s, box_anchor, 1, box=np.array([15.0, 8.0, 45.0, 40.0], np.float32)),
    )
    session.add_prompt(1, SlicePrompt(0, box_anchor, box=Box(8.0, 15.0, 40.0, 45.0)))
    _assert_same(official, session.propagate(1, NO_STOP).mask)

    mask_anchor = 5
    prompt_mask = frames[1][mask_anchor] > 120
    official = _official_masks(
        model, official_state, mask_anchor,
        lambda s: model.add_new_mask(s, mask_anchor, 2, prompt_mask),
    )
    session.set_slice_mask(2, mask_anchor, prompt_mask)
    ours = session.propagate(2, NO_STOP).mask
    official[mask_anchor] = prompt_mask  # a painted slice keeps exactly the painted mask
    _assert_same(official, ours)


def test_any_axis_gives_the_same_slices(model, spec, frames, session):
    """Slices along axis 2 of the transposed volume are the axis-0 slices: same masks."""
    transposed = Volume(np.ascontiguousarray(frames[1].transpose(1, 2, 0)).astype(np.float32))
    along_i = Sam2Session(transposed, 2, model, spec, window=IDENTITY_WINDOW, device="cpu", orientation="array")
    ranged = replace(NO_STOP, slice_range=(2, 4))
    masks = []
    for s, axis in ((session, 0), (along_i, 2)):
        s.add_prompt(1, SlicePrompt(axis, 3, points=(Point(22.0, 30.0),), box=Box(10.0, 12.0, 36.0, 50.0)))
        masks.append(s.propagate(1, ranged).mask)
    assert np.array_equal(masks[0], masks[1].transpose(2, 0, 1)) and masks[0][2:5].any()


def test_slices_are_shown_in_the_radiological_view(model, spec, frames, session):
    """With an identity IJK-to-RAS (i -> R, j -> A) the radiological view flips rows and columns:
    SAM 2 then sees the pre-flipped array's raw slices, and masks come back in array coordinates."""
    decoded = frames[1].astype(np.float32)
    radiological = Sam2Session(Volume(decoded), 0, model, spec, window=IDENTITY_WINDOW, device="cpu")
    flipped = Volume(np.ascontiguousarray(decoded[:, ::-1, ::-1]))
    raw = Sam2Session(flipped, 0, model, spec, window=IDENTITY_WINDOW, device="cpu", orientation="array")
    assert torch.equal(radiological.frames.tensor(3), raw.frames.tensor(3))
    box = Box(10.0, 12.0, 36.0, 50.0)
    mirrored = Box(HEIGHT - 1 - 36.0, WIDTH - 1 - 50.0, HEIGHT - 1 - 10.0, WIDTH - 1 - 12.0)
    radiological.add_prompt(1, SlicePrompt(0, 3, points=(Point(22.0, 30.0),), box=box))
    raw.add_prompt(1, SlicePrompt(0, 3, points=(Point(HEIGHT - 1 - 22.0, WIDTH - 1 - 30.0),), box=mirrored))
    ours = radiological.propagate(1, NO_STOP).mask
    assert ours.any() and np.array_equal(ours, raw.propagate(1, NO_STOP).mask[:, ::-1, ::-1])


def test_lazy_encoding_preview_and_shared_features(session):
    assert session.slices_encoded_total == 0  # opening a session encodes nothing
    first = session.add_prompt(1, SlicePrompt(0, 3, points=(Point(22.0, 30.0),)))
    assert session.slices_encoded_total == 1 and first.mask.shape == (HEIGHT, WIDTH)
    session.add_prompt(1, SlicePrompt(0, 3, points=(Point(10.0, 10.0, positive=False),)))
    assert session.slices_encoded_total == 1  # another click: decoder only
    result = session.propagate(1, NO_STOP)
    assert result.slices_encoded == N_SLICES - 1 and session.cache_stats().entries == N_SLICES
    session.add_prompt(2, SlicePrompt(0, 1, box=Box(5.0, 5.0, 30.0, 30.0)))
    second = session.propagate(2, NO_STOP)
    assert second.slices_encoded == 0  # a second object reuses the features
    assert second.mask[1].any()


def test_correction_recomputes_only_touching_runs_without_reencoding(model, spec, session, frames):
    session.add_prompt(1, SlicePrompt(0, 1, points=(Point(22.0, 30.0),)))
    first = session.propagate(1, NO_STOP)
    assert first.slices_encoded == N_SLICES - 1 and session.slices_encoded_total == N_SLICES
    corrected = np.zeros((HEIGHT, WIDTH), bool)
    corrected[12:36, 18:44] = True
    session.set_slice_mask(1, 4, corrected)
    second = session.propagate(1, NO_STOP)
    assert second.slices_encoded == 0  # all features still cached
    assert second.slices_computed == [2, 3, 5, 6]  # runs 1->2, 4->3 and 4->6; slice 0 is kept
    assert np.array_equal(second.mask[0], first.mask[0]) and np.array_equal(second.mask[4], corrected)
    # Each run depends only on its own anchors, so the partial recomputation equals a fresh one.
    fresh = Sam2Session(Volume(frames[1].astype(np.float32)), 0, model, spec, window=IDENTITY_WINDOW, device="cpu",
                        orientation="array")
    fresh.add_prompt(1, SlicePrompt(0, 1, points=(Point(22.0, 30.0),)))
    fresh.set_slice_mask(1, 4, corrected)
    assert np.array_equal(fresh.propagate(1, NO_STOP).mask, second.mask)


def test_clicks_on_a_propagated_slice_refine_its_result(session):
    session.add_prompt(1, SlicePrompt(0, 3, points=(Point(22.0, 30.0),)))
    propagated = session.propagate(1, NO_STOP).mask[5].copy()
    click = Point(40.0, 58.0)
    refined = session.add_prompt(1, SlicePrompt(0, 5, points=(click,)))
    with session._model_context():
        explicit = session._decode_prompt(SlicePrompt(0, 5, points=(click,), mask=propagated), None)
    # the include click only adds to the propagated mask (the session's clicks_change_one_way)
    assert np.array_equal(refined.mask, session._slice_result(explicit).mask | propagated)
    assert session.slices_encoded_total == N_SLICES  # decoder only


def test_stop_rule_range_and_progress(session):
    session.add_prompt(1, SlicePrompt(0, 3, points=(Point(22.0, 30.0),)))
    never_sure = PropagationOptions(stop=StopRule(min_area=0, min_score=0.999, patience=2))
    result = session.propagate(1, never_sure)
    assert result.slices_computed == [1, 2, 4, 5] and session.slices_encoded_total == 5
    assert set(result.stop_reasons) == {"3-1", "3+1"} and "score" in result.stop_reasons["3+1"]
    assert result.slices_with_object == [3]  # absent slices are left empty
    ticks = []
    ranged = session.propagate(1, replace(NO_STOP, slice_range=(2, 4)), progress=lambda d, t, i: ticks.append(i))
    assert ranged.slices_computed == [2, 4] and ticks == [2, 4, -1]


def test_feature_cache_holds_its_budget(model, spec, frames):
    volume = Volume(frames[1].astype(np.float32))
    probe = Sam2Session(volume, 0, model, spec, window=IDENTITY_WINDOW, device="cpu")
    probe.encode_slice(0)
    per_slice = probe.cache.used_bytes
    session = Sam2Session(volume, 0, model, spec, window=IDENTITY_WINDOW, device="cpu",
                          cache_budget_bytes=2 * per_slice, offload_features_to_cpu=True)
    session.add_prompt(1, SlicePrompt(0, 0, points=(Point(22.0, 30.0),)))
    session.propagate(1, replace(NO_STOP, slice_range=(0, 3)))
    stats = session.cache_stats()
    assert stats.entries == 2 and stats.used_bytes <= stats.budget_bytes and stats.evictions == 2
    session.set_slice_mask(1, 1, np.ones((HEIGHT, WIDTH), bool))
    # Only slices 2 and 3 are still cached; the rerun needs 1, 2, 3 in that order, and each encode
    # pushes out the least recently used slice, so all three are encoded again.
    assert session.propagate(1, replace(NO_STOP, slice_range=(0, 3))).slices_encoded == 3
    assert session.cache_stats().used_bytes <= 2 * per_slice


def test_cancel_leaves_things_as_they_were(session):
    session.add_prompt(1, SlicePrompt(0, 3, points=(Point(22.0, 30.0),)))
    checks = itertools.count()
    with pytest.raises(PropagationCancelled):
        session.propagate(1, NO_STOP, cancel=lambda: next(checks) >= 3)  # cancel at the 4th slice
    assert session.mask(1) is None
    assert session.propagate(1, NO_STOP).mask[0].shape == (HEIGHT, WIDTH)  # usable afterwards


def test_clear_errors(model, spec, session):
    volume = session.volume
    with pytest.raises(CheckpointError, match="SAM2Base"):
        Sam2Session(volume, 0, torch.nn.Linear(2, 2), spec)
    with pytest.raises(CheckpointError, match="slice-wise engine"):
        Sam2Session(volume, 0, model, get_spec("sam_vit_b"))
    with pytest.raises(CheckpointError, match="256 px"):
        Sam2Session(volume, 0, model, get_spec("sam2.1_hiera_tiny"))
    with pytest.raises(PromptError, match="slices 0..6"):
        session.add_prompt(1, SlicePrompt(0, N_SLICES, points=(Point(5.0, 5.0),)))
    with pytest.raises(PromptError, match="empty"):
        session.set_slice_mask(1, 2, np.zeros((HEIGHT, WIDTH), bool))
    with pytest.raises(ModelOutOfMemoryError, match="smaller cache budget"):
        with session._model_context():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_medsam2_checkpoint_through_the_registry_path(tmp_path, frames):
    """MedSAM2's config (ours, 512 px; here overridden to 256 px for speed), saved in the official
    checkpoint format and loaded back through model_loading, runs in the engine unchanged."""
    from SAM3DSegmentLib.models.builders import build_model

    small = ["++model.image_size=256"]
    medsam2 = replace(get_spec("medsam2"), input_size=IMAGE_SIZE)
    torch.manual_seed(1)
    original = build_model(medsam2, None, device="cpu", video=True, overrides=small)
    path = tmp_path / "medsam2_random.pt"
    torch.save({"model": original.state_dict()}, path)
    loaded = build_model(medsam2, path, device="cpu", video=True, overrides=small)
    volume = Volume(frames[1].astype(np.float32))
    prompt = SlicePrompt(0, 2, points=(Point(22.0, 30.0),))
    previews = []
    for model in (original, loaded):
        session = Sam2Session(volume, 0, model, medsam2, window=IDENTITY_WINDOW, device="cpu")
        previews.append(session.add_prompt(1, prompt).mask)
        result = session.propagate(1, replace(NO_STOP, slice_range=(1, 3)))
        assert result.slices_computed == [1, 3] and result.mask[1:4].any()
    assert np.array_equal(previews[0], previews[1])
