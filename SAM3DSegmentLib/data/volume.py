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
SPACING_RANGE_MM = (1e-3, 100.0)
"""Voxel sizes outside this range are taken as a header in the wrong units, not as an image."""


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
        if not isinstance(self.array, np.ndarray) or not (
            np.issubdtype(self.array.dtype, np.number) or self.array.dtype == bool
        ) or np.iscomplexobj(self.array):
            raise InputError(f"Volume '{self.name}' needs a numpy array of real numbers as its image.")
        if self.array.ndim != 3:
            raise InputError(
                f"Volume '{self.name}' has {self.array.ndim} dimensions; a 3D scalar volume is needed."
            )
        if 0 in self.array.shape:
            raise InputError(f"Volume '{self.name}' has shape {self.array.shape}: an axis of size 0 holds no voxels.")
        try:
            self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=float)
        except (TypeError, ValueError) as exc:
            raise InputError("ijk_to_ras must be a 4x4 matrix of numbers.") from exc
        if self.ijk_to_ras.shape != (4, 4):
            raise InputError("ijk_to_ras must be a 4x4 matrix.")
        columns = self.ijk_to_ras[:3, :3]
        lengths = np.linalg.norm(columns, axis=0)
        if (not np.all(np.isfinite(self.ijk_to_ras)) or np.any(lengths == 0)
                or abs(np.linalg.det(columns / np.where(lengths == 0, 1, lengths))) < 1e-6):
            raise InputError(
                f"Volume '{self.name}' has an unusable IJK-to-RAS matrix (not finite, or an axis of zero "
                "length); fix the image's spacing and direction."
            )

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


def check_segmentable(volume: Volume) -> None:
    """InputError unless ``volume`` can be segmented: finite voxels, not one constant value, and a
    voxel size in millimetres between :data:`SPACING_RANGE_MM` (others are headers in wrong units)."""
    array = volume.array
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(
                f"Image '{volume.name}' has {bad} NaN or infinite voxels; replace them (e.g. with the "
                "background value) before segmenting."
            )
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(
            f"Image '{volume.name}' has the same value ({low}) in every voxel: there is nothing to segment. "
            "Check that you gave the image (not an empty export or a blank series)."
        )
    spacing = volume.spacing_kji[::-1]
    low_mm, high_mm = SPACING_RANGE_MM
    if np.any(spacing < low_mm) or np.any(spacing > high_mm):
        raise InputError(
            f"Image '{volume.name}' has voxel size (i, j, k) {', '.join(f'{s:g}' for s in spacing)} mm, outside "
            f"{low_mm:g}..{high_mm:g} mm: its header is probably in other units. Set the spacing in mm "
            "(e.g. Slicer's Volumes module, or SimpleITK image.SetSpacing) and save the image again."
        )
