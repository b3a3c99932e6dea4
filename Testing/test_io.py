"""Volume and label-map I/O: geometry kept (flips, oblique directions), formats, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.data.volume_files import (
    guess_modality,
    read_label_map,
    read_volume,
    write_label_map,
    write_segmentation,
)
from SAM3DSegmentLib.errors import InputError

# A direction with a flipped axis and an oblique rotation (orthonormal, det -1 on purpose).
_ANGLE = np.deg2rad(30)
DIRECTION = np.array(
    [[np.cos(_ANGLE), -np.sin(_ANGLE), 0.0],
     [np.sin(_ANGLE), np.cos(_ANGLE), 0.0],
     [0.0, 0.0, -1.0]]
)
SPACING = (0.7, 1.3, 2.5)
ORIGIN = (10.0, -20.0, 30.0)


def _known_image(dtype=np.int16, shape_kji=(5, 6, 7)):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=shape_kji).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetDirection(tuple(DIRECTION.ravel()))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    return image, array


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_keeps_geometry_with_flips_and_oblique_direction(tmp_path, suffix):
    image, array = _known_image()
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    assert volume.name == "ct"
    np.testing.assert_array_equal(volume.array, array)
    # Expected by hand: RAS = diag(-1, -1, 1) * (D * diag(spacing) * ijk + origin).
    expected = np.eye(4)
    expected[:3, :3] = DIRECTION * np.asarray(SPACING)
    expected[:3, 3] = ORIGIN
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ expected
    np.testing.assert_allclose(volume.ijk_to_ras, expected, atol=1e-5)
    # And against SimpleITK's own voxel-to-physical mapping, at an asymmetric voxel.
    i, j, k = 6, 1, 3
    lps = np.asarray(image.TransformIndexToPhysicalPoint((i, j, k)))
    np.testing.assert_allclose(volume.kji_to_ras((k, j, i)), lps * [-1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(volume.spacing_kji, SPACING[::-1], rtol=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_label_map_round_trip_on_exact_grid(tmp_path, suffix):
    image, _ = _known_image()
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    volume = read_volume(tmp_path / "image.nrrd")
    labels = np.zeros(volume.shape, dtype=np.int32)
    labels[1:3, 2:5, 1:6] = 2
    labels[4, 0, 0] = 300  # needs more than 8 bits
    out = write_label_map(labels, volume, tmp_path / f"labels{suffix}")
    back = read_label_map(out, volume)
    np.testing.assert_array_equal(back, labels)
    written = sitk.ReadImage(str(out))
    np.testing.assert_allclose(written.GetDirection(), DIRECTION.ravel(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(written.GetSpacing(), SPACING, atol=1e-6)


def test_binary_mask_written_as_uint8(tmp_path):
    volume = Volume(np.zeros((3, 4, 5), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]), name="v")
    mask = np.zeros(volume.shape, bool)
    mask[1, 2, 3] = True
    out = write_label_map(mask, volume, tmp_path / "mask.nii.gz")
    image = sitk.ReadImage(str(out))
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), mask.astype(np.uint8))


def test_write_label_map_rejects_wrong_shape_and_suffix(tmp_path):
    volume = Volume(np.zeros((3, 4, 5), np.float32))
    with pytest.raises(InputError, match="shape"):
        write_label_map(np.zeros((3, 4, 4), np.uint8), volume, tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match=r"\.nii"):
        write_label_map(np.zeros((3, 4, 5), np.uint8), volume, tmp_path / "a.png")
    with pytest.raises(InputError, match="write_segmentation"):
        write_label_map(np.zeros((3, 4, 5), np.uint8), volume, tmp_path / "a.seg.nrrd")


def test_segmentation_has_names_colours_and_voxels(tmp_path):
    import slicerio

    image, _ = _known_image()
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    volume = read_volume(tmp_path / "image.nii.gz")
    labels = np.zeros(volume.shape, np.uint8)
    labels[0:2, 0:3, 0:4] = 1
    labels[3:5, 2:6, 4:7] = 3
    out = write_segmentation(
        labels, volume, tmp_path / "result.seg.nrrd",
        names={1: "liver", 3: "tumour"}, colors={1: (0.9, 0.1, 0.1), 3: (0.1, 0.2, 0.8)},
    )
    segmentation = slicerio.read_segmentation(str(out))
    assert slicerio.segment_names(segmentation) == ["liver", "tumour"]
    colors = {s["name"]: s["color"] for s in segmentation["segments"]}
    np.testing.assert_allclose(colors["tumour"], (0.1, 0.2, 0.8), atol=1e-3)
    np.testing.assert_allclose(segmentation["ijkToLPS"], np.diag([-1, -1, 1, 1]) @ volume.ijk_to_ras, atol=1e-5)
    for name, value in (("liver", 1), ("tumour", 3)):
        segment = slicerio.segment_from_name(segmentation, name)
        mask_ijk = slicerio.segment_mask(segmentation, segment)
        np.testing.assert_array_equal(np.asarray(mask_ijk).transpose(2, 1, 0), labels == value)


def test_segmentation_from_overlapping_masks(tmp_path):
    import slicerio

    volume = Volume(np.zeros((4, 5, 6), np.float32), name="v")
    a = np.zeros(volume.shape, bool)
    a[0:3] = True
    b = np.zeros(volume.shape, bool)
    b[2:4] = True
    out = write_segmentation({1: a, 2: b}, volume, tmp_path / "s.seg.nrrd", names=["a", "b"])
    segmentation = slicerio.read_segmentation(str(out))
    for name, mask in (("a", a), ("b", b)):
        got = slicerio.segment_mask(segmentation, slicerio.segment_from_name(segmentation, name))
        np.testing.assert_array_equal(np.asarray(got).transpose(2, 1, 0), mask)
    with pytest.raises(InputError, match="names"):
        write_segmentation({1: a, 2: b}, volume, tmp_path / "t.seg.nrrd", names=["only one"])
    with pytest.raises(InputError, match="seg.nrrd"):
        write_segmentation({1: a}, volume, tmp_path / "t.nrrd")


def _write_dicom_series(folder, array, modality="CT", spacing=(0.8, 0.9, 2.0)):
    folder.mkdir()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.99887766"
    for k in range(array.shape[0]):
        image = sitk.GetImageFromArray(array[k : k + 1])
        image.SetSpacing(spacing)
        tags = {
            "0008|0060": modality,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.11223344",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{k * spacing[2]}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
            "0018|0050": str(spacing[2]),
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


def test_dicom_series_folder_with_modality_tag(tmp_path):
    array = (np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5) * 3 + 100).astype(np.int16)
    _write_dicom_series(tmp_path / "series", array, modality="MR")
    volume = read_volume(tmp_path / "series", modality="CT")
    assert volume.modality == "MR"  # the DICOM tag wins over the caller's hint
    assert volume.shape == (4, 6, 5)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing_kji, (2.0, 0.9, 0.8), atol=1e-3)
    np.testing.assert_allclose(volume.kji_to_ras((3, 0, 0)), (0, 0, 6.0), atol=1e-3)


def test_folder_without_dicom_is_clear_error(tmp_path):
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path / "empty_folder")


def test_modality_hint_order(tmp_path):
    ct = np.full((2, 3, 4), -1024, np.int16)
    ct[0, 0, 0] = 400
    mr = np.linspace(0, 900, 24, dtype=np.float32).reshape(2, 3, 4)
    assert guess_modality(ct) == "CT"
    assert guess_modality(mr) is None
    assert guess_modality(np.full((2, 2, 2), -5000.0)) is None
    sitk.WriteImage(sitk.GetImageFromArray(ct), str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(mr), str(tmp_path / "mr.nrrd"))
    assert read_volume(tmp_path / "ct.nrrd").modality == "CT"
    assert read_volume(tmp_path / "mr.nrrd").modality is None
    assert read_volume(tmp_path / "mr.nrrd", modality="MR").modality == "MR"


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "nothing.nii.gz")
    volume = Volume(np.zeros((2, 2, 2)))
    with pytest.raises(InputError, match="does not exist"):
        read_label_map(tmp_path / "nothing.nii.gz", volume)


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="Cannot read"):
        read_volume(path)


def test_2d_image(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.uint8)), str(tmp_path / "slice.png"))
    with pytest.raises(InputError, match="2D image"):
        read_volume(tmp_path / "slice.png")


def test_4d_image_needs_component(tmp_path):
    array = np.stack([np.full((3, 4, 5), t, np.float32) for t in range(3)])
    image = sitk.GetImageFromArray(array, isVector=False)
    assert image.GetDimension() == 4
    sitk.WriteImage(image, str(tmp_path / "series4d.nii.gz"))
    with pytest.raises(InputError, match="component=N.*--component"):
        read_volume(tmp_path / "series4d.nii.gz")
    volume = read_volume(tmp_path / "series4d.nii.gz", component=2)
    assert volume.shape == (3, 4, 5)
    assert np.all(volume.array == 2)
    with pytest.raises(InputError, match="out of range"):
        read_volume(tmp_path / "series4d.nii.gz", component=3)


def test_multi_component_image_needs_component(tmp_path):
    rgb = np.zeros((3, 4, 5, 3), np.uint8)
    rgb[..., 1] = 7
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="3 components.*--component"):
        read_volume(tmp_path / "rgb.nrrd")
    volume = read_volume(tmp_path / "rgb.nrrd", component=1)
    assert volume.shape == (3, 4, 5) and np.all(volume.array == 7)


def test_empty_volume(tmp_path):
    path = tmp_path / "empty.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 0\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    with pytest.raises(InputError, match="empty volume"):
        read_volume(path)


def test_nan_and_inf_voxels(tmp_path):
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 1, 1] = np.nan
    array[2, 2, 2] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="2 NaN or infinite"):
        read_volume(tmp_path / "nan.nrrd")


def test_label_grid_mismatch_says_how(tmp_path):
    image, _ = _known_image()
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    volume = read_volume(tmp_path / "image.nrrd")
    shifted = sitk.Image(image)
    shifted.SetOrigin((11.0, -20.0, 30.0))
    sitk.WriteImage(sitk.Cast(shifted, sitk.sitkUInt8), str(tmp_path / "shifted.nrrd"))
    with pytest.raises(InputError, match=r"origin.*Resample"):
        read_label_map(tmp_path / "shifted.nrrd", volume)
    smaller = sitk.GetImageFromArray(np.zeros((5, 6, 6), np.uint8))
    smaller.CopyInformation(sitk.GetImageFromArray(np.zeros((5, 6, 6), np.uint8)))
    sitk.WriteImage(smaller, str(tmp_path / "smaller.nrrd"))
    with pytest.raises(InputError, match=r"size \(i, j, k\) \(6, 6, 5\) vs image \(7, 6, 5\)"):
        read_label_map(tmp_path / "smaller.nrrd", volume)
    spacing = sitk.Image(image)
    spacing.SetSpacing((0.7, 1.3, 3.0))
    sitk.WriteImage(sitk.Cast(spacing, sitk.sitkUInt8), str(tmp_path / "spacing.nrrd"))
    with pytest.raises(InputError, match="spacing"):
        read_label_map(tmp_path / "spacing.nrrd", volume)


def test_label_map_with_fractional_values(tmp_path):
    volume = Volume(np.zeros((2, 3, 4), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]))  # SimpleITK's default grid
    sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 3, 4), 0.5, np.float32)), str(tmp_path / "prob.nrrd"))
    with pytest.raises(InputError, match="non-integer"):
        read_label_map(tmp_path / "prob.nrrd", volume)


# ---------------------------------------------------------------- real data


def test_real_case_image_and_label(shared_data):
    cases = json.loads((shared_data / "cases.json").read_text(encoding="utf-8"))
    case = cases[0]
    folder = shared_data / case["case"]
    volume = read_volume(folder / "image.nii.gz")
    assert volume.shape == tuple(case["size_xyz"][::-1])
    np.testing.assert_allclose(volume.spacing_kji, case["spacing"][::-1], rtol=1e-3)
    if case["modality"] == "CT":
        assert volume.modality == "CT"
    labels = read_label_map(folder / "label.nii.gz", volume)
    assert labels.shape == volume.shape
    present = {int(v) for v in np.unique(labels)} - {0}
    assert present and present <= {int(k) for k in case["labels"]}


def test_real_case_label_round_trip(shared_data, tmp_path):
    cases = json.loads((shared_data / "cases.json").read_text(encoding="utf-8"))
    folder = shared_data / cases[-1]["case"]
    volume = read_volume(folder / "image.nii.gz")
    labels = read_label_map(folder / "label.nii.gz", volume)
    for suffix in (".nii.gz", ".nrrd"):
        out = write_label_map(labels, volume, tmp_path / f"copy{suffix}")
        np.testing.assert_array_equal(read_label_map(out, volume), labels)
        np.testing.assert_allclose(read_volume(out).ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
