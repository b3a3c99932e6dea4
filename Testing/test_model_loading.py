"""Models built by the official builders from random init, saved in each family's official
checkpoint format, and loaded back through the registry's local-checkpoint path."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from SAM3DSegmentLib.errors import CheckpointError, InputError
from SAM3DSegmentLib.models.builders import build_model
from SAM3DSegmentLib.models.checkpoint_cache import resolve_checkpoint
from SAM3DSegmentLib.models.checkpoint_state import (
    checkpoint_family,
    load_checkpoint_state,
)
from SAM3DSegmentLib.models.registry import get_spec


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    """A random SAM ViT-B saved as segment-anything does: a plain state dict."""
    torch.manual_seed(0)
    model = build_model("sam_vit_b", None, "cpu")
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    state = model.state_dict()
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    """A random SAM 2.1 tiny saved as sam2 does: {"model": state_dict}."""
    torch.manual_seed(0)
    model = build_model("sam2.1_hiera_tiny", None, "cpu")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_tiny_random.pt"
    state = model.state_dict()
    torch.save({"model": state}, path)
    return path, state


def test_random_builds_are_the_official_classes():
    from sam2.modeling.sam2_base import SAM2Base
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    tiny = build_model("sam2.1_hiera_tiny", device="cpu", overrides=["++model.image_size=256"])
    assert type(tiny) is SAM2Base and tiny.image_size == 256 and not tiny.training
    video = build_model("sam2.1_hiera_tiny", device="cpu", video=True, overrides=["++model.image_size=256"])
    assert isinstance(video, SAM2VideoPredictor)
    assert video.fill_hole_area == 8  # the official video-predictor settings were applied
    medsam2 = build_model("medsam2", device="cpu")
    assert type(medsam2) is SAM2Base and medsam2.image_size == 512
    assert medsam2.sam_image_embedding_size == 32


def test_sam_round_trip_through_registry(sam_checkpoint):
    from segment_anything.modeling import Sam

    path, state = sam_checkpoint
    assert checkpoint_family(state) == "sam"
    resolved = resolve_checkpoint("sam_vit_b", path)
    assert resolved == path
    model = build_model(get_spec("sam_vit_b"), resolved, "cpu")
    assert isinstance(model, Sam) and not model.training
    _assert_same_state(model.state_dict(), state)


def test_sam2_round_trip_through_registry(sam2_checkpoint):
    path, state = sam2_checkpoint
    assert checkpoint_family(state) == "sam2"
    model = build_model("sam2.1_hiera_tiny", resolve_checkpoint("sam2.1_hiera_tiny", path), "cpu")
    _assert_same_state(model.state_dict(), state)
    # MedSAM2 is a fine-tuned SAM 2.1 tiny at 512 px: the same weights fit its config.
    medsam2 = build_model("medsam2", path, "cpu")
    assert medsam2.image_size == 512
    _assert_same_state(medsam2.state_dict(), state)


def test_wrong_family_is_named(sam_checkpoint, sam2_checkpoint):
    with pytest.raises(CheckpointError, match=r"is a SAM 2 .* but model 'sam_vit_b' is a SAM \(segment"):
        build_model("sam_vit_b", sam2_checkpoint[0], "cpu")
    with pytest.raises(CheckpointError, match=r"is a SAM \(segment.* but model 'sam2.1_hiera_tiny' is a SAM 2"):
        build_model("sam2.1_hiera_tiny", sam_checkpoint[0], "cpu")


def test_other_size_of_same_family_is_clear(sam2_checkpoint):
    with pytest.raises(CheckpointError, match="does not fit model 'sam2.1_hiera_small'"):
        build_model("sam2.1_hiera_small", sam2_checkpoint[0], "cpu")


def test_corrupt_truncated_and_empty_files(tmp_path, sam2_checkpoint):
    data = sam2_checkpoint[0].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        build_model("sam2.1_hiera_tiny", truncated, "cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="sam3d models download sam2.1_hiera_tiny"):
        build_model("sam2.1_hiera_tiny", garbage, "cpu")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint_state(empty)
    other = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a SAM, SAM 2 or LiteMedSAM checkpoint"):
        load_checkpoint_state(other)


def test_resolve_checkpoint_from_cache_or_advice(tmp_path, monkeypatch):
    from SAM3DSegmentLib.models import checkpoint_cache

    with pytest.raises(CheckpointError, match="sam3d models download sam2.1_hiera_tiny"):
        resolve_checkpoint("sam2.1_hiera_tiny")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("sam2.1_hiera_tiny", tmp_path / "missing.pt")
    spec = dataclasses.replace(get_spec("sam2.1_hiera_tiny"), file_size=10, sha256=None)
    cached = checkpoint_cache.cached_path(spec)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"0123456789")
    assert resolve_checkpoint(spec) == cached
    cached.write_bytes(b"01234")
    with pytest.raises(CheckpointError, match="failed verification"):
        resolve_checkpoint(spec)
    # A file copied into the cache by hand is hashed once against the registry's sha256.
    cached.write_bytes(b"0123456789")
    digest = hashlib.sha256(b"0123456789").hexdigest()
    assert resolve_checkpoint(dataclasses.replace(spec, sha256=digest)) == cached
    assert checkpoint_cache.recorded_sha256(cached) == digest
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_checkpoint(dataclasses.replace(spec, sha256="0" * 64))


def test_overrides_are_sam2_only():
    with pytest.raises(InputError, match="SAM 2 only"):
        build_model("sam_vit_b", device="cpu", overrides=["++model.image_size=256"])
