"""Read volumes and label maps, write label maps and Slicer segmentations, on the image's exact grid.

Files are read with SimpleITK: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha,
.mhd) and DICOM series folders. SimpleITK works in LPS; volumes here carry Slicer's IJK-to-RAS
matrix, which is SimpleITK's IJK-to-LPS matrix (direction x spacing, origin) with the first
two rows negated. Arrays are (k, j, i), as ``sitk.GetArrayFromImage`` and Slicer give them.

Modality hint (for intensity windowing), in order: the DICOM Modality tag (0008|0060), the
caller's ``modality``, else a heuristic: CT when the minimum intensity is below -500 and at or
above -3100 (air is about -1000 HU; scanners pad with -1024, -2000 or -3024), otherwise None
(unknown; windowing then uses percentiles as for MR).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .volume import Volume

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LABEL_MAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd")
DEFAULT_COLORS = (
    (0.945, 0.839, 0.569), (0.502, 0.682, 0.502), (0.694, 0.478, 0.396), (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310), (0.867, 0.510, 0.396), (0.565, 0.933, 0.565), (0.753, 0.408, 0.690),
)


def _sitk():
    import SimpleITK as sitk

    return sitk


def ijk_to_ras_of(image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a 3D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * spacing[np.newaxis, :]
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ ijk_to_lps


def image_from_array(array: np.ndarray, ijk_to_ras: np.ndarray):
    """A SimpleITK image of a (k, j, i) array placed by an IJK-to-RAS matrix."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    ijk_to_lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise InputError("The IJK-to-RAS matrix has a zero-length axis; cannot write the image.")
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (columns / spacing[np.newaxis, :]).ravel()))
    image.SetOrigin(tuple(float(v) for v in ijk_to_lps[:3, 3]))
    return image


def _name_of(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def guess_modality(array: np.ndarray) -> str | None:
    """"CT" when intensities look like Hounsfield units (see module docstring), else None."""
    if array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return None
    low = float(np.min(array))
    return "CT" if -3100.0 <= low < -500.0 else None


def _read_image(path: Path):
    """(SimpleITK image, DICOM modality or None) for a file or a DICOM series folder."""
    sitk = _sitk()
    if path.is_dir():
        return _read_dicom_series(path)
    try:
        return sitk.ReadImage(str(path)), None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputError(
            f"Cannot read {path}: not a readable image ({first}). Supported: NIfTI (.nii, .nii.gz), "
            "NRRD (.nrrd), MetaImage (.mha, .mhd) or a folder holding one DICOM series."
        ) from exc


def _read_dicom_series(folder: Path):
    sitk = _sitk()
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"Folder {folder} holds no DICOM series; give an image file or a DICOM series folder.")
    files_by_series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    uid = max(files_by_series, key=lambda key: len(files_by_series[key]))
    if len(series) > 1:
        log.warning("Folder %s holds %d DICOM series; reading the largest (%s, %d files).",
                    folder, len(series), uid, len(files_by_series[uid]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_by_series[uid])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"Cannot read the DICOM series in {folder}: {str(exc).strip().splitlines()[-1]}") from exc
    modality = None
    if reader.HasMetaDataKey(0, "0008|0060"):
        modality = reader.GetMetaData(0, "0008|0060").strip() or None
    return image, modality


def _check_component(component: int | None, count: int, what: str, path: Path) -> None:
    if component is None:
        raise InputError(f"{what}; pick one with component=N (CLI: --component N), N from 0 to {count - 1}.")
    if not 0 <= component < count:
        raise InputError(f"Component {component} is out of range for {path}: use 0 to {count - 1}.")


