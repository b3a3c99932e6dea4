"""The effect's event handling for lasso and scribble, run outside Slicer: the real effect class with
stand-ins for Qt and Slicer's effect base class, a real slice node (its XYToRAS maps the event
positions), real MRML segments and a test double session. What this cannot show (rendering, Qt event
routing inside the application) is left to the self-test in Slicer."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")
vtk = pytest.importorskip("vtk")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAM3DSegment"))

from doubles import ReferenceMaskSession  # noqa: E402
from SAM3DSegmentSlicerLogic.segment_propagation import SegmentPropagation  # noqa: E402
from SAM3DSegmentSlicerLogic.segment_writer import read_segment, segmentation_history  # noqa: E402
from SAM3DSegmentSlicerLogic.volume_nodes import numpy_to_matrix  # noqa: E402

SHAPE = (12, 40, 48)
IJK_TO_RAS = np.array([[-1.2, 0, 0, 30.0], [0, -0.9, 0, 20.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])  # LPS-like, anisotropic


class _Signal:
    def connect(self, *args):
        pass

    def disconnect(self, *args):
        pass


class _QTimer(_Signal):
    def setInterval(self, ms):
        pass

    def start(self):
        pass

    def stop(self):
        pass


class _AbstractEffect:
    """Stand-in for SegmentEditorEffects.AbstractScriptedSegmentEditorEffect (its xyToRas as Slicer's:
    the slice node's XYToRAS applied to the event position)."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def xyToRas(self, xy, viewWidget):
        matrix = viewWidget.sliceLogic().GetSliceNode().GetXYToRAS()
        return np.array(matrix.MultiplyPoint((xy[0], xy[1], 0.0, 1.0))[:3])


class _ScriptedEffect:
    NotConfirmed, ConfirmedWithoutDialog = 0, 1

    def __init__(self, segment_id):
        self.actors = []
        self.segment_id = segment_id

    def addActor2D(self, view, actor):
        self.actors.append(actor)

    def removeActor2D(self, view, actor):
        self.actors.remove(actor)

    def confirmCurrentSegmentVisible(self):
        return self.ConfirmedWithoutDialog

    def parameterSetNode(self):
        return types.SimpleNamespace(GetSelectedSegmentID=lambda: self.segment_id)


class _SliceWidget:
    def __init__(self, slice_node):
        self.node = slice_node
        self.renders = 0

    def className(self):
        return "qMRMLSliceWidget"

    def sliceLogic(self):
        return types.SimpleNamespace(GetSliceNode=lambda: self.node)

    def sliceView(self):
        return types.SimpleNamespace(scheduleRender=self._render)

    def _render(self):
        self.renders += 1


@pytest.fixture
def effect_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "qt", types.SimpleNamespace(QTimer=_QTimer))
    monkeypatch.setitem(sys.modules, "SegmentEditorEffects",
                        types.SimpleNamespace(AbstractScriptedSegmentEditorEffect=_AbstractEffect))
    path = ROOT / "SAM3DSegment" / "SegmentEditorSAM3DLib" / "SegmentEditorEffect.py"
    spec = importlib.util.spec_from_file_location("sam3d_effect_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup(effect_module):
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    volume_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(volume_node, np.zeros(SHAPE, np.int16))
    volume_node.SetIJKToRASMatrix(numpy_to_matrix(IJK_TO_RAS))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("lesion")
    reference = np.zeros(SHAPE, bool)
    reference[3:9, 10:30, 12:36] = True
    history = segmentation_history(segmentation)
    propagation = SegmentPropagation(volume_node, segmentation,
                                     lambda volume, axis: ReferenceMaskSession(volume, reference, axis),
                                     save_undo_state=history.SaveState)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetOrientation("Axial")
    slice_node.SetDimensions(400, 300, 1)
    slice_node.SetFieldOfView(80.0, 60.0, 1.0)
    slice_node.JumpSliceByCentering(*propagation.volume.kji_to_ras((6, 20, 24)))
    slice_node.UpdateMatrices()
    scripted = _ScriptedEffect(segment_id)
    effect = effect_module.SegmentEditorEffect(scripted)
    effect.statusLabel = types.SimpleNamespace(text="")
    effect.propagation = propagation
    effect._ensurePropagation = lambda: None
    effect._whenServerReady = lambda label, action: action()  # errors propagate to the test
    effect.updateMarkers = lambda: None
    return types.SimpleNamespace(effect=effect, scripted=scripted, view=_SliceWidget(slice_node), slice_node=slice_node,
                                 segmentation=segmentation, segment_id=segment_id, volume=propagation.volume,
                                 history=history, scene=scene)


def _xy(setup, kji):
    """The event position of voxel ``kji`` in the view (the inverse of the slice node's XYToRAS)."""
    ras_to_xy = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(setup.slice_node.GetXYToRAS(), ras_to_xy)
    x, y, z, _ = ras_to_xy.MultiplyPoint((*setup.volume.kji_to_ras(kji), 1.0))
    assert abs(z) < 1e-6
    return x, y


def _drag(setup, path_xy, control=False, release=True):
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetControlKey(int(control))
    effect, view = setup.effect, setup.view
    events = [(vtk.vtkCommand.LeftButtonPressEvent, path_xy[0])]
    events += [(vtk.vtkCommand.MouseMoveEvent, xy) for xy in path_xy[1:]]
    if release:
        events.append((vtk.vtkCommand.LeftButtonReleaseEvent, path_xy[-1]))
    for event, xy in events:
        interactor.SetEventPosition(int(round(xy[0])), int(round(xy[1])))
        assert effect.processInteractionEvents(interactor, event, view) is True


def _segment(setup):
    return read_segment(setup.segmentation, setup.segment_id, setup.volume)


def _square(setup, k, j0, i0, j1, i1, steps=5):
    corners = [(k, j0, i0), (k, j0, i1), (k, j1, i1), (k, j1, i0), (k, j0, i0)]
    path = []
    for a, b in zip(corners[:-1], corners[1:]):
        for t in np.linspace(0, 1, steps, endpoint=False):
            path.append(tuple(np.add(_xy(setup, a), t * np.subtract(_xy(setup, b), _xy(setup, a)))))
    return path


def test_a_lasso_drawn_with_the_mouse_becomes_the_slice_and_an_exclude_lasso_cuts_it(setup):
    effect = setup.effect
    assert effect._onKey("l", False) and effect._clickMode == "lasso"
    # voxel corners half a voxel outside the centres: j 10..20, i 15..30 on slice 6
    path = _square(setup, 6, 9.5, 14.5, 20.5, 30.5)
    _drag(setup, path[:8], release=False)
    assert len(setup.scripted.actors) == 1  # the line is drawn while dragging
    polyData = effect._strokeLines[setup.view][0]
    assert polyData.GetNumberOfPoints() == 8 and polyData.GetLines().GetNumberOfCells() == 1
    interactor = vtk.vtkRenderWindowInteractor()
    for xy in path[8:]:  # the rest of the contour, then release: the lasso closes back to its start
        interactor.SetEventPosition(int(round(xy[0])), int(round(xy[1])))
        assert effect.processInteractionEvents(interactor, vtk.vtkCommand.MouseMoveEvent, setup.view)
    assert effect.processInteractionEvents(interactor, vtk.vtkCommand.LeftButtonReleaseEvent, setup.view)
    assert setup.scripted.actors == [] and effect._stroke is None  # removed on release
    expected = np.zeros(SHAPE, bool)
    expected[6, 10:21, 15:31] = True
    segment = _segment(setup)
    # the event positions are whole pixels (0.2 mm here): the filled voxels are those of the polygon
    assert np.array_equal(segment, expected)
    assert effect.propagation.anchors(setup.segment_id)[6].is_mask_only
    # an exclude lasso (Ctrl+drag) cuts j 15..20 out of that slice
    _drag(setup, _square(setup, 6, 14.5, 10, 25, 40), control=True)
    expected[6, 15:21] = False
    assert np.array_equal(_segment(setup), expected)
    assert setup.history.GetNumberOfStates() == 2  # one undo state per lasso


def test_a_scribble_adds_include_or_exclude_points_along_the_stroke(setup):
    effect = setup.effect
    effect._onKey("s", False)
    stroke = [tuple(np.add(_xy(setup, (6, 15, 16)), t * np.subtract(_xy(setup, (6, 15, 32)), _xy(setup, (6, 15, 16)))))
              for t in np.linspace(0, 1, 30)]
    _drag(setup, stroke)
    anchor = effect.propagation.anchors(setup.segment_id)[6]
    rows_cols = np.array([(p.row, p.col) for p in anchor.points])
    assert all(p.positive for p in anchor.points) and len(anchor.points) >= 3  # 16 voxels * 1.2 mm, one every 5 mm
    assert np.allclose(rows_cols[:, 0], 15, atol=0.3) and rows_cols[0, 1] == pytest.approx(16, abs=0.3)
    assert _segment(setup)[6].any()
    _drag(setup, stroke[:10], control=True)  # Ctrl+drag: exclude points
    assert any(not p.positive for p in effect.propagation.anchors(setup.segment_id)[6].points)


def test_a_stroke_that_stays_within_the_click_tolerance_is_a_click(setup):
    effect = setup.effect
    effect._onKey("l", False)
    xy = _xy(setup, (6, 15, 20))
    _drag(setup, [xy, (xy[0] + 2, xy[1] + 1)])
    anchor = effect.propagation.anchors(setup.segment_id)[6]
    assert len(anchor.points) == 1 and anchor.points[0].positive and anchor.mask is None


def test_layout_change_and_deactivate_remove_the_stroke_line(setup, monkeypatch):
    effect = setup.effect
    effect._onKey("l", False)
    _drag(setup, _square(setup, 6, 10, 15, 20, 30)[:5], release=False)
    assert len(setup.scripted.actors) == 1
    effect.layoutChanged()
    assert setup.scripted.actors == [] and effect._stroke is None and effect._strokeLines == {}
    interactor = vtk.vtkRenderWindowInteractor()
    # the release after a layout change is consumed and changes nothing
    assert effect.processInteractionEvents(interactor, vtk.vtkCommand.LeftButtonReleaseEvent, setup.view)
    assert not _segment(setup).any()
    _drag(setup, _square(setup, 6, 10, 15, 20, 30)[:5], release=False)
    monkeypatch.setattr(effect, "_stopPolling", lambda cancelJob: None)
    import SAM3DSegmentSlicerLogic.markers as markers

    monkeypatch.setattr(markers, "prompt_markups_node", lambda scene, create=True: None)
    monkeypatch.setattr(markers, "clear_prompt_boxes", lambda scene: None)
    monkeypatch.setattr(slicer, "mrmlScene", None, raising=False)
    effect.deactivate()
    assert setup.scripted.actors == [] and effect._stroke is None


def test_box_and_clicks_still_work_in_lasso_mode_with_their_modifiers(setup):
    effect = setup.effect
    effect._onKey("l", False)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetShiftKey(1)  # Shift+drag is a box in every mode
    start, end = _xy(setup, (6, 12, 14)), _xy(setup, (6, 25, 33))
    for event, xy in ((vtk.vtkCommand.LeftButtonPressEvent, start), (vtk.vtkCommand.MouseMoveEvent, end),
                      (vtk.vtkCommand.LeftButtonReleaseEvent, end)):
        interactor.SetEventPosition(int(round(xy[0])), int(round(xy[1])))
        assert effect.processInteractionEvents(interactor, event, setup.view)
    assert effect.propagation.anchors(setup.segment_id)[6].box is not None
    assert effect._strokeLines == {} and setup.scripted.actors == []


def test_a_click_next_to_another_segment_gets_an_exclude_point_and_the_setting_is_the_modules(setup, monkeypatch):
    """"Other segments are exclude prompts": a click through the effect's events gets an exclude point
    inside the visible neighbour on that slice (the status line says so); the effect's check box writes
    the SAM 3D module's parameter node, created as ScriptedLoadableModuleLogic creates it."""
    from SAM3DSegmentSlicerLogic.segment_writer import write_segment
    from SAM3DSegmentSlicerLogic.settings import load_settings

    effect = setup.effect
    neighbour_id = setup.segmentation.GetSegmentation().AddEmptySegment("kidney")
    neighbour = np.zeros(SHAPE, bool)
    neighbour[3:9, 10:30, 36:44] = True  # touches the lesion's reference
    write_segment(setup.segmentation, neighbour_id, neighbour, setup.volume)
    effect.propagation.exclude_other_segments = True
    _drag(setup, [_xy(setup, (6, 20, 24))])  # a click
    points = effect.propagation.anchors(setup.segment_id)[6].points
    assert [p.positive for p in points] == [True, False] and neighbour[6, int(points[1].row), int(points[1].col)]
    assert "1 exclude point(s) inside other segments" in effect.statusLabel.text

    monkeypatch.setattr(slicer, "mrmlScene", setup.scene, raising=False)  # the effect's `slicer` is this module
    assert effect._moduleParameterNode() is None and effect._moduleSettings().exclude_other_segments
    effect.onExcludeOtherSegmentsToggled(False)
    node = effect._moduleParameterNode()
    assert node.GetAttribute("ModuleName") == "SAM3DSegment" and node.GetSingletonTag() == "SAM3DSegment"
    assert load_settings(node).exclude_other_segments is False and not effect._moduleSettings().exclude_other_segments
    effect.onExcludeOtherSegmentsToggled(True)
    assert effect._moduleSettings().exclude_other_segments and effect._moduleParameterNode() is node
