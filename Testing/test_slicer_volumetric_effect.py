"""The SAM 3D effect with the volumetric engine (3DSAM-adapter), run outside Slicer with the stand-ins of
test_slicer_effect_events.py: the Box and Exclude modes say what to do instead, a Shift+drag box and a
right-click are refused with the library's message, and include clicks go through."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")

from doubles import ReferenceMaskSession  # noqa: E402
from test_slicer_effect_events import _drag, _xy, effect_module, setup, vtk  # noqa: E402, F401

from SAM3DSegmentLib.errors import PromptError  # noqa: E402
from SAM3DSegmentSlicerLogic.engine_choices import BOX_REFUSED  # noqa: E402
from SAM3DSegmentSlicerLogic.messages import user_message  # noqa: E402
from SAM3DSegmentSlicerLogic.segment_propagation import SegmentPropagation  # noqa: E402


class VolumetricDouble(ReferenceMaskSession):
    """The reference-mask double under the volumetric engine's name."""

    engine_name = "volumetric"


@pytest.fixture
def volumetric(setup):
    """``setup`` with the effect's logic on a session factory of the volumetric engine."""
    reference = np.zeros(setup.volume.shape, bool)
    reference[3:9, 10:30, 12:36] = True  # as in test_slicer_effect_events

    def factory(volume, axis):
        return VolumetricDouble(volume, reference, axis)

    factory.engine = "volumetric"
    old = setup.effect.propagation
    setup.effect.propagation = SegmentPropagation(old.volume_node, old.segmentation_node, factory,
                                                  save_undo_state=old.save_undo_state, exclude_other_segments=True)
    return setup


def test_box_and_exclude_modes_say_to_use_include_clicks(volumetric):
    effect = volumetric.effect
    effect._setClickMode("box")
    assert effect.statusLabel.text == user_message(PromptError(BOX_REFUSED))
    assert "click inside" in effect.statusLabel.text
    effect._setClickMode("exclude")
    assert "add include clicks" in effect.statusLabel.text
    effect._setClickMode("include")
    assert effect.statusLabel.text == "Left-click: include points."


def test_a_box_and_a_right_click_are_refused_and_include_clicks_go_through(volumetric):
    effect, view = volumetric.effect, volumetric.view
    _drag(volumetric, [_xy(volumetric, (6, 20, 24))])  # an include click opens the session
    assert effect.propagation.engine == "volumetric"
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetShiftKey(1)
    start, end = _xy(volumetric, (6, 12, 14)), _xy(volumetric, (6, 25, 33))
    with pytest.raises(PromptError, match="not boxes"):
        for event, xy in ((vtk.vtkCommand.LeftButtonPressEvent, start), (vtk.vtkCommand.MouseMoveEvent, end),
                          (vtk.vtkCommand.LeftButtonReleaseEvent, end)):
            interactor.SetEventPosition(int(round(xy[0])), int(round(xy[1])))
            effect.processInteractionEvents(interactor, event, view)
    interactor = vtk.vtkRenderWindowInteractor()
    x, y = _xy(volumetric, (6, 15, 15))
    interactor.SetEventPosition(int(round(x)), int(round(y)))
    with pytest.raises(PromptError, match="no exclude clicks"):
        effect.processInteractionEvents(interactor, vtk.vtkCommand.RightButtonPressEvent, view)
        effect.processInteractionEvents(interactor, vtk.vtkCommand.RightButtonReleaseEvent, view)
    anchors = effect.propagation.anchors(volumetric.segment_id)
    assert sorted(anchors) == [6] and all(p.positive for p in anchors[6].points) and anchors[6].box is None