def _select_component(image, component: int | None, path: Path):
    """The 3D scalar image in ``image``, picking ``component`` of a 4D or multi-component image."""
    sitk = _sitk()
    dimension = image.GetDimension()
    if dimension == 2:
        raise InputError(f"{path} is a 2D image ({image.GetSize()}); a 3D volume is needed.")
    if dimension == 4:
        count = image.GetSize()[3]
        _check_component(component, count, f"{path} is a 4D image with {count} volumes", path)
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, component])
    elif dimension != 3:
        raise InputError(f"{path} has {dimension} dimensions; a 3D volume is needed.")
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        what = f"{path} has {components} components per voxel (e.g. RGB or a vector image)"
        _check_component(component, components, what, path)
        image = sitk.VectorIndexSelectionCast(image, component)
    return image


def read_volume(path: str | Path, component: int | None = None, modality: str | None = None) -> Volume:
    """A :class:`Volume` from an image file or a DICOM series folder (see module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"Image {path} does not exist.")
    image, dicom_modality = _read_image(path)
    image = _select_component(image, component, path)
    array = _sitk().GetArrayFromImage(image)
    if array.size == 0:
        raise InputError(f"{path} is an empty volume (size {image.GetSize()}): it has no voxels.")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(
                f"{path} has {bad} NaN or infinite voxels; replace them (e.g. with the background value) "
                "before segmenting."
            )
    hint = dicom_modality or modality or guess_modality(array)
    return Volume(array=array, ijk_to_ras=ijk_to_ras_of(image), name=_name_of(path), modality=hint)


def _grid_differences(image, reference: Volume) -> list[str]:
    differences = []
    if tuple(image.GetSize())[::-1] != reference.shape:
        differences.append(f"size (i, j, k) {tuple(image.GetSize())} vs image {reference.shape[::-1]}")
    matrix = ijk_to_ras_of(image)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    ref_spacing = np.linalg.norm(reference.ijk_to_ras[:3, :3], axis=0)
    if not np.allclose(spacing, ref_spacing, rtol=1e-4, atol=1e-5):
        differences.append(f"spacing {np.round(spacing, 4).tolist()} vs image {np.round(ref_spacing, 4).tolist()}")
    tolerance = 1e-3 * float(np.min(ref_spacing)) + 1e-6
    if not np.allclose(matrix[:3, 3], reference.ijk_to_ras[:3, 3], atol=tolerance):
        differences.append(
            f"origin (RAS) {np.round(matrix[:3, 3], 3).tolist()} vs image {np.round(reference.ijk_to_ras[:3, 3], 3).tolist()}"
        )
    directions = matrix[:3, :3] / spacing
    ref_directions = reference.ijk_to_ras[:3, :3] / ref_spacing
    if not np.allclose(directions, ref_directions, atol=1e-4):
        differences.append("axis directions differ")
    return differences


def read_label_map(path: str | Path, reference: Volume) -> np.ndarray:
    """The integer label array (k, j, i) in ``path``; it must lie on ``reference``'s exact grid."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"Label map {path} does not exist.")
    image, _ = _read_image(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"Label map {path} must be a 3D scalar image (it has {image.GetDimension()} dimensions "
                         f"and {image.GetNumberOfComponentsPerPixel()} components).")
    differences = _grid_differences(image, reference)
    if differences:
        raise InputError(
            f"Label map {path} is not on the grid of image '{reference.name}': {'; '.join(differences)}. "
            "Resample it onto the image grid with nearest-neighbour interpolation, e.g. "
            "SimpleITK.Resample(label, image, SimpleITK.Transform(), SimpleITK.sitkNearestNeighbor, 0) or Slicer's "
            "'Resample Image (BRAINS)' with the image as reference and NearestNeighbor interpolation."
        )
    array = _sitk().GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(f"Label map {path} has NaN or infinite voxels.")
        if not np.array_equal(array, np.rint(array)):
            raise InputError(f"Label map {path} has non-integer values; a label map holds integer labels.")
        array = array.astype(np.int32)
    if array.size and array.min() < 0:
        raise InputError(f"Label map {path} has negative labels; labels must be 0 (background) or positive.")
    return array


