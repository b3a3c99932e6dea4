"""``sam3d finetune --engine volumetric``: 3DSAM-adapter's adapters trained on the user's volumes.

All on a MICRO random-weight configuration (TEST-ONLY): width 32, 2 heads, the 12 blocks, an 8^3
token grid (one attention window) and 32^3 crops, so that a training step takes a fraction of a
second on one core. (test_volumetric.py's TINY keeps the released 32^3 token grid for parity
with the authors' code; a training step there takes about 7 s and 9 GB.)
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from SAM3DSegmentLib.commands.cli import build_parser  # noqa: E402
from SAM3DSegmentLib.data.prompts import Point, SlicePrompt  # noqa: E402
from SAM3DSegmentLib.data.volume import Volume  # noqa: E402
from SAM3DSegmentLib.engines.volumetric import VolumetricOptions, VolumetricSession, open_volumetric_session  # noqa: E402
from SAM3DSegmentLib.errors import CheckpointError, InputError  # noqa: E402
from SAM3DSegmentLib.models.adapters import apply_adapter, apply_sam3d_adapter, read_adapter, save_adapter  # noqa: E402
from SAM3DSegmentLib.models.registry import get_spec  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import (  # noqa: E402
    Sam3DAdapter,
    Sam3DAdapterConfig,
    authors_checkpoint_layout,
    load_authors_file,
)
from SAM3DSegmentLib.training.finetune import write_adapter  # noqa: E402
from SAM3DSegmentLib.training.volumetric_finetune import (  # noqa: E402
    VolumetricFinetuneConfig,
    dice_ce_loss,
    finetune_volumetric,
    prepare_case,
    recomputed_blocks,
    sample_crop,
    trained_names,
)

torch.set_num_threads(1)

MICRO = Sam3DAdapterConfig(  # TEST-ONLY (see module docstring)
    embed_dim=32, num_heads=2, patch_size=2, num_slice=2, pretrain_img_size=32, patch_depth=8, token_grid=8,
    out_chans=16, decoder_channels=8, prompt_mlp_dim=32, prompt_heads=2, crop_size=32,
)
FAST = VolumetricFinetuneConfig(dataset="kits", epochs=3, crops_per_case=3, learning_rate=2e-3,
                                validation_fraction=0.0, seed=0)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob_volume(seed: int = 0, shape=(30, 40, 40), spacing=(1.5, 1.0, 1.0)) -> tuple[Volume, np.ndarray]:
    """A CT-like volume with a bright ellipsoid (the label) in noise."""
    rng = np.random.default_rng(seed)
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, 3)
    k, j, i = np.indices(shape)
    label = ((k - centre[0]) * spacing[0] / 7) ** 2 + ((j - centre[1]) / 8) ** 2 + ((i - centre[2]) / 6) ** 2 < 1
    array = np.where(label, 120.0, 10.0) + rng.normal(0, 15, shape)
    ras = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    return Volume(array=array.astype(np.float32), ijk_to_ras=ras, name=f"blob{seed}", modality="CT"), label


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base checkpoint in the authors' layout (seeded random weights) and its sha256."""
    torch.manual_seed(0)
    model = Sam3DAdapter(MICRO)
    with torch.no_grad():  # zero-initialised tables would make the model blind to positions
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or "depth_embed" in name:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("base") / "last.pth.tar"
    torch.save(authors_checkpoint_layout(model), path)
    return path, sha256(path)


@pytest.fixture(scope="module")
def cases():
    return [prepare_case(*blob_volume(seed), FAST, MICRO.crop_size, name=f"blob{seed}") for seed in range(3)]


def trained(base, cases, config=FAST, **kwargs):
    model = load_authors_file(base[0], MICRO)
    return model, finetune_volumetric(model, cases, config, base_sha256=base[1], **kwargs)


@pytest.fixture(scope="module")
def run(base, cases):
    """One training on the first volume, shared by the tests that only read its result."""
    return trained(base, cases[:1])


def test_crops_hold_the_clicks_and_the_target(cases):
    rng = np.random.default_rng(0)
    for _ in range(5):
        crop = sample_crop(cases[0], MICRO.crop_size, rng, 3, 4, True)
        assert crop.crop.shape == crop.target.shape == (32, 32, 32)
        assert 1 <= len(crop.clicks) <= 3
        for d, h, w in crop.clicks.long().tolist():
            assert crop.target[d, h, w] == 1  # every click lies inside the label, flips included
    # the normalised image is the session's: same 1-mm grid, clip and normalisation
    volume, label = blob_volume(0)
    image = VolumetricSession(volume, Sam3DAdapter(MICRO), options=VolumetricOptions("kits"))._prepared_image()
    region = tuple(slice(o, o + n) for o, n in zip(cases[0].origin, cases[0].image.shape))
    assert torch.equal(cases[0].image, image[region])


