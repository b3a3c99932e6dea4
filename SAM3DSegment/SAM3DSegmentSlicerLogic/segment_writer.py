"""Reading segments as numpy masks and writing a result into one segment.

Voxels are placed in the segmentation node's own coordinates: the volume's IJK-to-world matrix
followed by the inverse of the segmentation's parent transform (the transform between the two
nodes' parents, as ``vtkSlicerSegmentEditorLogic`` resamples the source volume).

Writing follows the Segment Editor's rules: an undo state is saved first (only when something
changes), only the selected segment is written (plus the overwritten segments losing voxels),
only inside the bounding box of what changed, and the masking settings are honoured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.errors import InputError

from .masking import (
    MaskingSettings,
    SegmentLayer,
    apply_masking,
    editable_region,
    segments_to_overwrite,
)
from .volume_nodes import (
    extent_slices,
    full_extent,
    ijk_to_node_coordinates,
    mask_from_oriented_image,
    oriented_image_from_block,
)

log = logging.getLogger(__name__)

ExtentKJI = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass
class WriteReport:
    """What a write changed.

    ``changed_voxels`` of the selected segment inside ``extent_kji`` (None: nothing changed);
    ``overwritten``: voxels taken from other segments. ``examined_extent`` is the block that was
    read and compared, and ``examined_after`` the selected segment there after the write.
    ``kept_slices``: slices the user edited during a propagation, left as they were.
    """

    changed_voxels: int
    extent_kji: ExtentKJI | None
    overwritten: dict[str, int] = field(default_factory=dict)
    examined_extent: ExtentKJI | None = None
    examined_after: np.ndarray | None = field(default=None, repr=False)
    kept_slices: list[int] = field(default_factory=list)


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


def read_segment(segmentation_node, segment_id: str, volume: Volume, extent_kji: ExtentKJI | None = None) -> np.ndarray:
    """The segment's voxels on the volume's grid (k, j, i), as booleans (only ``extent_kji`` if given).

    Segments share labelmap layers; a segment is the voxels of its layer equal to its label value.
    """
    import slicer

    check_segment(segmentation_node, segment_id)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    return mask_from_oriented_image(
        segment.GetRepresentation(name), volume.shape, ijk_to_node_coordinates(segmentation_node, volume),
        segment.GetLabelValue(), extent_kji,
    )


def segment_visible(segmentation_node, segment_id: str) -> bool:
    display = segmentation_node.GetDisplayNode()
    return True if display is None else bool(display.GetSegmentVisibility(segment_id))


def other_segments(
    segmentation_node, segment_id: str, volume: Volume, extent_kji: ExtentKJI | None = None
) -> dict[str, SegmentLayer]:
    """Every segment except ``segment_id`` on the volume's grid (or its ``extent_kji``), with its visibility."""
    segmentation = segmentation_node.GetSegmentation()
    layers = {}
    for index in range(segmentation.GetNumberOfSegments()):
        other_id = segmentation.GetNthSegmentID(index)
        if other_id != segment_id:
            layers[other_id] = SegmentLayer(
                read_segment(segmentation_node, other_id, volume, extent_kji), segment_visible(segmentation_node, other_id)
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


def _offset(extent: ExtentKJI, start) -> ExtentKJI:
    return tuple((low + s, high + s) for (low, high), s in zip(extent, start))  # type: ignore[return-value]


def index_extent(within, shape) -> ExtentKJI:
    """Inclusive extent of a numpy index made of integers and full slices (e.g. one slice)."""
    if not isinstance(within, tuple):
        within = (within,)
    limits = []
    for axis, n in enumerate(shape):
        key = within[axis] if axis < len(within) else slice(None)
        if isinstance(key, (int, np.integer)):
            limits.append((int(key), int(key)))
        elif key == slice(None):
            limits.append((0, n - 1))
        else:
            raise InputError("Writes can be limited to whole slices only.")
    return tuple(limits)  # type: ignore[return-value]


def _replace_block(segmentation_node, segment_id: str, block: np.ndarray, start, volume: Volume) -> None:
    """Make the segment equal ``block`` (placed at voxel ``start``) there, and leave it alone elsewhere.

    (``MODE_REPLACE`` would clear the segment outside the block; max-merging then min-merging
    the same block replaces exactly the block.)
    """
    image = oriented_image_from_block(block, ijk_to_node_coordinates(segmentation_node, volume), start)
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

    ``within`` (a numpy index of whole slices, e.g. ``(5,)``) limits the write to that part of
    the volume. Other segments are read only where the selected segment would change.
    ``save_undo_state`` is called once, before the first change, and only if something changes.
    """
    masking = masking or MaskingSettings()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.shape:
        raise InputError(f"Result has shape {mask.shape}, the volume {volume.shape}.")
    examined = full_extent(volume.shape) if within is None else index_extent(within, volume.shape)
    old = read_segment(segmentation_node, segment_id, volume, examined)
    wanted = mask[extent_slices(examined)]
    candidates = bounding_extent(wanted != old)
    if candidates is None:
        return WriteReport(0, None, {}, examined, old)
    block = extent_slices(candidates)
    start = [low + e[0] for (low, _), e in zip(candidates, examined)]
    block_extent = _offset(candidates, [e[0] for e in examined])
    others = other_segments(segmentation_node, segment_id, volume, block_extent)
    source = volume.array[extent_slices(block_extent)]
    old_block = old[block]
    editable = editable_region(masking, old_block, others, source)
    after_block = apply_masking(wanted[block], old_block, editable)
    after = old.copy()
    after[block] = after_block
    changed = after_block != old_block
    if not changed.any():
        return WriteReport(0, None, {}, examined, after)
    gained = after_block & ~old_block
    overwritten = {
        other_id: int((others[other_id].mask & gained).sum())
        for other_id in segments_to_overwrite(masking, others)
        if (others[other_id].mask & gained).any()
    }
    if save_undo_state is not None:
        save_undo_state()
    changed_extent = bounding_extent(changed)
    written = extent_slices(changed_extent)
    written_start = [low + s for (low, _), s in zip(changed_extent, start)]
    was_modifying = segmentation_node.StartModify()  # one update of the views
    try:
        _replace_block(segmentation_node, segment_id, after_block[written], written_start, volume)
        for other_id in overwritten:
            kept = others[other_id].mask & ~gained
            _replace_block(segmentation_node, other_id, kept[written], written_start, volume)
    finally:
        segmentation_node.EndModify(was_modifying)
    mark_in_progress(segmentation_node, segment_id)
    final_extent = _offset(changed_extent, start)
    log.info("Wrote %d voxels of segment %s in extent %s", int(changed.sum()), segment_id, final_extent)
    return WriteReport(int(changed.sum()), final_extent, overwritten, examined, after)


def mark_in_progress(segmentation_node, segment_id: str) -> None:
    """Status "in progress" for a segment being edited that had none yet (as Slicer's editor logic does)."""
    logic = _segments_logic()
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is not None and logic.GetSegmentStatus(segment) == logic.NotStarted:
        logic.SetSegmentStatus(segment, logic.InProgress)


def segmentation_history(segmentation_node, max_states: int = 20):
    """A ``vtkSegmentationHistory`` for undo outside the Segment Editor (e.g. the module panel)."""
    import slicer

    history = slicer.vtkSegmentationHistory()
    history.SetMaximumNumberOfStates(max_states)
    history.SetSegmentation(segmentation_node.GetSegmentation())
    return history
