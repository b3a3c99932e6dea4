"""Read volumes and label maps, write label maps and Slicer segmentations, on the image's exact grid.

Files are read with SimpleITK: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha,
.mhd) and DICOM series folders. SimpleITK works in LPS; volumes here carry Slicer's IJK-to-RAS
matrix, which is SimpleITK's IJK-to-LPS matrix (direction x spacing, origin) with the first
two rows negated. Arrays are (k, j, i), as ``sitk.GetArrayFromImage`` and Slicer give them.

Modality hint (for intensity windowing), in order: the DICOM Modality tag (0008|0060), the
caller's ``modality``, else a heuristic: CT when the minimum intensity is below -500 and at or
above -3100 (air is about -1000 HU; scanners pad with -1024, -2000 or -3024), otherwise None
(unknown; windowing then uses percentiles as for MR).

Checks that ITK does not make: a NIfTI file's payload is read through once before ITK reads it,
because ITK zero-fills a truncated file, reads a size-0 axis as one slice and NaN / Inf voxels as 0.
Writers check the output name and folder first, write to a temporary name in the target folder
and rename it into place, so a failed or interrupted write leaves no file that looks complete.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import struct
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .volume import Volume

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LABEL_MAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd")
SEGMENTATION_SUFFIX = ".seg.nrrd"
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
"""NIfTI datatype codes of real floating-point voxels (ITK reads their NaN and Inf as 0)."""
SCAN_BLOCK_BYTES = 1 << 24
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


def _itk_reason(exc: Exception) -> str:
    """The informative line of a SimpleITK exception, without source paths and object addresses."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Exception thrown", "Reason:"))] or lines or [""]
    return re.sub(r"^(ITK ERROR|sitk::ERROR): (\w+\(0x[0-9a-f]+\): )?", "", lines[-1])[:200]


def _read_image(path: Path):
    """(SimpleITK image, DICOM modality or None) for a file or a DICOM series folder."""
    sitk = _sitk()
    if path.is_dir():
        return _read_dicom_series(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_file(path)
    try:
        return sitk.ReadImage(str(path)), None
    except RuntimeError as exc:
        raise InputError(
            f"Cannot read {path}: it is damaged, truncated or not an image ({_itk_reason(exc)}). Supported: "
            "NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd) or a folder holding one DICOM series."
        ) from exc


def _nifti_layout(head: bytes):
    """(shape, numpy dtype, payload offset) of a single-file NIfTI-1/2 header, or None."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348 and head[344:348] == b"n+1\0":
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
        elif len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540 and head[4:8] == b"n+2\0":
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
        else:
            continue
        if bitpix <= 0 or bitpix % 8:
            return None
        dtype = np.dtype(endian + NIFTI_FLOAT_TYPES.get(datatype, f"V{bitpix // 8}"))
        return dims, dtype, offset
    return None


def check_nifti_file(path: str | Path) -> None:
    """InputError when a single-file NIfTI has a size-0 axis, is truncated or damaged, or holds
    NaN / Inf voxels (ITK would read these silently as one slice, zeros and zeros)."""
    path = Path(path)
    compressed = _starts_gzip(path)
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            layout = _nifti_layout(stream.read(540))
            if layout is None:
                return  # not a single-file NIfTI header: ITK's own checks apply
            dims, dtype, offset = layout
            rank = dims[0]
            if not 1 <= rank <= 7 or any(size < 1 for size in dims[1 : rank + 1]):
                raise InputError(
                    f"{path} is not a usable image: its NIfTI header gives size {list(dims[1 : max(rank, 0) + 1])} "
                    "(an axis of size 0). The file is damaged or was written incompletely; export it again."
                )
            expected = int(np.prod(dims[1 : rank + 1], dtype=np.int64)) * dtype.itemsize
            stream.seek(offset)
            remaining, bad = expected, 0
            while remaining > 0:
                block = stream.read(min(remaining, SCAN_BLOCK_BYTES))
                if not block:
                    break
                remaining -= len(block)
                if dtype.kind == "f":
                    values = np.frombuffer(block[: len(block) - len(block) % dtype.itemsize], dtype)
                    bad += int(np.count_nonzero(~np.isfinite(values)))
            while compressed and stream.read(SCAN_BLOCK_BYTES):
                pass  # read to the end: gzip checks its length and CRC
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(
            f"{path} is truncated or damaged ({exc}); copy or export it again."
        ) from exc
    if remaining > 0:
        raise InputError(
            f"{path} is truncated: it holds {expected - remaining} of the {expected} bytes of voxels its "
            "header announces. Copy or export it again."
        )
    if bad:
        raise InputError(
            f"{path} has {bad} NaN or infinite voxels; replace them (e.g. with the background value) "
            "before segmenting."
        )


def _starts_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _read_dicom_series(folder: Path):
    sitk = _sitk()
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns about every non-DICOM file
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
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
    if dimension == 3 and components == 1 and component not in (None, 0):
        raise InputError(f"{path} holds one 3D scalar volume: there is no component {component}; drop --component.")
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


def check_output_path(path: str | Path, suffixes: Sequence[str] = (*LABEL_MAP_SUFFIXES, SEGMENTATION_SUFFIX),
                      what: str = "the output") -> Path:
    """``path`` if a file of one of ``suffixes`` (any letter case) can be written there, else InputError.

    Checks the name, that it is not a folder, and that its folder (or the nearest existing parent,
    the folders are made when writing) takes a file: a probe file is created and removed.
    """
    path = Path(path).expanduser()
    if not any(path.name.lower().endswith(suffix) for suffix in suffixes):
        raise InputError(f"Cannot write {what} to {path}: use a name ending in {', '.join(suffixes)}.")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name for {what}, e.g. {path / ('result' + suffixes[0])}.")
    check_output_folder(path.parent, what)
    return path


def check_output_folder(folder: str | Path, what: str = "the output") -> Path:
    """``folder`` if files can be written there (it, or its nearest existing parent, takes a new
    file: a probe file is created and removed), else InputError."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"Cannot write {what} in {folder}: {existing} is a file, not a folder.")
    probe = existing / f".sam3d-probe-{uuid.uuid4().hex[:12]}"
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"Cannot write {what} in {folder}: {existing} does not take new files ({exc.strerror or exc}). "
            "Choose a folder you can write to."
        ) from exc
    return folder