def test_training_lowers_the_loss_and_changes_only_the_adapter_rule(base, run):
    model, result = run
    losses = [r.train_loss for r in result.history]
    assert len(losses) == FAST.epochs and losses[-1] < losses[0]
    fresh = load_authors_file(base[0], MICRO)
    names = set(trained_names(Sam3DAdapter(MICRO)))
    assert set(result.state) == names
    before, after = fresh.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= names  # frozen tensors (SAM's ViT, unused prompt encoders) are bit-identical
    assert any(k.startswith("encoder.blocks.") and ".adapter." in k for k in changed)
    assert not any(k.startswith("prompt_encoders.0.") or ".attn.qkv." in k for k in names)
    assert sha256(base[0]) == base[1]  # the base checkpoint file was never written


def test_trained_parameters_at_full_size():
    """The trained set is the authors' rule less the parts inference never calls: 25,198,976
    parameters at full size (docs/volumetric.md), counted on the meta device."""
    with torch.device("meta"):
        model = Sam3DAdapter()
    names = set(trained_names(model))
    assert sum(p.numel() for n, p in model.named_parameters() if n in names) == 25_198_976


def test_adapter_round_trips_and_the_session_uses_it(base, cases, run, tmp_path):
    path, digest = base
    model, result = run
    adapter = write_adapter(tmp_path / "a.pt", result)
    metadata, state = read_adapter(adapter)
    assert metadata["family"] == "sam3d_adapter" and metadata["base_sha256"] == digest
    assert metadata["dataset"] == "kits" and metadata["model_config"]["crop_size"] == 32
    assert set(state) == set(result.state)
    for key, value in state.items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert adapter.stat().st_size < path.stat().st_size  # only the trained tensors

    volume, _ = blob_volume(0)
    prompt = SlicePrompt(axis=0, index=15, points=(Point(20, 20),))
    with_adapter = open_volumetric_session(volume, path, adapter=adapter, config=MICRO)
    assert with_adapter.options.dataset == "kits"
    in_memory = VolumetricSession(volume, model, options=VolumetricOptions("kits"))
    plain = open_volumetric_session(volume, path, config=MICRO)
    masks = []
    for session in (with_adapter, in_memory, plain):
        session.add_prompt(1, prompt)
        masks.append(session.propagate(1))
    assert np.array_equal(masks[0].mask, masks[1].mask) and masks[0].scores == masks[1].scores
    crop = torch.from_numpy(np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32)).expand(3, -1, -1, -1)
    clicks = torch.tensor([[16.0, 16.0, 16.0]])
    with torch.no_grad():
        outputs = [s.model(crop, clicks) for s in (with_adapter, in_memory, plain)]
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])  # the adapter changed the model
    assert sha256(path) == digest


def test_an_adapter_for_another_base_is_refused(base, run, tmp_path):
    path, digest = base
    _, result = run
    other_sha = save_adapter(tmp_path / "other_sha.pt", result.state, {**result.metadata, "base_sha256": "0" * 64})
    volume, _ = blob_volume(0)
    with pytest.raises(CheckpointError, match="fine-tune again"):
        open_volumetric_session(volume, path, adapter=other_sha, config=MICRO)
    lite = save_adapter(tmp_path / "lite.pt", {"mask_decoder.x": torch.zeros(1)},
                        {"family": "litemedsam", "base_model": "litemedsam", "base_sha256": digest})
    with pytest.raises(CheckpointError, match="not on a 3DSAM-adapter checkpoint"):
        apply_sam3d_adapter(Sam3DAdapter(MICRO), lite, digest)
    ours = write_adapter(tmp_path / "ours.pt", result)
    with pytest.raises(CheckpointError, match="volumetric engine"):
        apply_adapter(torch.nn.Linear(1, 1), get_spec("litemedsam"), ours, digest)
    wrong_size = Sam3DAdapter(replace(MICRO, decoder_channels=4))
    with pytest.raises(CheckpointError, match="does not fit"):
        apply_sam3d_adapter(wrong_size, ours, digest)
    with pytest.raises(InputError, match="base_sha256"):
        open_volumetric_session(volume, Sam3DAdapter(MICRO), adapter=ours)
    with pytest.raises(InputError, match="dataset='kits'"):
        open_volumetric_session(volume, path, dataset="lits", adapter=ours, config=MICRO)
    assert sha256(path) == digest


def test_resume_continues_from_the_checkpoint(base, cases, tmp_path):
    checkpoint = tmp_path / "work" / "checkpoint.pt"
    config = replace(FAST, epochs=2, crops_per_case=2)
    _, straight = trained(base, cases[:1], config)
    _, first = trained(base, cases[:1], replace(config, epochs=1), checkpoint_path=checkpoint)
    assert checkpoint.is_file() and len(first.history) == 1
    _, resumed = trained(base, cases[:1], config, checkpoint_path=checkpoint, resume=True)
    assert [r.epoch for r in resumed.history] == [1, 2] and resumed.metadata["epochs_run"] == 2
    assert resumed.history[0].train_loss == first.history[0].train_loss
    assert resumed.history[1].train_loss == pytest.approx(straight.history[1].train_loss, rel=1e-4)
    for key, value in resumed.state.items():
        assert torch.allclose(value, straight.state[key], atol=1e-5), key
    with pytest.raises(CheckpointError, match="another base"):
        finetune_volumetric(load_authors_file(base[0], MICRO), cases[:1], config, base_sha256="0" * 64,
                            checkpoint_path=checkpoint, resume=True)