def _label_dtype(array: np.ndarray):
    top = int(array.max()) if array.size else 0
    return np.uint8 if top < 256 else (np.uint16 if top < 65536 else np.uint32)


def _check_suffix(path: Path, allowed: Sequence[str], what: str) -> None:
    if not any(path.name.lower().endswith(suffix) for suffix in allowed):
        raise InputError(f"Cannot write {what} to {path}: use one of {', '.join(allowed)}.")


def write_label_map(mask_or_labels: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write a binary mask or integer label array (k, j, i) on ``reference``'s grid (.nii, .nii.gz, .nrrd)."""
    path = Path(path).expanduser()
    _check_suffix(path, LABEL_MAP_SUFFIXES, "a label map")
    if path.name.lower().endswith(".seg.nrrd"):
        raise InputError(f"{path} is a Slicer segmentation name; use write_segmentation for .seg.nrrd files.")
    labels = np.asarray(mask_or_labels)
    if labels.shape != reference.shape:
        raise InputError(f"Label array shape {labels.shape} differs from the image shape {reference.shape}.")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    elif np.issubdtype(labels.dtype, np.floating) or (labels.size and labels.min() < 0):
        raise InputError("A label map must hold non-negative integer labels (or booleans).")
    labels = labels.astype(_label_dtype(labels), copy=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sitk().WriteImage(image_from_array(labels, reference.ijk_to_ras), str(path), useCompression=True)
    return path


def write_segmentation(
    labels: Mapping[int, np.ndarray] | np.ndarray,
    reference: Volume,
    path: str | Path,
    names: Mapping[int, str] | Sequence[str] | None = None,
    colors: Mapping[int, Sequence[float]] | Sequence[Sequence[float]] | None = None,
) -> Path:
    """Write a Slicer segmentation (``.seg.nrrd``) with segment names and colours (RGB in 0..1).

    ``labels`` is a label array (k, j, i) (one segment per non-zero value) or a dict
    ``{label value: binary mask}`` (masks may overlap; slicerio then uses several layers).
    ``names``/``colors`` are dicts by label value or sequences in ascending label order.
    """
    import slicerio

    path = Path(path).expanduser()
    _check_suffix(path, (".seg.nrrd",), "a Slicer segmentation")
    if isinstance(labels, Mapping):
        masks = {int(value): np.asarray(mask, dtype=bool) for value, mask in sorted(labels.items())}
    else:
        array = np.asarray(labels)
        if array.shape != reference.shape:
            raise InputError(f"Label array shape {array.shape} differs from the image shape {reference.shape}.")
        values = [int(v) for v in np.unique(array) if v != 0]
        masks = {value: array == value for value in values}
    for value, mask in masks.items():
        if mask.shape != reference.shape:
            raise InputError(f"Mask of label {value} has shape {mask.shape}, the image {reference.shape}.")
    values = list(masks)
    name_of = _by_label(names, values, "names")
    color_of = _by_label(colors, values, "colors")
    ijk_to_lps = LPS_TO_RAS @ reference.ijk_to_ras
    segmentation = slicerio.segmentation.create_segmentation(reference.shape[::-1], ijk_to_lps)
    for position, value in enumerate(values):
        color = color_of.get(value, DEFAULT_COLORS[position % len(DEFAULT_COLORS)])
        slicerio.segmentation.add_segment(
            segmentation,
            masks[value].transpose(2, 1, 0),
            {"id": f"Segment_{value}", "name": name_of.get(value, f"Segment_{value}"),
             "color": [float(c) for c in color]},
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    slicerio.write_segmentation(str(path), segmentation)
    return path


def _by_label(given, values: list[int], what: str) -> dict:
    if given is None:
        return {}
    if isinstance(given, Mapping):
        return {int(k): v for k, v in given.items()}
    given = list(given)
    if len(given) != len(values):
        raise InputError(f"{len(given)} {what} given for {len(values)} segments (labels {values}).")
    return dict(zip(values, given))
