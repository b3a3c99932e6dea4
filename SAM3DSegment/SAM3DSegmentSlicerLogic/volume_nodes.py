"""Volume nodes as library volumes, and numpy masks as oriented labelmaps (and back)."""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.errors import InputError


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """The linear transform from ``node``'s own coordinates to world RAS (identity without a parent transform)."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise InputError(
            f"'{node.GetName()}' is under a non-linear transform. "
            "Harden the transform (Data module: right-click > Harden transform) first."
        )
    to_world = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(to_world)
    return matrix_to_numpy(to_world)


def ijk_to_world(volume_node) -> np.ndarray:
    """IJK-to-RAS of ``volume_node`` including a linear parent transform (world RAS)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return node_to_world(volume_node) @ matrix_to_numpy(matrix)


def ijk_to_node_coordinates(node, volume: Volume) -> np.ndarray:
    """The volume's voxels (IJK) in ``node``'s own coordinates: the volume's IJK-to-world followed by
    the inverse of ``node``'s parent transform (e.g. a segmentation under its own transform)."""
    return np.linalg.inv(node_to_world(node)) @ np.asarray(volume.ijk_to_ras, dtype=float)


def volume_from_node(volume_node) -> Volume:
    """The library ``Volume`` of a scalar volume node: array (k, j, i) and IJK-to-RAS (world).

    Raises InputError with advice for no node, no image, vector (4D) or 2D volumes.
    """
    if volume_node is None:
        raise InputError("No source volume is selected. Select the volume to segment first.")
    image = volume_node.GetImageData()
    name = volume_node.GetName() or "volume"
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"Volume '{name}' has no image data. Load or select another volume.")
    components = image.GetNumberOfScalarComponents()
    if components != 1 or volume_node.IsA("vtkMRMLVectorVolumeNode"):
        raise InputError(
            f"Volume '{name}' has {components} components per voxel (a vector, colour or 4D volume). "
            "Select a scalar 3D volume, or extract one frame/component first."
        )
    dims_ijk = image.GetDimensions()
    if min(dims_ijk) < 2:
        raise InputError(
            f"Volume '{name}' is {dims_ijk[0]} x {dims_ijk[1]} x {dims_ijk[2]} voxels: a 2D image. "
            "SAM 3D needs a 3D volume with at least 2 slices along every axis."
        )
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = scalars.reshape(dims_ijk[::-1]).copy()
    modality = volume_node.GetAttribute("DICOM.Modality")
    modality = modality.upper() if modality in ("CT", "MR", "ct", "mr") else None
    return Volume(array, ijk_to_world(volume_node), name=name, modality=modality)


def full_extent(shape_kji) -> tuple:
    """Inclusive (k, j, i) limits of a whole volume."""
    return tuple((0, int(n) - 1) for n in shape_kji)


def extent_slices(extent_kji) -> tuple:
    """Numpy index of an inclusive (k, j, i) extent."""
    return tuple(slice(low, high + 1) for low, high in extent_kji)


def oriented_image_from_block(block: np.ndarray, ijk_to_ras: np.ndarray, start_kji=(0, 0, 0)):
    """A ``vtkOrientedImageData`` (uint8 0/1) of ``block`` placed at voxel ``start_kji`` of the volume grid."""
    import slicer

    k0, j0, i0 = (int(v) for v in start_kji)
    nk, nj, ni = block.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(block, dtype=np.uint8).ravel()
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras))
    return image


def oriented_image_from_mask(mask: np.ndarray, ijk_to_ras: np.ndarray, extent_kji=None):
    """A ``vtkOrientedImageData`` (uint8 0/1) of ``mask`` (k, j, i) in the volume's geometry.

    ``extent_kji`` = ((k0, k1), (j0, j1), (i0, i1)) inclusive limits only that block.
    """
    extent_kji = extent_kji or full_extent(mask.shape)
    return oriented_image_from_block(mask[extent_slices(extent_kji)], ijk_to_ras, [low for low, _ in extent_kji])


def mask_from_oriented_image(
    image, shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray, label: int | None = None, extent_kji=None
) -> np.ndarray:
    """Resample an oriented labelmap onto the volume grid (nearest neighbour); True where it
    equals ``label`` (or is non-zero when ``label`` is None). With ``extent_kji`` only that
    block of the grid is resampled and returned."""
    import slicer

    extent_kji = extent_kji or full_extent(shape_kji)
    block_shape = tuple(high - low + 1 for low, high in extent_kji)
    if image is None or image.IsEmpty():
        return np.zeros(block_shape, dtype=bool)
    reference = slicer.vtkOrientedImageData()
    (k0, k1), (j0, j1), (i0, i1) = extent_kji
    reference.SetExtent(i0, i1, j0, j1, k0, k1)
    reference.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        image, reference, resampled
    ):
        raise InputError("Could not resample the segment onto the source volume's grid.")
    scalars = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(block_shape)
    return scalars != 0 if label is None else scalars == label


def add_volume_node(scene, volume: Volume, name: str | None = None):
    """A new scalar volume node in ``scene`` holding ``volume`` (array, geometry, modality)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or volume.name or "volume")
    image = vtk.vtkImageData()
    nk, nj, ni = volume.shape
    image.SetDimensions(ni, nj, nk)
    array = np.ascontiguousarray(volume.array)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_matrix(volume.ijk_to_ras))
    if volume.modality:
        node.SetAttribute("DICOM.Modality", volume.modality)
    return node
