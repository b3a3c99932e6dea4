"""Reading segments as numpy masks and writing a result into one segment.

Writing follows the Segment Editor's rules: an undo state is saved first (only when something
changes), only the selected segment is written (plus the overwritten segments losing voxels),
only inside the bounding box of what changed, and the masking settings are honoured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from SAM3DSegmentLib.errors import InputError
from SAM3DSegmentLib.volume import Volume

from .masking import MaskingSettings, SegmentLayer, apply_masking, editable_region, segments_to_overwrite
from .volume_nodes import mask_from_oriented_image, oriented_image_from_mask

log = logging.getLogger(__name__)

ExtentKJI = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass
class WriteReport:
    """What a write changed: voxels of the selected segment, its extent, voxels taken from others."""

    changed_voxels: int
    extent_kji: ExtentKJI | None
    overwritten: dict[str, int] = field(default_factory=dict)
    segment_after: np.ndarray | None = field(default=None, repr=False)


def _segments_logic():
    import slicer

    return slicer.vtkSlicerSegmentationsModuleLogic


def check_segment(segmentation_node, segment_id: str | None) -> None:
    """Raise InputError with advice when the segmentation or segment cannot be edited."""
    if segmentation_node is None:
        raise InputError("No segmentation is selected. Create or select a segmentation first.")
    segmentation = segmentation_node.GetSegmentation()
    if not segment_id or segmentation.GetSegment(segment_id) is None:
        raise InputError("No segment is selected. Add a segment (or select one) in the segment list first.")
    import slicer

    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != labelmap:
        raise InputError(
            f"Segmentation '{segmentation_node.GetName()}' is stored as "
            f"{segmentation.GetSourceRepresentationName()}; SAM 3D edits binary labelmaps. "
            "Convert its source representation to binary labelmap (Segmentations module) first."
        )


def read_segment(segmentation_node, segment_id: str, volume: Volume) -> np.ndarray:
    """The segment's voxels on the volume's grid (k, j, i), as booleans.

    Segments share labelmap layers; a segment is the voxels of its layer equal to its label value.
    """
    import slicer

    check_segment(segmentation_node, segment_id)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    layer = segment.GetRepresentation(name)
    if layer is None or layer.IsEmpty():
        return np.zeros(volume.shape, dtype=bool)
    return mask_from_oriented_image(layer, volume.shape, volume.ijk_to_ras, label=segment.GetLabelValue())


def segment_visible(segmentation_node, segment_id: str) -> bool:
    display = segmentation_node.GetDisplayNode()
    return True if display is None else bool(display.GetSegmentVisibility(segment_id))


def other_segments(segmentation_node, segment_id: str, volume: Volume) -> dict[str, SegmentLayer]:
    """Every segment except ``segment_id`` on the volume's grid, with its visibility."""
    segmentation = segmentation_node.GetSegmentation()
    layers = {}
    for index in range(segmentation.GetNumberOfSegments()):
        other_id = segmentation.GetNthSegmentID(index)
        if other_id != segment_id:
            layers[other_id] = SegmentLayer(
                read_segment(segmentation_node, other_id, volume), segment_visible(segmentation_node, other_id)
            )
    return layers


def bounding_extent(changed: np.ndarray) -> ExtentKJI | None:
    """Inclusive (k, j, i) limits of the True voxels, or None when there are none."""
    if not changed.any():
        return None
    limits = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(changed.any(axis=other))
        limits.append((int(present[0]), int(present[-1])))
    return tuple(limits)  # type: ignore[return-value]


def _replace_in_extent(segmentation_node, segment_id: str, mask: np.ndarray, volume: Volume, extent: ExtentKJI) -> None:
    """Make the segment equal ``mask`` inside ``extent`` and leave it alone outside.

    (``MODE_REPLACE`` would clear the segment outside the extent; max-merging then min-merging
    the same block replaces exactly the block.)
    """
    image = oriented_image_from_mask(mask, volume.ijk_to_ras, extent)
    logic = _segments_logic()
    for mode in (logic.MODE_MERGE_MAX, logic.MODE_MERGE_MIN):
        if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, mode, image.GetExtent()):
            raise InputError(f"Slicer refused to write segment {segment_id!r}; check that the segmentation is editable.")


def write_segment(
    segmentation_node,
    segment_id: str,
    mask: np.ndarray,
    volume: Volume,
    masking: MaskingSettings | None = None,
    save_undo_state: Callable[[], None] | None = None,
    within: tuple | None = None,
) -> WriteReport:
    """Write ``mask`` (k, j, i on the volume grid) into one segment.

    ``within`` (a numpy index, e.g. one slice) limits the write to that part of the volume; the
    rest of the segment is kept. ``save_undo_state`` is called once before the first change.
    """
    masking = masking or MaskingSettings()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.shape:
        raise InputError(f"Result has shape {mask.shape}, the volume {volume.shape}.")
    old = read_segment(segmentation_node, segment_id, volume)
    wanted = old.copy()
    if within is None:
        wanted = mask
    else:
        wanted[within] = mask[within]
    others = other_segments(segmentation_node, segment_id, volume)
    editable = editable_region(masking, old, others, volume.array)
    after = apply_masking(wanted, old, editable)
    gained = after & ~old
    overwritten = {}
    for other_id in segments_to_overwrite(masking, others):
        lost = others[other_id].mask & gained
        if lost.any():
            overwritten[other_id] = int(lost.sum())
    changed = after != old
    extent = bounding_extent(changed)
    if extent is None:
        return WriteReport(0, None, {}, after)
    if save_undo_state is not None:
        save_undo_state()
    # MRML is modified in one batch so views update once
    was_modifying = segmentation_node.StartModify()
    try:
        _replace_in_extent(segmentation_node, segment_id, after, volume, extent)
        for other_id in overwritten:
            kept = others[other_id].mask & ~gained
            _replace_in_extent(segmentation_node, other_id, kept, volume, bounding_extent(others[other_id].mask & gained))
    finally:
        segmentation_node.EndModify(was_modifying)
    log.info("Wrote %d voxels of segment %s in extent %s", int(changed.sum()), segment_id, extent)
    return WriteReport(int(changed.sum()), extent, overwritten, after)


def segmentation_history(segmentation_node, max_states: int = 20):
    """A ``vtkSegmentationHistory`` for undo outside the Segment Editor (e.g. the module panel)."""
    import slicer

    history = slicer.vtkSegmentationHistory()
    history.SetMaximumNumberOfStates(max_states)
    history.SetSegmentation(segmentation_node.GetSegmentation())
    return history
