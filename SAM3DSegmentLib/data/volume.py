"""Volumes as numpy arrays in (k, j, i) order, and slice access along an array axis.

Axis convention used everywhere in the library: ``axis`` is an index into the numpy array's
shape ``(k, j, i)``. Axis 0 steps through K (the usual axial slices of an axial scan), axis 1
through J, axis 2 through I. A slice along ``axis`` is the 2D array left after removing that
axis, so its rows and columns are the two remaining array axes in order:

=====  =================  ============
axis   slice rows         slice cols
=====  =================  ============
0      j                  i
1      k                  i
2      k                  j
=====  =================  ============
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

AXIS_NAMES = {0: "K", 1: "J", 2: "I"}


def slice_index_tuple(axis: int, index: int) -> tuple:
    """Index tuple selecting slice ``index`` along array ``axis`` of a 3D array."""
    if axis not in (0, 1, 2):
        raise InputError(f"Slice axis must be 0, 1 or 2 (array axes k, j, i); got {axis!r}.")
    key: list = [slice(None)] * 3
    key[axis] = index
    return tuple(key)


def get_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A view of slice ``index`` along ``axis`` (rows and cols as in the module docstring)."""
    return array[slice_index_tuple(axis, index)]


def slice_to_kji(axis: int, index: int, row: float, col: float) -> tuple[float, float, float]:
    """Voxel (k, j, i) of pixel (row, col) on slice ``index`` along ``axis``."""
    if axis == 0:
        return (index, row, col)
    if axis == 1:
        return (row, index, col)
    return (row, col, index)


def kji_to_slice(axis: int, kji) -> tuple[int, float, float]:
    """(slice index, row, col) of voxel (k, j, i) for slices along ``axis``."""
    k, j, i = kji
    if axis == 0:
        return (k, j, i)
    if axis == 1:
        return (j, k, i)
    return (i, k, j)


@dataclass
class Volume:
    """A scalar 3D image.

    ``array`` is (k, j, i); ``ijk_to_ras`` is the 4x4 matrix taking homogeneous (i, j, k, 1)
    to RAS millimetres (Slicer's convention; it may contain flips). ``modality`` is a hint for
    intensity windowing: "CT", "MR" or None (unknown).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray = field(default_factory=lambda: np.eye(4))
    name: str = ""
    modality: str | None = None

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=float)
        if self.array.ndim != 3:
            raise InputError(
                f"Volume '{self.name}' has {self.array.ndim} dimensions; a 3D scalar volume is needed."
            )
        if self.ijk_to_ras.shape != (4, 4):
            raise InputError("ijk_to_ras must be a 4x4 matrix.")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_kji(self) -> np.ndarray:
        """Voxel size in mm along the array axes (k, j, i)."""
        spacing_ijk = np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)
        return spacing_ijk[::-1].copy()

    def n_slices(self, axis: int) -> int:
        slice_index_tuple(axis, 0)
        return self.shape[axis]

    def slice(self, axis: int, index: int) -> np.ndarray:
        return get_slice(self.array, axis, index)

    def ras_to_kji(self, ras) -> np.ndarray:
        """Continuous voxel coordinates (k, j, i) of RAS points (N x 3 or 3)."""
        ras = np.atleast_2d(np.asarray(ras, dtype=float))
        homogeneous = np.c_[ras, np.ones(len(ras))]
        ijk = (np.linalg.inv(self.ijk_to_ras) @ homogeneous.T).T[:, :3]
        kji = ijk[:, ::-1]
        return kji[0] if len(kji) == 1 else kji

    def kji_to_ras(self, kji) -> np.ndarray:
        """RAS points of voxel coordinates (k, j, i) (N x 3 or 3)."""
        kji = np.atleast_2d(np.asarray(kji, dtype=float))
        homogeneous = np.c_[kji[:, ::-1], np.ones(len(kji))]
        ras = (self.ijk_to_ras @ homogeneous.T).T[:, :3]
        return ras[0] if len(ras) == 1 else ras
