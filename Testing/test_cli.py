"""``sam3d segment`` and ``sam3d demo`` end to end on small generated files."""

from __future__ import annotations

import re

import numpy as np
import pytest

from SAM3DSegmentLib.commands.cli import main
from SAM3DSegmentLib.data.sample_volume import make_sample
from SAM3DSegmentLib.data.volume_files import (
    read_label_map,
    read_volume,
    write_label_map,
)
from SAM3DSegmentLib.evaluation.metrics import dice


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory):
    """The sample case written as NRRD (non-identity direction, anisotropic spacing)."""
    import SimpleITK as sitk

    from SAM3DSegmentLib.data.volume_files import image_from_array

    sample = make_sample(shape_kji=(24, 88, 100))
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "image.nrrd"
    sitk.WriteImage(image_from_array(sample.volume.array, sample.volume.ijk_to_ras), str(path))
    return path, sample


def ijk_text(kji) -> str:
    k, j, i = kji
    return f"{i},{j},{k}"


def test_segment_with_one_voxel_click(sample_file, tmp_path, capsys):
    path, sample = sample_file
    out = tmp_path / "lesion.nii.gz"
    code = main(["segment", str(path), "--point", ijk_text(sample.click_kji), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "engine: slicewise (litemedsam is installed with SAM3DSegment" in captured.out
    assert "propagating [" in captured.err and "done" in captured.err  # the progress bar
    volume = read_volume(path)
    mask = read_label_map(out, volume) > 0
    assert dice(mask, sample.truth) > 0.8


def test_voxel_and_ras_coordinates_agree(sample_file, tmp_path, capsys):
    path, sample = sample_file
    volume = read_volume(path)
    k, j, i = sample.click_kji
    r, a, s = volume.kji_to_ras([k, j, i])
    voxel_out, ras_out = tmp_path / "voxel.nrrd", tmp_path / "ras.nrrd"
    negative = (k, j + 20, i)
    nr, na, ns = volume.kji_to_ras(negative)
    assert main(["segment", str(path), "--point", ijk_text((k, j, i)), "--negative", ijk_text(negative),
                 "--out", str(voxel_out), "--no-progress", "--engine", "weightfree"]) == 0
    assert main(["segment", str(path), "--ras", "--point", f"{r},{a},{s}", "--negative", f"{nr},{na},{ns}",
                 "--out", str(ras_out), "--no-progress", "--engine", "weightfree"]) == 0
    voxel_mask = read_label_map(voxel_out, volume)
    assert voxel_mask.any()
    assert np.array_equal(voxel_mask, read_label_map(ras_out, volume))
    assert not np.array_equal([r, a, s], [i, j, k])  # the geometry is not the identity


def test_segment_writes_a_slicer_segmentation(sample_file, tmp_path, capsys):
    import slicerio

    path, sample = sample_file
    out = tmp_path / "lesion.seg.nrrd"
    k, j, i = sample.click_kji
    box = f"{i - 20},{j - 18},{k},{i + 20},{j + 18},{k}"
    code = main(["segment", str(path), "--box", box, "--out", str(out), "--name", "lesion",
                 "--engine", "weightfree", "--window", "400,40", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    segmentation = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in segmentation["segments"]] == ["lesion"]


def test_mask_file_as_the_prompt(sample_file, tmp_path, capsys):
    path, sample = sample_file
    volume = read_volume(path)
    k = sample.click_kji[0]
    prompt_mask = np.zeros(volume.shape, dtype=np.uint8)
    prompt_mask[k] = sample.truth[k]
    mask_path = write_label_map(prompt_mask, volume, tmp_path / "prompt.nii.gz")
    out = tmp_path / "from_mask.nii.gz"
    assert main(["segment", str(path), "--mask", str(mask_path), "--out", str(out), "--no-progress"]) == 0
    result = read_label_map(out, volume) > 0
    assert np.array_equal(result[k], sample.truth[k])  # a mask anchor is kept exactly
    assert dice(result, sample.truth) > 0.8


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--point", "5000,1,1"], "outside the image"),
        (["--point", "1,2"], "3 comma-separated numbers"),
        (["--point", "50,40,3", "--point", "50,40,9"], "one slice"),
        ([], "at least one --point"),
        (["--point", "50,40,10", "--window", "bright"], "Unknown window"),
        (["--point", "50,40,10", "--engine", "sam2"], "sam3d models download"),
        (["--point", "50,40,10", "--slice-range", "20,5"], "FIRST <= LAST"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(sample_file, tmp_path, capsys, arguments, message):
    path, _ = sample_file
    code = main(["segment", str(path), *arguments, "--out", str(tmp_path / "x.nii.gz"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert "sam3d segment: error:" in captured.err and message in captured.err
    assert not (tmp_path / "x.nii.gz").exists()


def test_bad_files_exit_2(sample_file, tmp_path, capsys):
    path, sample = sample_file
    point = ijk_text(sample.click_kji)
    assert main(["segment", str(tmp_path / "missing.nii.gz"), "--point", point, "--out", str(tmp_path / "x.nrrd")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["segment", str(path), "--point", point, "--out", str(tmp_path / "x.png")]) == 2
    assert ".seg.nrrd" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "engine: slicewise (litemedsam is installed with SAM3DSegment" in printed
    found = re.search(r"Dice against the known truth: ([0-9.]+)", printed)
    assert found and float(found.group(1)) > 0.8
    for name in ("sample_image.nrrd", "sample_segmentation.seg.nrrd", "sample_montage.png"):
        assert (out / name).stat().st_size > 0
        assert str(out / name) in printed
    from PIL import Image

    with Image.open(out / "sample_montage.png") as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    assert ((pixels[..., 0] > 150) & (pixels[..., 1] < 120)).any()  # the red overlay is there


def test_negative_ras_coordinates_parse_as_values():
    from SAM3DSegmentLib.commands.cli import build_parser

    args = build_parser().parse_args(
        ["segment", "image.nrrd", "--ras", "--point", "-12.5,30,-4", "--negative", "-1,-2,-3", "--out", "o.nii.gz"]
    )
    assert args.point == ["-12.5,30,-4"] and args.negative == ["-1,-2,-3"]


def test_component_picks_one_volume_of_a_4d_image(sample_file, tmp_path, capsys):
    import SimpleITK as sitk

    path, sample = sample_file
    volume = read_volume(path)
    volumes = [sitk.GetImageFromArray(a.astype(np.float32)) for a in (np.zeros_like(volume.array), volume.array)]
    image = sitk.JoinSeries(volumes)  # 4D: volume 1 holds the image
    four_d = tmp_path / "two_volumes.nii.gz"
    sitk.WriteImage(image, str(four_d))
    click = ["--point", ijk_text(sample.click_kji), "--no-progress"]
    assert main(["segment", str(four_d), *click, "--out", str(tmp_path / "a.nii.gz")]) == 2
    assert "--component N" in capsys.readouterr().err
    assert main(["segment", str(four_d), *click, "--component", "1", "--out", str(tmp_path / "b.nii.gz")]) == 0
    mask = read_label_map(tmp_path / "b.nii.gz", read_volume(four_d, component=1)) > 0
    assert dice(mask, sample.truth) > 0.8