@contextmanager
def _written_atomically(path: Path, suffixes: Sequence[str], what: str):
    """Yields a temporary name beside ``path`` (with the suffix in lower case, for the writers);
    renames it to ``path`` when the block succeeds and removes it otherwise."""
    suffix = next(s for s in sorted(suffixes, key=len, reverse=True) if path.name.lower().endswith(s))
    partial = path.with_name(f".{path.name[: -len(suffix)]}-{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        os.replace(partial, path)
    except (OSError, RuntimeError) as exc:
        raise InputError(f"Cannot write {what} to {path}: {getattr(exc, 'strerror', None) or _itk_reason(exc)}.") from exc
    finally:
        partial.unlink(missing_ok=True)


def _as_labels(array: np.ndarray, what: str) -> np.ndarray:
    """Non-negative integer labels of a boolean, integer or integer-valued float array."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{what} must hold non-negative integer labels or booleans; got {array.dtype}.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
            raise InputError(f"{what} has non-integer values; a label map holds integer labels (or booleans).")
    if array.size and array.min() < 0:
        raise InputError(f"{what} has negative values; labels must be 0 (background) or positive.")
    return array.astype(_label_dtype(array), copy=False)


def write_label_map(mask_or_labels: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write a binary mask or integer label array (k, j, i) on ``reference``'s grid (.nii, .nii.gz, .nrrd)."""
    path = Path(path).expanduser()
    if path.name.lower().endswith(SEGMENTATION_SUFFIX):
        raise InputError(f"{path} is a Slicer segmentation name; use write_segmentation for .seg.nrrd files.")
    check_output_path(path, LABEL_MAP_SUFFIXES, "a label map")
    labels = np.asarray(mask_or_labels)
    if labels.shape != reference.shape:
        raise InputError(f"Label array shape {labels.shape} differs from the image shape {reference.shape}.")
    image = image_from_array(_as_labels(labels, "A label map"), reference.ijk_to_ras)
    with _written_atomically(path, LABEL_MAP_SUFFIXES, "a label map") as partial:
        _sitk().WriteImage(image, str(partial), useCompression=True)
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

    path = check_output_path(path, (SEGMENTATION_SUFFIX,), "a Slicer segmentation")
    if isinstance(labels, Mapping):
        masks = {}
        for value, mask in sorted(labels.items()):
            mask = _as_labels(mask, f"The mask of label {value}")
            if mask.max(initial=0) > 1:
                raise InputError(f"The mask of label {value} holds values above 1; give a boolean (0/1) mask per label.")
            masks[int(value)] = mask > 0
    else:
        array = _as_labels(labels, "The label array")
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
    with _written_atomically(path, (SEGMENTATION_SUFFIX,), "a Slicer segmentation") as partial:
        slicerio.write_segmentation(str(partial), segmentation)
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
