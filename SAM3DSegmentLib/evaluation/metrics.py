"""Overlap and surface metrics of a 3D mask against a reference, in millimetres.

All metrics are computed on the whole volume (every slice, including those where the reference
is empty), with the voxel spacing. Surfaces are the mask voxels that have a face-neighbour
outside the mask (the volume border counts as outside). Surface distances are Euclidean
distances between surface voxel centres (scipy's exact distance transform with ``sampling``).

Empty masks have explicit values:

========================  ======  =====  =====================================
prediction / reference    Dice    NSD    HD95
========================  ======  =====  =====================================
both empty                1.0     1.0    0.0
exactly one empty         0.0     0.0    the volume's diagonal in mm (worst case)
========================  ======  =====  =====================================

The diagonal (as in the BraTS challenge's convention) keeps HD95 finite so that means and
medians can be taken; :func:`evaluate_masks` also reports which masks were empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputError

DEFAULT_NSD_TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class MaskMetrics:
    """Metrics of one prediction against one reference (whole volume)."""

    dice: float
    nsd: float
    hd95_mm: float
    nsd_tolerance_mm: float
    prediction_voxels: int
    reference_voxels: int

    @property
    def prediction_empty(self) -> bool:
        return self.prediction_voxels == 0

    @property
    def reference_empty(self) -> bool:
        return self.reference_voxels == 0


def _check(prediction: np.ndarray, reference: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    prediction = np.asarray(prediction).astype(bool, copy=False)
    reference = np.asarray(reference).astype(bool, copy=False)
    if prediction.shape != reference.shape:
        raise InputError(
            f"Prediction shape {prediction.shape} differs from reference shape {reference.shape}; "
            "resample both onto the same grid first."
        )
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (prediction.ndim,)).copy()
    if np.any(spacing <= 0):
        raise InputError(f"Voxel spacing must be positive; got {spacing.tolist()}.")
    return prediction, reference, spacing


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient; 1.0 when both are empty, 0.0 when exactly one is."""
    prediction, reference, _ = _check(prediction, reference, 1.0)
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & reference)) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face-neighbour outside the mask (outside the array counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    prediction: np.ndarray, reference: np.ndarray, spacing
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each prediction surface voxel to the reference surface, and back.

    Both masks must be non-empty. Works on the bounding box of their union (padded by one
    voxel), which gives the same distances as the whole volume.
    """
    prediction, reference, spacing = _check(prediction, reference, spacing)
    if not prediction.any() or not reference.any():
        raise InputError("Surface distances need two non-empty masks.")
    union = prediction | reference
    lows, highs = [], []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other))
        lows.append(int(present[0]))
        highs.append(int(present[-1]) + 1)
    box = tuple(slice(lo, hi) for lo, hi in zip(lows, highs))
    pred = np.pad(prediction[box], 1)
    ref = np.pad(reference[box], 1)
    pred_surface, ref_surface = _surface(pred), _surface(ref)
    to_reference = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_reference[pred_surface], to_prediction[ref_surface]


def volume_diagonal_mm(shape, spacing) -> float:
    """Length in mm of the volume's diagonal (the worst possible surface distance)."""
    return float(np.linalg.norm(np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)))


def normalised_surface_dice(
    prediction: np.ndarray, reference: np.ndarray, spacing, tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
) -> float:
    """Fraction of both surfaces (counted in voxels) lying within ``tolerance_mm`` of the other."""
    prediction, reference, spacing = _check(prediction, reference, spacing)
    if tolerance_mm < 0:
        raise InputError(f"NSD tolerance must be >= 0 mm; got {tolerance_mm}.")
    has_pred, has_ref = bool(prediction.any()), bool(reference.any())
    if not has_pred and not has_ref:
        return 1.0
    if not has_pred or not has_ref:
        return 0.0
    return _nsd(*surface_distances(prediction, reference, spacing), tolerance_mm)


def hausdorff95(prediction: np.ndarray, reference: np.ndarray, spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm: the larger of the two directed
    95th percentiles (as in MONAI). Empty cases: see the module docstring."""
    prediction, reference, spacing = _check(prediction, reference, spacing)
    has_pred, has_ref = bool(prediction.any()), bool(reference.any())
    if not has_pred and not has_ref:
        return 0.0
    if not has_pred or not has_ref:
        return volume_diagonal_mm(prediction.shape, spacing)
    return _hd95(*surface_distances(prediction, reference, spacing))


def _nsd(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, tolerance_mm: float) -> float:
    close = np.count_nonzero(pred_to_ref <= tolerance_mm) + np.count_nonzero(ref_to_pred <= tolerance_mm)
    return close / (pred_to_ref.size + ref_to_pred.size)


def _hd95(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray) -> float:
    return float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))


def evaluate_masks(
    prediction: np.ndarray, reference: np.ndarray, spacing, tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
) -> MaskMetrics:
    """Dice, NSD at ``tolerance_mm`` and HD95 of ``prediction`` against ``reference``."""
    prediction, reference, spacing = _check(prediction, reference, spacing)
    if tolerance_mm < 0:
        raise InputError(f"NSD tolerance must be >= 0 mm; got {tolerance_mm}.")
    if prediction.any() and reference.any():
        distances = surface_distances(prediction, reference, spacing)  # computed once for both
        nsd, hd95 = _nsd(*distances, tolerance_mm), _hd95(*distances)
    else:  # the empty cases, defined in the module docstring
        nsd = normalised_surface_dice(prediction, reference, spacing, tolerance_mm)
        hd95 = hausdorff95(prediction, reference, spacing)
    return MaskMetrics(
        dice=dice(prediction, reference),
        nsd=float(nsd),
        hd95_mm=hd95,
        nsd_tolerance_mm=float(tolerance_mm),
        prediction_voxels=int(prediction.sum()),
        reference_voxels=int(reference.sum()),
    )
