"""The Segment Editor's masking settings on numpy arrays, with Slicer's semantics.

Slicer's ``vtkMRMLSegmentEditorNode`` holds three settings that every effect honours:

- editable area (``MaskMode``): everywhere, inside all / visible segments, outside all / visible
  segments, or inside one segment. "All / visible segments" means the *other* segments, and in
  "inside all / visible" the edited segment's own voxels are editable too (as Slicer's
  ``vtkMRMLSegmentationNode::GenerateEditMask`` does; the tests compare with it);
- editable intensity range (``SourceVolumeIntensityMask`` and its range): only voxels whose
  source intensity lies in the range (inclusive) are editable;
- overwrite other segments (``OverwriteMode``): voxels the edited segment gains are removed
  from all other segments, from the visible ones, or from none (segments may overlap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from SAM3DSegmentLib.errors import InputError

MaskMode = Literal["everywhere", "inside_all", "inside_visible", "outside_all", "outside_visible", "inside_segment"]
OverwriteMode = Literal["all", "visible", "none"]
MASK_MODES: tuple[str, ...] = ("everywhere", "inside_all", "inside_visible", "outside_all", "outside_visible", "inside_segment")
OVERWRITE_MODES: tuple[str, ...] = ("all", "visible", "none")


@dataclass(frozen=True)
class MaskingSettings:
    """Where writing is allowed and what happens to other segments (Slicer's defaults)."""

    mask_mode: MaskMode = "everywhere"
    mask_segment_id: str | None = None
    intensity_range: tuple[float, float] | None = None
    overwrite: OverwriteMode = "all"

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise InputError(f"Editable area must be one of {', '.join(MASK_MODES)}; got {self.mask_mode!r}.")
        if self.overwrite not in OVERWRITE_MODES:
            raise InputError(f"Overwrite mode must be one of {', '.join(OVERWRITE_MODES)}; got {self.overwrite!r}.")
        if self.mask_mode == "inside_segment" and not self.mask_segment_id:
            raise InputError("Editable area 'inside a segment' needs the segment: choose it in the masking settings.")
        if self.intensity_range is not None and self.intensity_range[0] > self.intensity_range[1]:
            raise InputError(f"Editable intensity range {self.intensity_range} is empty: the minimum exceeds the maximum.")


@dataclass
class SegmentLayer:
    """Another segment's voxels on the volume grid and whether it is shown."""

    mask: np.ndarray
    visible: bool = True


def masking_from_editor_node(editor_node) -> MaskingSettings:
    """The masking settings of a ``vtkMRMLSegmentEditorNode`` (Slicer's defaults if None)."""
    if editor_node is None:
        return MaskingSettings()
    import slicer

    seg = slicer.vtkMRMLSegmentationNode
    modes = {
        seg.EditAllowedEverywhere: "everywhere",
        seg.EditAllowedInsideAllSegments: "inside_all",
        seg.EditAllowedInsideVisibleSegments: "inside_visible",
        seg.EditAllowedOutsideAllSegments: "outside_all",
        seg.EditAllowedOutsideVisibleSegments: "outside_visible",
        seg.EditAllowedInsideSingleSegment: "inside_segment",
    }
    editor = slicer.vtkMRMLSegmentEditorNode
    overwrites = {
        editor.OverwriteAllSegments: "all",
        editor.OverwriteVisibleSegments: "visible",
        editor.OverwriteNone: "none",
    }
    intensity_range = None
    if editor_node.GetSourceVolumeIntensityMask():
        intensity_range = tuple(float(v) for v in editor_node.GetSourceVolumeIntensityMaskRange())
    return MaskingSettings(
        mask_mode=modes[editor_node.GetMaskMode()],
        mask_segment_id=editor_node.GetMaskSegmentID() or None,
        intensity_range=intensity_range,
        overwrite=overwrites[editor_node.GetOverwriteMode()],
    )


def editable_region(
    settings: MaskingSettings,
    edited_segment: np.ndarray,
    others: dict[str, SegmentLayer],
    source: np.ndarray | None = None,
) -> np.ndarray:
    """Voxels where the edited segment may change (True = editable)."""
    shape = edited_segment.shape
    mode = settings.mask_mode
    if mode == "everywhere":
        region = np.ones(shape, dtype=bool)
    elif mode == "inside_segment":
        if settings.mask_segment_id not in others:
            raise InputError(
                f"The editable area is inside segment {settings.mask_segment_id!r}, which does not exist "
                "(or is the segment being edited). Choose another masking segment."
            )
        region = others[settings.mask_segment_id].mask.copy()
    else:
        union = np.zeros(shape, dtype=bool)
        for layer in others.values():
            if mode.endswith("_all") or layer.visible:
                union |= layer.mask
        region = union if mode.startswith("inside") else ~union
    if mode in ("inside_all", "inside_visible"):
        region |= edited_segment
    if settings.intensity_range is not None:
        if source is None:
            raise InputError("The editable intensity range needs the source volume.")
        low, high = settings.intensity_range
        region &= (source >= low) & (source <= high)
    return region


def segments_to_overwrite(settings: MaskingSettings, others: dict[str, SegmentLayer]) -> list[str]:
    """The other segments that lose the voxels the edited segment gains."""
    if settings.overwrite == "none":
        return []
    return [sid for sid, layer in others.items() if settings.overwrite == "all" or layer.visible]


def apply_masking(new_mask: np.ndarray, old_mask: np.ndarray, editable: np.ndarray) -> np.ndarray:
    """The edited segment after writing: ``new_mask`` where editable, unchanged elsewhere."""
    return np.where(editable, new_mask, old_mask)
