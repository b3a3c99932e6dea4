"""Segment Editor effect "SAM 3D": click/box prompts in slice views, preview, propagate, cancel.

Thin Qt layer: it turns mouse events into RAS points and calls SAM3DSegmentSlicerLogic. Model
work runs on one worker thread (ModelWorker); a QTimer polls its events and writes results into
the segment on the main thread. Left-click: include point; right-click or Ctrl+left-click:
exclude point; Shift+drag: box.
"""

import logging
import os
import sys

import numpy as np
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

EFFECT_NAME = "SAM 3D"
CLICK_TOLERANCE_PX = 4
MARKUPS_NAME = "SAM 3D prompts"


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Promptable 3D segmentation of the selected segment with Segment Anything models."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = EFFECT_NAME
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.propagation = None
        self._propagationKey = None
        self.worker = None
        self.pollTimer = None
        self._callbacks = {}
        self._pressXY = None
        self._boxStart = None  # (xy, ras, viewWidget)
        self._rubberBands = {}
        self._lastSliceWidget = None
        self._propagatedSegments = set()

    # --- what Slicer calls ---------------------------------------------------------------------

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return (
            "<html>Segment the selected segment in 3D with Segment Anything models.<p>"
            "<b>Left-click</b>: include point. <b>Right-click</b> or <b>Ctrl+click</b>: exclude point. "
            "<b>Shift+drag</b>: box. The slice updates after each prompt (preview).<p>"
            "<b>Propagate</b> fills the volume along the axis of the view you prompted in. Correct any "
            "slice with any tool and press <b>Re-propagate</b>: corrected slices become anchors and only "
            "the slices between them are recomputed. Undo restores the segment. Settings (engine, model, "
            "stop rule) are in the SAM 3D Segment module.</html>"
        )

    def setupOptionsFrame(self):
        self.engineLabel = qt.QLabel("")
        self.engineLabel.wordWrap = True
        self.scriptedEffect.addLabeledOptionsWidget("Engine:", self.engineLabel)

        self.useSegmentButton = qt.QPushButton("Use current segment on this slice as prompt")
        self.useSegmentButton.toolTip = "The selected segment on the last clicked slice view becomes the prompt (a mask)."
        self.useSegmentButton.connect("clicked()", self.onUseSegmentAsPrompt)
        self.scriptedEffect.addOptionsWidget(self.useSegmentButton)

        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.toolTip = "Fill the volume from the prompted slices (direction, range and stop rule: SAM 3D module)."
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.repropagateButton = qt.QPushButton("Re-propagate")
        self.repropagateButton.toolTip = "Slices you corrected since the last propagation become anchors; only the slices between anchors are recomputed."
        self.repropagateButton.connect("clicked()", self.onPropagate)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.toolTip = "Stop the running propagation; the segment is left as it was."
        self.cancelButton.connect("clicked()", self.onCancel)
        buttons = qt.QHBoxLayout()
        for button in (self.propagateButton, self.repropagateButton, self.cancelButton):
            buttons.addWidget(button)
        self.scriptedEffect.addOptionsWidget(buttons)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setVisible(False)
        self.scriptedEffect.addOptionsWidget(self.progressBar)

        self.showMarkersCheckBox = qt.QCheckBox("Show prompt markers")
        self.showMarkersCheckBox.checked = True
        self.showMarkersCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.clearPromptsButton = qt.QPushButton("Clear prompts")
        self.clearPromptsButton.toolTip = "Forget this segment's prompts and remove the markers (the segment's voxels stay)."
        self.clearPromptsButton.connect("clicked()", self.onClearPrompts)
        row = qt.QHBoxLayout()
        row.addWidget(self.showMarkersCheckBox)
        row.addWidget(self.clearPromptsButton)
        self.scriptedEffect.addOptionsWidget(row)

        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.updateButtons()

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("ShowPromptMarkers", 1)

    def updateGUIFromMRML(self):
        blocked = self.showMarkersCheckBox.blockSignals(True)
        self.showMarkersCheckBox.checked = self.scriptedEffect.integerParameter("ShowPromptMarkers") != 0
        self.showMarkersCheckBox.blockSignals(blocked)
        settings = self._moduleSettings()
        self.engineLabel.text = f"{settings.engine}" + (f" / {settings.model}" if settings.model else "")
        self.updateButtons()

    def updateMRMLFromGUI(self, *unused):
        self.scriptedEffect.setParameter("ShowPromptMarkers", 1 if self.showMarkersCheckBox.checked else 0)
        self.updateMarkers()

    def activate(self):
        self._ensureWorker()
        self.updateMarkers()

    def deactivate(self):
        for viewWidget in list(self._rubberBands):
            self._removeRubberBand(viewWidget)
        self._boxStart = None
        from SAM3DSegmentSlicerLogic.markers import clear_prompt_boxes

        markups = self._markupsNode(create=False)
        if markups is not None and markups.GetDisplayNode() is not None:
            markups.GetDisplayNode().SetVisibility(False)
        clear_prompt_boxes(slicer.mrmlScene)  # redrawn on activate

    def sourceVolumeNodeChanged(self):
        self._resetPropagation()

    def masterVolumeNodeChanged(self):  # Slicer < 5.4
        self._resetPropagation()

    def referenceGeometryChanged(self):
        self._resetPropagation()

    def layoutChanged(self):
        self._rubberBands = {}

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """Clicks and Shift+drags in slice views become prompts; returns True to consume the event."""
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        xy = callerInteractor.GetEventPosition()
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            self._lastSliceWidget = viewWidget
            if callerInteractor.GetShiftKey():
                self._boxStart = (xy, self.xyToRas(xy, viewWidget), viewWidget)
                self._updateRubberBand(viewWidget, xy, xy)
            else:
                self._pressXY = xy
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and self._boxStart is not None:
            if self._boxStart[2] is viewWidget:
                self._updateRubberBand(viewWidget, self._boxStart[0], xy)
                return True
            return False
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent:
            if self._boxStart is not None:
                startXY, startRas, startView = self._boxStart
                self._boxStart = None
                self._removeRubberBand(startView)
                if startView is viewWidget:
                    endRas = self.xyToRas(xy, viewWidget)
                    self.addPrompt(viewWidget, lambda axis: self.propagation.box_from_ras(startRas, endRas, axis))
                return True
            if self._pressXY is not None and _close(self._pressXY, xy):
                ras = self.xyToRas(xy, viewWidget)
                positive = not callerInteractor.GetControlKey()
                self.addPrompt(viewWidget, lambda axis: self.propagation.point_from_ras(ras, positive, axis))
            self._pressXY = None
            return True
        if eventId == vtk.vtkCommand.RightButtonPressEvent:
            self._lastSliceWidget = viewWidget
            self._pressXY = xy
            return True
        if eventId == vtk.vtkCommand.RightButtonReleaseEvent:
            if self._pressXY is not None and _close(self._pressXY, xy):
                ras = self.xyToRas(xy, viewWidget)
                self.addPrompt(viewWidget, lambda axis: self.propagation.point_from_ras(ras, False, axis))
            self._pressXY = None
            return True
        return False

    # --- actions -------------------------------------------------------------------------------

    def addPrompt(self, viewWidget, makePrompt):
        """Build the prompt on the main thread; the worker computes the preview."""
        try:
            segmentId = self._selectedSegmentId()
            self._ensurePropagation()
            previousAxis = self.propagation.axis
            prompt = makePrompt(self._viewAxis(viewWidget))
        except Exception as error:
            self._showError(error)
            return
        self._submitPreview(segmentId, prompt)
        if previousAxis is not None and previousAxis != prompt.axis:
            self.statusLabel.text = "Prompted in another view: propagation now follows this view; earlier prompts were dropped."

    def _submitPreview(self, segmentId, prompt):
        """The worker computes the 2D preview of ``prompt``; the main thread writes it."""
        propagation = self.propagation
        self._submit(
            "preview",
            lambda progress, cancelled: propagation.preview_in_session(segmentId, prompt),
            lambda preview: self._finishPreview(propagation, segmentId, preview),
        )

    def onUseSegmentAsPrompt(self):
        viewWidget = self._lastSliceWidget or slicer.app.layoutManager().sliceWidget("Red")
        from SAM3DSegmentSlicerLogic.view_prompts import slice_index_of_view

        try:
            segmentId = self._selectedSegmentId()
            self._ensurePropagation()
            axis = self._viewAxis(viewWidget)
            index = slice_index_of_view(self.propagation.volume, axis, _sliceToRas(viewWidget))
            prompt = self.propagation.prompt_from_segment(segmentId, axis, index)
        except Exception as error:
            self._showError(error)
            return
        self._submitPreview(segmentId, prompt)

    def onPropagate(self):
        try:
            segmentId = self._selectedSegmentId()
            self._ensurePropagation()
            propagation = self.propagation
            if propagation.axis is None:
                raise _promptError("Click on the object in a slice view first (or use the current segment as prompt).")
            options = self._moduleSettings().propagation_options(propagation.volume.shape[propagation.axis])
            edits = propagation.edited_slices(segmentId)  # MRML read on the main thread
        except Exception as error:
            self._showError(error)
            return
        if edits.masks:
            self.statusLabel.text = f"Edited slices become anchors: {sorted(edits.masks)}"
        self.progressBar.setVisible(True)
        self.progressBar.value = 0
        self._submit(
            "propagation",
            lambda progress, cancelled: propagation.propagate_in_session(segmentId, edits, options, progress, cancelled),
            lambda result: self._finishPropagation(propagation, segmentId, result),
        )

    def onCancel(self):
        if self.worker is not None:
            self.worker.cancel()
        self.statusLabel.text = "Cancelling..."

    def onClearPrompts(self):
        if self.propagation is None:
            return
        try:
            segmentId = self._selectedSegmentId()
        except Exception as error:
            self._showError(error)
            return
        propagation = self.propagation
        self._submit("clear prompts", lambda progress, cancelled: propagation.clear_prompts(segmentId),
                     lambda unused: self.updateMarkers())
        self._propagatedSegments.discard(segmentId)

    # --- results on the main thread --------------------------------------------------------------

    def _finishPreview(self, propagation, segmentId, preview):
        report = propagation.write_preview(segmentId, preview)
        score = "" if preview.score is None else f", score {preview.score:.2f}"
        self.statusLabel.text = f"Preview on slice {preview.index} in {preview.seconds:.2f} s{score} ({report.changed_voxels} voxels changed)"
        self.updateMarkers()

    def _finishPropagation(self, propagation, segmentId, result):
        report = propagation.write_result(segmentId, result)
        self._propagatedSegments.add(segmentId)
        slices = result.slices_with_object
        extent = f"slices {slices[0]}..{slices[-1]}" if slices else "no slices"
        stops = "; ".join(result.stop_reasons.values())
        self.statusLabel.text = (
            f"{result.engine}: {extent}, {len(result.slices_computed)} computed, {result.slices_encoded} encoded, "
            f"{result.seconds:.1f} s, {report.changed_voxels} voxels changed. {stops}"
        )
        self.updateButtons()

    def _poll(self):
        from SAM3DSegmentSlicerLogic.messages import user_message

        for event in self.worker.poll():
            if event.kind == "progress":
                self.progressBar.maximum = max(event.total, 1)
                self.progressBar.value = event.done
                continue
            callback = self._callbacks.pop(event.job_id, None)
            if event.kind == "finished" and callback is not None:
                try:
                    callback(event.result)
                except Exception as error:  # writing failed: report it, never lose the message
                    self._showError(error)
            elif event.kind == "cancelled":
                self.statusLabel.text = user_message(event.error)
            elif event.kind == "failed":
                self._showError(event.error)
        if not self.worker.busy:
            self.pollTimer.stop()
            self.progressBar.setVisible(False)
        self.updateButtons()

    # --- helpers -----------------------------------------------------------------------------------

    def _ensureWorker(self):
        if self.worker is None:
            from SAM3DSegmentSlicerLogic.worker import ModelWorker

            self.worker = ModelWorker()
            self.pollTimer = qt.QTimer()
            self.pollTimer.setInterval(100)
            self.pollTimer.connect("timeout()", self._poll)

    def _submit(self, label, job, onFinished):
        self._ensureWorker()
        jobId = self.worker.submit(job, label)
        self._callbacks[jobId] = onFinished
        self.statusLabel.text = f"Running {label}..."
        self.pollTimer.start()
        self.updateButtons()

    def _moduleSettings(self):
        from SAM3DSegmentSlicerLogic.settings import load_settings

        node = slicer.mrmlScene.GetSingletonNode("SAM3DSegment", "vtkMRMLScriptedModuleNode")
        return load_settings(node)

    def _ensurePropagation(self):
        """The logic for the current source volume, segmentation and engine settings."""
        from SAM3DSegmentSlicerLogic.masking import masking_from_editor_node
        from SAM3DSegmentSlicerLogic.segment_propagation import SegmentPropagation
        from SAM3DSegmentSlicerLogic.session_factory import session_factory_for

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = _sourceVolume(parameterSetNode)
        segmentationNode = parameterSetNode.GetSegmentationNode()
        settings = self._moduleSettings()
        key = (volumeNode.GetID() if volumeNode else None, segmentationNode.GetID() if segmentationNode else None,
               settings.engine, settings.model, settings.checkpoint, settings.device, settings.projection)
        if self.propagation is not None and key == self._propagationKey:
            return
        self._resetPropagation()
        factory = session_factory_for(settings)  # raises a clear error when the engine cannot run
        self.engineLabel.text = getattr(factory, "reason", settings.engine)
        self.propagation = SegmentPropagation(
            volumeNode, segmentationNode, factory,
            masking=lambda: masking_from_editor_node(self.scriptedEffect.parameterSetNode()),
            save_undo_state=self.scriptedEffect.saveStateForUndo,
        )
        self._propagationKey = key

    def _resetPropagation(self):
        if self.propagation is not None:
            old = self.propagation
            self._ensureWorker()
            self.worker.submit(lambda progress, cancelled: old.close(), "close session")
        self.propagation = None
        self._propagationKey = None
        self._propagatedSegments.clear()

    def _selectedSegmentId(self):
        from SAM3DSegmentLib.errors import InputError

        segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        if not segmentId:
            raise InputError("No segment is selected. Add or select a segment first.")
        return segmentId

    def _viewAxis(self, viewWidget):
        from SAM3DSegmentSlicerLogic.view_prompts import axis_of_view

        return axis_of_view(_sliceToRas(viewWidget), self.propagation.volume.ijk_to_ras)

    def _showError(self, error):
        from SAM3DSegmentSlicerLogic.messages import user_message

        logging.error("SAM 3D: %s", error, exc_info=not _isExpected(error))
        self.statusLabel.text = ""
        slicer.util.errorDisplay(user_message(error), windowTitle="SAM 3D")

    def updateButtons(self):
        if not hasattr(self, "propagateButton"):
            return
        busy = self.worker is not None and self.worker.busy
        try:
            segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        except Exception:
            segmentId = None
        self.propagateButton.enabled = not busy
        self.repropagateButton.enabled = not busy and segmentId in self._propagatedSegments
        self.cancelButton.enabled = busy
        self.useSegmentButton.enabled = not busy

    def _markupsNode(self, create=True):
        nodes = slicer.mrmlScene.GetNodesByName(MARKUPS_NAME)
        if nodes.GetNumberOfItems():
            return nodes.GetItemAsObject(0)
        if not create:
            return None
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", MARKUPS_NAME)
        node.SetSaveWithScene(False)
        node.SetHideFromEditors(True)
        node.CreateDefaultDisplayNodes()
        return node

    def updateMarkers(self):
        """Show the selected segment's clicks (+/-) and boxes, or clear them."""
        from SAM3DSegmentSlicerLogic.markers import (
            clear_prompt_boxes,
            clear_prompt_markers,
            show_prompt_boxes,
            show_prompt_markers,
        )

        show = self.scriptedEffect.integerParameter("ShowPromptMarkers") != 0
        if self.propagation is None or not show:
            clear_prompt_markers(self._markupsNode(create=False))
            clear_prompt_boxes(slicer.mrmlScene)
            return
        markups = self._markupsNode()
        try:
            anchors = self.propagation.anchors(self._selectedSegmentId())
        except Exception:
            anchors = {}
        show_prompt_markers(markups, self.propagation.volume, anchors)
        show_prompt_boxes(slicer.mrmlScene, self.propagation.volume, anchors)
        markups.GetDisplayNode().SetVisibility(True)

    def _updateRubberBand(self, viewWidget, xy0, xy1):
        if viewWidget not in self._rubberBands:
            points = vtk.vtkPoints()
            points.SetNumberOfPoints(4)
            lines = vtk.vtkCellArray()
            lines.InsertNextCell(5, [0, 1, 2, 3, 0])
            polyData = vtk.vtkPolyData()
            polyData.SetPoints(points)
            polyData.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(polyData)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(1.0, 1.0, 0.0)
            self.scriptedEffect.addActor2D(viewWidget, actor)
            self._rubberBands[viewWidget] = (polyData, actor)
        polyData, _ = self._rubberBands[viewWidget]
        (x0, y0), (x1, y1) = xy0, xy1
        for index, (x, y) in enumerate(((x0, y0), (x1, y0), (x1, y1), (x0, y1))):
            polyData.GetPoints().SetPoint(index, x, y, 0)
        polyData.GetPoints().Modified()
        viewWidget.sliceView().scheduleRender()

    def _removeRubberBand(self, viewWidget):
        entry = self._rubberBands.pop(viewWidget, None)
        if entry is not None:
            self.scriptedEffect.removeActor2D(viewWidget, entry[1])
            viewWidget.sliceView().scheduleRender()


def _close(xy0, xy1):
    return abs(xy0[0] - xy1[0]) <= CLICK_TOLERANCE_PX and abs(xy0[1] - xy1[1]) <= CLICK_TOLERANCE_PX


def _sliceToRas(viewWidget):
    matrix = viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS()
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _sourceVolume(parameterSetNode):
    getter = getattr(parameterSetNode, "GetSourceVolumeNode", None) or parameterSetNode.GetMasterVolumeNode
    return getter()


def _promptError(message):
    from SAM3DSegmentLib.errors import PromptError

    return PromptError(message)


def _isExpected(error):
    from SAM3DSegmentLib.errors import SAM3DError

    return isinstance(error, SAM3DError)
