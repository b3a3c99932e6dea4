"""Prompt markers: include/exclude clicks as control points of a markups fiducial node."""

from __future__ import annotations

from SAM3DSegmentLib.prompts import SlicePrompt
from SAM3DSegmentLib.volume import Volume

from .view_prompts import prompt_markers_ras

INCLUDE_LABEL, EXCLUDE_LABEL = "+", "-"


def show_prompt_markers(markups_node, volume: Volume, anchors: dict[int, SlicePrompt]) -> int:
    """Replace the node's control points by the click prompts of ``anchors``; returns their count."""
    was_modifying = markups_node.StartModify()
    try:
        markups_node.RemoveAllControlPoints()
        for index in sorted(anchors):
            for ras, positive in prompt_markers_ras(volume, anchors[index]):
                point = markups_node.AddControlPoint(*[float(c) for c in ras])
                markups_node.SetNthControlPointLabel(point, INCLUDE_LABEL if positive else EXCLUDE_LABEL)
                markups_node.SetNthControlPointLocked(point, True)
    finally:
        markups_node.EndModify(was_modifying)
    return markups_node.GetNumberOfControlPoints()


def clear_prompt_markers(markups_node) -> None:
    if markups_node is not None:
        markups_node.RemoveAllControlPoints()