def test_validation_by_volume_keeps_the_best_epoch(base, cases):
    config = replace(FAST, epochs=2, crops_per_case=1, validation_fraction=0.34, validation_crops=1, patience=1)
    model, result = trained(base, cases, config)
    assert result.metadata["validation"] == "by volume"
    assert result.metadata["training_targets"] == 2 and result.metadata["validation_crops"] == 1
    best = max([result.validation_dice_base] + [r.validation_dice for r in result.history])
    assert result.validation_dice == best
    if result.best_epoch == 0:  # nothing beat the base: the base's tensors are kept
        fresh = load_authors_file(base[0], MICRO).state_dict()
        assert all(torch.equal(v, fresh[k]) for k, v in result.state.items())


def test_recomputed_blocks_give_the_same_gradients(base, cases):
    crop = sample_crop(cases[0], MICRO.crop_size, np.random.default_rng(0), 2, 0, False)
    grads = []
    for recompute in (False, True):
        model = load_authors_file(base[0], MICRO)
        names = trained_names(model)
        with recomputed_blocks(model, recompute):
            image = crop.crop.expand(3, -1, -1, -1)
            dice_ce_loss(model(image, crop.clicks), crop.target).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if n in names})
        assert "forward" not in vars(model.encoder.blocks[0])  # the blocks are themselves again
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_cli_parses_the_volumetric_finetune(tmp_path):
    args = build_parser().parse_args(["finetune", "--engine", "volumetric", "--checkpoint", "last.pth.tar",
                                      "--dataset", "lits", "--data", "d", "--out", "a.pt"])
    assert args.engine == "volumetric" and args.dataset == "lits" and args.lr is None
    args = build_parser().parse_args(["finetune", "--engine", "volumetric", "--data", "d", "--out", "a.pt"])
    with pytest.raises(InputError, match="--checkpoint FILE"):
        args.run(args)
    assert build_parser().parse_args(["finetune", "--data", "d", "--out", "a.pt"]).engine == "slicewise"


def test_cli_writes_an_adapter(base, tmp_path, monkeypatch, capsys):
    """The whole command on a folder of image/label pairs, the model sized as the file says."""
    sitk = pytest.importorskip("SimpleITK")
    volume, label = blob_volume(0)
    folder = tmp_path / "pairs" / "case_a"
    folder.mkdir(parents=True)
    for name, array in (("image", volume.array), ("label", label.astype(np.uint8))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 1.5))
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    out = tmp_path / "adapter.pt"
    args = build_parser().parse_args([
        "finetune", "--engine", "volumetric", "--checkpoint", str(base[0]), "--dataset", "kits",
        "--data", str(tmp_path / "pairs"), "--out", str(out), "--epochs", "1", "--crops-per-case", "2",
        "--validation-fraction", "0", "--device", "cpu", "--no-progress",
    ])
    assert args.run(args) == 0
    metadata, state = read_adapter(out)
    assert metadata["base_sha256"] == base[1] and metadata["cases"] == ["case_a_label_1"]
    assert metadata["settings"]["learning_rate"] == 4e-4 and len(state) > 0
    assert (tmp_path / "adapter.pt.work" / "checkpoint.pt").is_file()
    assert "wrote" in capsys.readouterr().out
    assert sha256(base[0]) == base[1]


def test_the_engine_choice_loads_the_adapter_as_the_session_does(base, run, tmp_path):
    """`--engine volumetric --adapter FILE` (engine choice) gives the session opened by hand."""
    from SAM3DSegmentLib.engines.choice import choose_engine, open_session

    path, _ = base
    _, result = run
    adapter = write_adapter(tmp_path / "a.pt", result)
    volume, _ = blob_volume(0)
    prompt = SlicePrompt(axis=0, index=15, points=(Point(20, 20),))
    chosen = choose_engine("volumetric", model="3dsam_adapter_kits", checkpoint=path, adapter=adapter)
    by_choice = open_session(chosen, volume, axis=0, device="cpu")
    by_hand = open_volumetric_session(volume, path, adapter=adapter, config=by_choice.model.cfg)
    masks = []
    for session in (by_choice, by_hand):
        session.add_prompt(1, prompt)
        masks.append(session.propagate(1).mask)
    assert np.array_equal(masks[0], masks[1])
    with torch.no_grad():
        trained = dict(by_choice.model.named_parameters())
        assert all(torch.equal(trained[k], v) for k, v in result.state.items())
