"""A synthetic CT-like sample volume with a known truth, made by code (no download).

A textured soft-tissue "liver" inside a fat-and-muscle body in air, with a hypodense
ellipsoidal "lesion", in Hounsfield units with noise. Voxels are anisotropic (0.8 x 0.8 x 2.5 mm)
and the IJK-to-RAS direction is not the identity (I runs right-to-left, J anterior-to-posterior,
as in a DICOM/LPS scan, with a small rotation), so code that ignores the geometry shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .volume import Volume

SPACING_IJK_MM = (0.8, 0.8, 2.5)


@dataclass
class SampleCase:
    """The volume, the lesion's true mask (k, j, i) and a click at the lesion's centre (k, j, i)."""

    volume: Volume
    truth: np.ndarray
    click_kji: tuple[int, int, int]
    structure: str = "lesion"


def sample_geometry(spacing_ijk=SPACING_IJK_MM, rotation_deg: float = 10.0) -> np.ndarray:
    """IJK-to-RAS: I -> -R (left), J -> -A (posterior), K -> +S, rotated about S."""
    angle = np.deg2rad(rotation_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rotation @ np.diag([-1.0, -1.0, 1.0])
    matrix = np.eye(4)
    matrix[:3, :3] = direction * np.asarray(spacing_ijk, dtype=float)
    matrix[:3, 3] = (60.0, 40.0, -30.0)
    return matrix


def make_sample(shape_kji=(32, 112, 128), seed: int = 0) -> SampleCase:
    """The sample case; the same ``seed`` always gives the same volume."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape_kji
    spacing_kji = np.asarray(SPACING_IJK_MM[::-1])
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape_kji), indexing="ij")
    # positions in mm from the volume centre
    z, y, x = ((k - nk / 2) * spacing_kji[0], (j - nj / 2) * spacing_kji[1], (i - ni / 2) * spacing_kji[2])

    hu = np.full(shape_kji, -1000.0, dtype=np.float32)  # air
    body = (x / 48.0) ** 2 + (y / 40.0) ** 2 <= 1.0
    hu[body] = -100.0  # fat
    muscle = body & ((x / 44.0) ** 2 + (y / 36.0) ** 2 > 1.0)
    hu[muscle] = 50.0
    liver = ((x + 8.0) / 32.0) ** 2 + ((y - 2.0) / 26.0) ** 2 + (z / 60.0) ** 2 <= 1.0
    hu[liver] = 60.0
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape_kji).astype(np.float32), (0.6, 2.0, 2.0))
    texture /= texture.std()  # unit-variance blobs a few mm across
    hu += 15.0 * texture * body

    centre = np.array([1.5, 3.0, -5.0])  # z, y, x in mm
    radii = np.array([12.0, 11.0, 14.0])
    lesion = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 <= 1.0
    hu[lesion] = 10.0 + 10.0 * texture[lesion]
    hu += rng.normal(0.0, 12.0, shape_kji).astype(np.float32)
    hu = ndimage.gaussian_filter(hu, (0.3, 0.7, 0.7))  # scanner blur

    click = tuple(int(round(c)) for c in np.array([nk / 2, nj / 2, ni / 2]) + centre / spacing_kji)
    volume = Volume(np.round(hu).astype(np.int16), sample_geometry(), name="sample_lesion", modality="CT")
    return SampleCase(volume=volume, truth=lesion, click_kji=click)
