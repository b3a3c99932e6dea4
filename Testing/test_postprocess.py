"""3D component selection and slice-by-slice hole filling."""

import numpy as np
import pytest

from SAM3DSegmentLib.engines.postprocess import (
    fill_holes_2d,
    fill_holes_slicewise,
    keep_component,
)
from SAM3DSegmentLib.errors import InputError


def two_blobs():
    mask = np.zeros((10, 12, 14), bool)
    mask[1:4, 1:4, 1:4] = True  # small, 27 voxels
    mask[5:9, 6:11, 7:13] = True  # large, 120 voxels
    return mask


def test_keep_prompted_component_follows_the_seed_not_the_size():
    mask = two_blobs()
    seeds = np.zeros_like(mask)
    seeds[2, 2, 2] = True
    kept = keep_component(mask, "prompted", seeds)
    assert kept.sum() == 27 and kept[2, 2, 2]
    assert keep_component(mask, "largest").sum() == 120
    assert keep_component(mask, "prompted", np.zeros_like(mask)).sum() == 120  # no seed hit: largest
    assert np.array_equal(keep_component(mask, "none"), mask)


def test_connectivity_decides_whether_corners_join():
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    assert keep_component(mask, "largest", connectivity=1).sum() == 1
    assert keep_component(mask, "largest", connectivity=3).sum() == 2


def test_fill_holes_per_slice_only_fills_enclosed_regions():
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    open_ring = ring.copy()
    open_ring[4, 2:5] = False  # the hole now reaches the border of the object: not enclosed
    assert fill_holes_2d(ring)[4, 4]
    assert not fill_holes_2d(open_ring)[4, 3]
    volume = np.zeros((3, 9, 9), bool)
    volume[1] = ring
    # along axis 0 the hole is enclosed on slice 1; along axis 2 no slice encloses it
    assert fill_holes_slicewise(volume, 0)[1, 4, 4]
    assert not fill_holes_slicewise(volume, 2)[1, 4, 4]


def test_bad_choices_raise():
    with pytest.raises(InputError, match="Component choice"):
        keep_component(two_blobs(), "biggest")
    with pytest.raises(InputError, match="Seeds have shape"):
        keep_component(two_blobs(), "prompted", np.zeros((2, 2, 2), bool))
