"""Prompt markers: include/exclude clicks as control points of a markups fiducial node, boxes as
closed curves.

Our markups nodes are not the user's: they are hidden from node selectors (``SetHideFromEditors``),
not saved with the scene, locked, and adding them leaves the active place list as it was (Slicer's
markups logic makes every new markups node the active list, so the user's next "place point" would
otherwise land in ours).
"""

from __future__ import annotations

from SAM3DSegmentLib.data.prompts import SlicePrompt
from SAM3DSegmentLib.data.volume import Volume

from .view_prompts import prompt_markers_ras

INCLUDE_LABEL, EXCLUDE_LABEL = "+", "-"
MARKUPS_NAME = "SAM 3D prompts"
SELECTION_NODE_ID = "vtkMRMLSelectionNodeSingleton"


def add_private_markups_node(scene, class_name: str, name: str):
    """A new markups node of ours: hidden from editors, not saved, and not made the active place list."""
    selection = scene.GetNodeByID(SELECTION_NODE_ID)
    active = selection.GetActivePlaceNodeID() if selection is not None else None
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetHideFromEditors(True)
    node.SetSaveWithScene(False)
    if selection is not None and selection.GetActivePlaceNodeID() != active:
        selection.SetReferenceActivePlaceNodeID(active)
    return node


def prompt_markups_node(scene, create: bool = True):
    """The fiducial node showing click prompts (made on first use), or None."""
    nodes = scene.GetNodesByName(MARKUPS_NAME)
    for position in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(position)
        if node.IsA("vtkMRMLMarkupsFiducialNode"):
            return node
    if not create:
        return None
    node = add_private_markups_node(scene, "vtkMRMLMarkupsFiducialNode", MARKUPS_NAME)
    node.CreateDefaultDisplayNodes()
    return node


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


BOX_ATTRIBUTE = "SAM3D.PromptBox"


def box_corners_ras(volume: Volume, prompt: SlicePrompt):
    """RAS of the four corners of a prompt's box (in order around it), or None without a box."""
    from SAM3DSegmentLib.data.volume import slice_to_kji

    if prompt.box is None:
        return None
    b = prompt.box.normalised()
    corners = ((b.row0, b.col0), (b.row0, b.col1), (b.row1, b.col1), (b.row1, b.col0))
    return [volume.kji_to_ras(slice_to_kji(prompt.axis, prompt.index, row, col)) for row, col in corners]


def show_prompt_boxes(scene, volume: Volume, anchors: dict[int, SlicePrompt]) -> list:
    """One linear closed curve per box prompt (earlier box markers are removed); returns the nodes."""
    clear_prompt_boxes(scene)
    nodes = []
    for index in sorted(anchors):
        corners = box_corners_ras(volume, anchors[index])
        if corners is None:
            continue
        node = add_private_markups_node(scene, "vtkMRMLMarkupsClosedCurveNode", f"SAM 3D box (slice {index})")
        node.SetAttribute(BOX_ATTRIBUTE, "1")
        node.SetCurveTypeToLinear()
        for corner in corners:
            node.AddControlPoint(*[float(c) for c in corner])
        node.SetLocked(True)
        nodes.append(node)
    return nodes


def clear_prompt_boxes(scene) -> None:
    for node in list(_nodes_with_attribute(scene, BOX_ATTRIBUTE)):
        scene.RemoveNode(node)


def _nodes_with_attribute(scene, attribute: str):
    collection = scene.GetNodesByClass("vtkMRMLMarkupsClosedCurveNode")
    for position in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(position)
        if node.GetAttribute(attribute):
            yield node
