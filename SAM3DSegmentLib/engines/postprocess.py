"""Clean-up of a propagated 3D mask: keep one 3D connected component, fill holes per slice.

Both are optional. :class:`~SAM3DSegmentLib.engines.slicewise.SlicewiseSession` applies them when its
options ask for it (``fill_holes`` per propagated slice, ``keep_component`` on the 3D result);
any caller can also apply them to any boolean volume.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

from ..data.volume import get_slice
from ..errors import InputError

ComponentChoice = Literal["none", "prompted", "largest"]


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """``mask`` with enclosed background regions filled (one 2D slice)."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def fill_holes_slicewise(mask: np.ndarray, axis: int) -> np.ndarray:
    """A copy of the 3D ``mask`` with holes filled on every slice along ``axis``."""
    filled = np.asarray(mask, dtype=bool).copy()
    other = tuple(a for a in range(3) if a != axis)
    for index in np.flatnonzero(filled.any(axis=other)):
        view = get_slice(filled, axis, int(index))
        view[...] = fill_holes_2d(view)
    return filled


def keep_component(
    mask: np.ndarray,
    choice: ComponentChoice = "prompted",
    seeds: np.ndarray | None = None,
    connectivity: int = 1,
) -> np.ndarray:
    """Keep the 3D connected components of ``mask`` that contain a seed voxel ("prompted"),
    or the largest component ("largest"); "none" returns a copy.

    ``seeds`` is a boolean volume (e.g. the anchor slices' masks, or the clicked voxels). When no
    component touches a seed, "prompted" falls back to the largest component. ``connectivity``
    is 1 (faces), 2 (faces and edges) or 3 (also corners).
    """
    mask = np.asarray(mask, dtype=bool)
    if choice == "none":
        return mask.copy()
    if choice not in ("prompted", "largest"):
        raise InputError(f"Component choice must be 'none', 'prompted' or 'largest'; got {choice!r}.")
    if connectivity not in (1, 2, 3):
        raise InputError(f"Connectivity must be 1, 2 or 3; got {connectivity}.")
    labels, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, connectivity))
    if count <= 1:
        return mask.copy()
    if choice == "prompted" and seeds is not None:
        if seeds.shape != mask.shape:
            raise InputError(f"Seeds have shape {seeds.shape}; the mask has shape {mask.shape}.")
        touched = np.unique(labels[np.asarray(seeds, dtype=bool) & mask])
        touched = touched[touched > 0]
        if touched.size:
            return np.isin(labels, touched)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))
