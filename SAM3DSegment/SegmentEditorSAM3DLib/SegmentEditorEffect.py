"""Segment Editor effect "SAM 3D": click/box prompts in slice views, preview, propagate, cancel.

Thin Qt layer: it turns mouse and key events into RAS points and calls SAM3DSegmentSlicerLogic.
The model runs in a ``sam3d serve`` process (started with Slicer's Python on first use, or the
server set in the SAM 3D module), never in a thread of Slicer: previews are short requests, a
propagation is a job on the server that a QTimer polls (``_poll``), writing the result into the
segment when it is done. Left-click: include point; right-click or Ctrl+left-click: exclude point;
Shift+drag: box; in lasso / scribble mode (keys l / s, or the mode buttons) a left-drag draws a lasso
(a mask prompt) or a scribble (points along it), Ctrl+left-drag an exclude one; keys: see ``helpText``.
The stroke is drawn while dragging as a 2D polyline actor in the view (like Slicer's Draw effect)
and removed on release, deactivate, cleanup and layout changes.
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
POLL_INTERVAL_MS = 100
INCLUDE_COLOR = (1.0, 1.0, 0.0)
EXCLUDE_COLOR = (1.0, 0.3, 0.3)
MODE_LABELS = {"include": "Include", "exclude": "Exclude", "box": "Box", "lasso": "Lasso", "scribble": "Scribble"}
MODE_STATUS = {
    "include": "Left-click: include points.",
    "exclude": "Left-click: exclude points.",
    "box": "Left-drag: box.",
    "lasso": "Left-drag: lasso (the slice becomes its inside). Ctrl+left-drag: exclude lasso (cut it out).",
    "scribble": "Left-drag: include scribble (points along it). Ctrl+left-drag: exclude scribble.",
}


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Promptable 3D segmentation of the selected segment with Segment Anything models."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = EFFECT_NAME
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.propagation = None
        self._propagationKey = None
        self.server = None  # ServerLink: the local server process or a server URL
        self.job = None  # the PropagationJob being polled
        self._pendingAction = None  # (label, callable) waiting for the server to start
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self._poll)
        self._pressXY = None
        self._rightPress = None  # (xy, start field of view, viewWidget, zooming)
        self._boxStart = None  # (xy, ras, viewWidget)
        self._clickMode = "include"
        self._rubberBands = {}
        self._stroke = None  # the lasso or scribble being drawn: see _startStroke
        self._strokeLines = {}  # viewWidget -> (vtkPolyData, vtkActor2D) of the stroke being drawn
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
        from SAM3DSegmentSlicerLogic.view_prompts import shortcuts_help_html

        return (
            "<html>Segment the selected segment in 3D with Segment Anything models.<p>"
            "<b>Left-click</b>: include point. <b>Right-click</b> or <b>Ctrl+click</b>: exclude point "
            "(right-drag still zooms). <b>Shift+drag</b>: box. "
            "<b>Lasso</b> mode (key <b>l</b> or the Lasso button): left-drag a closed contour; the slice becomes "
            "its inside (a mask prompt). <b>Ctrl+drag</b> in lasso mode: exclude lasso, its inside is cut from "
            "the segment on that slice. <b>Scribble</b> mode (key <b>s</b>): left-drag a stroke; include points "
            "are placed along it every few mm (Ctrl+drag: exclude points). A lasso replaces the slice's earlier "
            "prompts; a scribble adds to them. The slice updates after each prompt (preview). "
            "Clicks outside the volume are ignored with a message.<p>"
            f"{shortcuts_help_html()}<p>"
            "<b>Propagate</b> fills the volume along the axis of the view you prompted in. Correct any "
            "slice with any tool and press <b>Re-propagate</b>: corrected slices become anchors and only "
            "the slices between them are recomputed. Undo restores the segment. Settings (engine, model, "
            "stop rule, server) are in the SAM 3D Segment module; the model runs in a separate server "
            "process, started on first use.<p>"
            "The <b>volumetric</b> engine (3DSAM-adapter) takes <b>include clicks</b> only: each click gives the "
            "whole 3D mask at once; boxes and exclude clicks are refused. Correct a slice with a lasso or any "
            "tool: it is kept when you propagate.</html>"
        )

    def setupOptionsFrame(self):
        from SAM3DSegmentSlicerLogic.view_prompts import CLICK_MODES

        self.engineLabel = qt.QLabel("")
        self.engineLabel.wordWrap = True
        self.scriptedEffect.addLabeledOptionsWidget("Engine:", self.engineLabel)

        self.modeButtons = {}
        self.modeButtonGroup = qt.QButtonGroup()
        self.modeButtonGroup.setExclusive(True)
        modeRow = qt.QHBoxLayout()
        for mode in CLICK_MODES:
            button = qt.QPushButton(MODE_LABELS[mode])
            button.checkable = True
            button.toolTip = MODE_STATUS[mode]
            button.connect("clicked()", lambda mode=mode: self._setClickMode(mode))
            self.modeButtonGroup.addButton(button)
            self.modeButtons[mode] = button
            modeRow.addWidget(button)
        self.modeButtons[self._clickMode].checked = True
        self.scriptedEffect.addLabeledOptionsWidget("Left button:", modeRow)

        self.useSegmentButton = qt.QPushButton("Use current segment on this slice as prompt")
        self.useSegmentButton.toolTip = "The selected segment on the last clicked slice view becomes the prompt (a mask)."
        self.useSegmentButton.connect("clicked()", self.onUseSegmentAsPrompt)
        self.scriptedEffect.addOptionsWidget(self.useSegmentButton)

        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.toolTip = "Fill the volume from the prompted slices (direction, range and stop rule: SAM 3D module). Key: p."
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.repropagateButton = qt.QPushButton("Re-propagate")
        self.repropagateButton.toolTip = "Slices you corrected since the last propagation become anchors; only the slices between anchors are recomputed."
        self.repropagateButton.connect("clicked()", self.onPropagate)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.toolTip = "Stop the running propagation; the segment is left as it was. Key: Esc."
        self.cancelButton.connect("clicked()", self.onCancel)
        buttons = qt.QHBoxLayout()
        for button in (self.propagateButton, self.repropagateButton, self.cancelButton):
            buttons.addWidget(button)
        self.scriptedEffect.addOptionsWidget(buttons)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setVisible(False)
        self.scriptedEffect.addOptionsWidget(self.progressBar)

        self.excludeOtherSegmentsCheckBox = qt.QCheckBox("Other segments are exclude prompts")
        self.excludeOtherSegmentsCheckBox.toolTip = (
            "A click, scribble or box also gets exclude points inside the other visible segments next to it, on "
            "that slice, so the model keeps away from them (kept with the SAM 3D module's settings). Whether other "
            "segments may be overwritten is the Masking setting below (overwrite: none / visible / all).")
        self.excludeOtherSegmentsCheckBox.connect("toggled(bool)", self.onExcludeOtherSegmentsToggled)
        self.scriptedEffect.addOptionsWidget(self.excludeOtherSegmentsCheckBox)

        self.showMarkersCheckBox = qt.QCheckBox("Show prompt markers")
        self.showMarkersCheckBox.checked = True
        self.showMarkersCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.clearPromptsButton = qt.QPushButton("Clear prompts")
        self.clearPromptsButton.toolTip = "Forget this segment's prompts and remove the markers (the segment's voxels stay). Key: c."
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
        blocked = self.excludeOtherSegmentsCheckBox.blockSignals(True)
        self.excludeOtherSegmentsCheckBox.checked = settings.exclude_other_segments
        self.excludeOtherSegmentsCheckBox.blockSignals(blocked)
        where = f" on {settings.server_url}" if settings.uses_remote_server else ""
        adapter = f" + adapter {os.path.basename(settings.adapter)}" if settings.adapter and not where else ""
        self.engineLabel.text = f"{settings.engine}" + (f" / {settings.model}" if settings.model else "") + adapter + where
        self.updateButtons()

    def updateMRMLFromGUI(self, *unused):
        self.scriptedEffect.setParameter("ShowPromptMarkers", 1 if self.showMarkersCheckBox.checked else 0)
        self.updateMarkers()

    def onExcludeOtherSegmentsToggled(self, checked):
        """The setting lives in the SAM 3D module's parameter node (PanelSettings.exclude_other_segments);
        the logic reads it at every prompt."""
        from SAM3DSegmentSlicerLogic.settings import load_settings, save_settings

        node = self._moduleParameterNode(create=True)
        settings = load_settings(node)
        settings.exclude_other_segments = bool(checked)
        save_settings(settings, node)

    def activate(self):
        self.updateMarkers()

    def deactivate(self):
        """Leaving the effect stops polling: a running propagation is cancelled (the segment stays as
        it was) and an action waiting for the server is dropped."""
        self._stopPolling(cancelJob=True)
        for viewWidget in list(self._rubberBands):
            self._removeRubberBand(viewWidget)
        for viewWidget in list(self._strokeLines):
            self._removeStrokeLine(viewWidget)
        self._boxStart = None
        self._stroke = None
        self._rightPress = None
        from SAM3DSegmentSlicerLogic.markers import clear_prompt_boxes, prompt_markups_node

        markups = prompt_markups_node(slicer.mrmlScene, create=False)
        if markups is not None and markups.GetDisplayNode() is not None:
            markups.GetDisplayNode().SetVisibility(False)
        clear_prompt_boxes(slicer.mrmlScene)  # redrawn on activate

    def cleanup(self):
        """Before the effect is deleted: stop polling, disconnect the timer and close the session
        (see AbstractScriptedSegmentEditorEffect.cleanup). The shared local server stays for other
        editors; it stops with Slicer or with the module's 'Stop local server' button."""
        self._stopPolling(cancelJob=True)
        self.pollTimer.disconnect("timeout()", self._poll)
        self._forgetStrokeLines()
        self._stroke = None
        self._resetPropagation()
        self.server = None

    def sourceVolumeNodeChanged(self):
        self._resetPropagation()

    def masterVolumeNodeChanged(self):  # Slicer < 5.4
        self._resetPropagation()

    def referenceGeometryChanged(self):
        self._resetPropagation()

    def layoutChanged(self):
        """Views may be gone: remove our rubber-band actors from the views before forgetting them."""
        for viewWidget in list(self._rubberBands):
            try:
                self._removeRubberBand(viewWidget)
            except Exception:  # the view was already deleted with its renderer
                self._rubberBands.pop(viewWidget, None)
        self._rubberBands = {}
        self._forgetStrokeLines()
        self._boxStart = None
        self._stroke = None
        self._rightPress = None
        self._lastSliceWidget = None

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """Clicks, Shift+drags and keys in slice views become prompts; returns True to consume the event."""
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        xy = callerInteractor.GetEventPosition()
        shift, control, alt = callerInteractor.GetShiftKey(), callerInteractor.GetControlKey(), callerInteractor.GetAltKey()
        if eventId == vtk.vtkCommand.KeyPressEvent:
            return self._onKey(callerInteractor.GetKeySym(), shift or control or alt)
        if eventId == vtk.vtkCommand.LeftButtonDoubleClickEvent:
            return True  # a double click is two clicks already handled; Slicer must not act on it
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            self._lastSliceWidget = viewWidget
            if shift or (self._clickMode == "box" and not control):
                self._boxStart = (xy, self.xyToRas(xy, viewWidget), viewWidget)
                self._updateRubberBand(viewWidget, xy, xy)
            elif self._clickMode in ("lasso", "scribble"):
                self._startStroke(viewWidget, xy, positive=not control)
            else:
                self._pressXY = xy
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            if self._boxStart is not None and self._boxStart[2] is viewWidget:
                self._updateRubberBand(viewWidget, self._boxStart[0], xy)
                return True
            if self._stroke is not None and self._stroke["view"] is viewWidget:
                self._extendStroke(self._stroke, viewWidget, xy)
                self._updateStrokeLine(viewWidget)
                return True
            if self._rightPress is not None and self._rightPress[2] is viewWidget:
                return self._rightDrag(viewWidget, xy)
            return False
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent:
            if self._stroke is not None:
                stroke, self._stroke = self._stroke, None
                self._removeStrokeLine(stroke["view"])
                if stroke["view"] is viewWidget:
                    self._extendStroke(stroke, viewWidget, xy)
                    self._finishStroke(viewWidget, stroke)
                return True
            if self._boxStart is not None:
                startXY, startRas, startView = self._boxStart
                self._boxStart = None
                self._removeRubberBand(startView)
                if startView is viewWidget and not _close(startXY, xy):
                    endRas = self.xyToRas(xy, viewWidget)
                    self.addPrompt(viewWidget, lambda axis: self.propagation.box_from_ras(startRas, endRas, axis))
                return True
            if self._pressXY is not None and _close(self._pressXY, xy):
                ras = self.xyToRas(xy, viewWidget)
                positive = (self._clickMode != "exclude") != bool(control)
                self.addPrompt(viewWidget, lambda axis: self.propagation.point_from_ras(ras, positive, axis))
            self._pressXY = None
            return True
        if eventId == vtk.vtkCommand.RightButtonPressEvent:
            if shift or control or alt:
                return False  # Slicer's own right-button actions (e.g. Alt+right-drag zoom)
            self._lastSliceWidget = viewWidget
            sliceNode = viewWidget.sliceLogic().GetSliceNode()
            self._rightPress = (xy, tuple(sliceNode.GetFieldOfView()), viewWidget, False)
            return True  # a prompt, or a zoom that _rightDrag does as Slicer does
        if eventId == vtk.vtkCommand.RightButtonReleaseEvent:
            if self._rightPress is None:
                return False  # the press was Slicer's: so is the release
            startXY, _, startView, zooming = self._rightPress
            self._rightPress = None
            if not zooming and startView is viewWidget and _close(startXY, xy):
                ras = self.xyToRas(xy, viewWidget)
                self.addPrompt(viewWidget, lambda axis: self.propagation.point_from_ras(ras, False, axis))
            return True
        return False

    # --- actions -------------------------------------------------------------------------------

    def addPrompt(self, viewWidget, makePrompt, replace=False):
        """A click, box, lasso or scribble: the prompt is built and previewed as soon as the server is
        ready (``replace``: it replaces the slice's earlier prompts, as a lasso does)."""
        confirmed = self.scriptedEffect.confirmCurrentSegmentVisible()
        if confirmed == self.scriptedEffect.NotConfirmed:
            return
        self._whenServerReady("prompt", lambda: self._previewNow(viewWidget, makePrompt, replace))

    def _previewNow(self, viewWidget, makePrompt, replace=False):
        segmentId = self._selectedSegmentId()
        self._ensurePropagation()
        previousAxis = self.propagation.axis
        prompt = makePrompt(self._viewAxis(viewWidget))  # a click outside the volume raises here: prompts kept
        preview = self.propagation.add_prompt(segmentId, prompt, replace=replace)
        score = "" if preview.score is None else f", score {preview.score:.2f}"
        self.statusLabel.text = f"Preview on slice {preview.index} in {preview.seconds:.2f} s{score}"
        if self.propagation.last_exclude_points:
            self.statusLabel.text += f"; {len(self.propagation.last_exclude_points)} exclude point(s) inside other segments"
        if previousAxis is not None and previousAxis != prompt.axis:
            self.statusLabel.text += ". Prompted in another view: propagation now follows this view; earlier prompts were dropped."
        self.updateMarkers()

    def onUseSegmentAsPrompt(self):
        viewWidget = self._lastSliceWidget or slicer.app.layoutManager().sliceWidget("Red")
        self._whenServerReady("prompt", lambda: self._useSegmentNow(viewWidget))

    def _useSegmentNow(self, viewWidget):
        from SAM3DSegmentSlicerLogic.view_prompts import slice_index_of_view

        segmentId = self._selectedSegmentId()
        self._ensurePropagation()
        axis = self._viewAxis(viewWidget)
        index = slice_index_of_view(self.propagation.volume, axis, _sliceToRas(viewWidget))
        prompt = self.propagation.prompt_from_segment(segmentId, axis, index)
        preview = self.propagation.add_prompt(segmentId, prompt)
        self.statusLabel.text = f"Segment on slice {preview.index} is the prompt"
        self.updateMarkers()

    def onPropagate(self):
        if self.scriptedEffect.confirmCurrentSegmentVisible() == self.scriptedEffect.NotConfirmed:
            return
        self._whenServerReady("propagation", self._propagateNow)

    def _propagateNow(self):
        segmentId = self._selectedSegmentId()
        self._ensurePropagation()
        propagation = self.propagation
        if propagation.axis is None:
            raise _promptError("Click on the object in a slice view first (or use the current segment as prompt).")
        options = self._moduleSettings().propagation_options(propagation.volume.shape[propagation.axis])
        self.job = propagation.start_propagation(segmentId, options)
        edited = sorted(self.job.edits.masks) if self.job.edits is not None else []
        self.statusLabel.text = "Propagating..." + (f" Edited slices become anchors: {edited}" if edited else "")
        self.progressBar.maximum = 0  # busy until the first progress report
        self.progressBar.setVisible(True)
        self.pollTimer.start()
        self.updateButtons()

    def onCancel(self):
        if self._pendingAction is not None:
            self._pendingAction = None
            self.statusLabel.text = "Cancelled; nothing was changed."
        if self.job is not None and not self.job.finished:
            self.job.cancel()
            self.statusLabel.text = "Cancelling..."
        self.updateButtons()

    def onClearPrompts(self):
        if self.propagation is None:
            return
        try:
            segmentId = self._selectedSegmentId()
            self.propagation.clear_prompts(segmentId)
        except Exception as error:
            self._showError(error)
            return
        self._propagatedSegments.discard(segmentId)
        self.statusLabel.text = "Prompts cleared (the segment's voxels stay)."
        self.updateMarkers()

    def _setClickMode(self, mode):
        """What a left press does: include / exclude click, box, lasso or scribble (keys i/e/x/l/s, buttons)."""
        self._clickMode = mode
        button = getattr(self, "modeButtons", {}).get(mode)
        if button is not None and not button.checked:
            button.checked = True
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = self._modeRefusal(mode) or MODE_STATUS[mode]

    def _modeRefusal(self, mode):
        """What to do instead, when the engine cannot take what this mode makes (a box or an exclude
        click on the volumetric engine); None otherwise."""
        from SAM3DSegmentLib.errors import PromptError
        from SAM3DSegmentSlicerLogic.engine_choices import engine_of, mode_refusal
        from SAM3DSegmentSlicerLogic.messages import user_message

        if self.propagation is not None:
            engine = self.propagation.engine
        else:
            settings = self._moduleSettings()
            engine = engine_of(settings.engine, settings.model)
        refusal = mode_refusal(engine, mode)
        return None if refusal is None else user_message(PromptError(refusal))

    def _onKey(self, keySym, modifiers):
        from SAM3DSegmentSlicerLogic.view_prompts import shortcut_action

        action = shortcut_action(keySym, modifiers)
        if action in MODE_STATUS:
            self._setClickMode(action)
        elif action == "propagate":
            self.onPropagate()
        elif action == "cancel":
            self.onCancel()
        elif action == "clear":
            self.onClearPrompts()
        return action is not None

    # --- the server and the poll on the main thread ------------------------------------------------

    def _whenServerReady(self, label, action):
        """Run ``action`` now if the server is ready, else as soon as it is (the timer polls);
        refused while a propagation runs. Errors are shown; a server that died is forgotten."""
        if self.job is not None and not self.job.finished:
            self.statusLabel.text = f"A propagation is running: the {label} was not taken. Wait for it, or press Cancel."
            return
        try:
            connection = self._connection()
        except Exception as error:
            self._handleError(error)
            return
        if connection is None:
            self._pendingAction = (label, action)
            self.statusLabel.text = "Starting the SAM 3D server (the first time loads the model)..."
            self.progressBar.maximum = 0
            self.progressBar.setVisible(True)
            self.pollTimer.start()
            self.updateButtons()
            return
        self._run(action)

    def _run(self, action):
        try:
            action()
        except Exception as error:
            self._handleError(error)
        self.updateButtons()

    def _poll(self):
        """QTimer: one non-blocking look at the starting server and one status request of the job."""
        if self._pendingAction is not None:
            try:
                connection = self._connection()
            except Exception as error:
                self._pendingAction = None
                self._handleError(error)
                connection = None
            if connection is not None:
                _, action = self._pendingAction
                self._pendingAction = None
                self.progressBar.setVisible(False)
                self._run(action)
        if self.job is not None:
            update = self.job.poll()  # writes the result itself when the job is done
            if update.total:
                self.progressBar.maximum = max(update.total, 1)
                self.progressBar.value = update.done
            if update.finished:
                self._finishJob(self.job, update)
        if self._pendingAction is None and self.job is None:
            self.pollTimer.stop()
            self.progressBar.setVisible(False)
        self.updateButtons()

    def _finishJob(self, job, update):
        from SAM3DSegmentSlicerLogic.messages import user_message

        self.job = None
        if update.state == "done":
            result, report = update.result, update.report
            self._propagatedSegments.add(job.segment_id)
            slices = result.slices_with_object
            extent = f"slices {slices[0]}..{slices[-1]}" if slices else "no slices"
            stops = "; ".join(result.stop_reasons.values())
            kept = f" Kept your edits on slices {report.kept_slices}." if report.kept_slices else ""
            self.statusLabel.text = (
                f"{result.engine}: {extent}, {len(result.slices_computed)} computed, {result.slices_encoded} encoded, "
                f"{result.seconds:.1f} s, {report.changed_voxels} voxels changed. {stops}{kept}"
            )
        elif update.state == "cancelled":
            self.statusLabel.text = user_message(update.error)
        else:
            self._handleError(update.error)

    def _stopPolling(self, cancelJob):
        self._pendingAction = None
        if cancelJob and self.job is not None and not self.job.finished:
            self.job.abandon()  # one request; the server stops at its next slice, nothing is written
        self.job = None
        self.pollTimer.stop()
        if hasattr(self, "progressBar"):
            self.progressBar.setVisible(False)
        self.updateButtons()

    def _serverSpec(self):
        from SAM3DSegmentSlicerLogic.server_process import ServerSpec

        return ServerSpec.from_settings(self._moduleSettings())

    def _connection(self):
        """The server connection, or None while the local server starts (never blocks)."""
        from SAM3DSegmentSlicerLogic.server_process import shared_server_link

        if self.server is None:
            self.server = shared_server_link()
        spec = self._serverSpec()
        connection = self.server.connection(spec)  # raises ServerError when the local server died
        if connection is not None and self.propagation is not None and self.propagation.session is not None:
            if getattr(self.propagation.session, "connection", None) is not connection:
                self._resetPropagation()  # a restarted server has none of the old sessions
        return connection

    def _handleError(self, error):
        from SAM3DSegmentLib.errors import ServerError

        if isinstance(error, ServerError):
            # A dead local server is forgotten (the next action starts a new one); a remote server is
            # reconnected. Sessions do not survive either: the segment's prompts start afresh.
            if self.server is not None:
                if self.server.local is None or "did not answer" in str(error):
                    self.server.forget()
                else:
                    try:
                        self.server.check()
                    except ServerError:
                        pass  # forgotten by check()
            self.job = None
            self._resetPropagation(closeSession=False)
        self._showError(error)

    # --- helpers -----------------------------------------------------------------------------------

    def _moduleSettings(self):
        from SAM3DSegmentSlicerLogic.settings import load_settings

        return load_settings(self._moduleParameterNode())

    def _moduleParameterNode(self, create=False):
        """The SAM 3D module's parameter node (as ScriptedLoadableModuleLogic.getParameterNode makes it)."""
        node = slicer.mrmlScene.GetSingletonNode("SAM3DSegment", "vtkMRMLScriptedModuleNode")
        if node is None and create:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag("SAM3DSegment")
            node.SetAttribute("ModuleName", "SAM3DSegment")
            node.SetName(slicer.mrmlScene.GenerateUniqueName("SAM3DSegment"))
            node = slicer.mrmlScene.AddNode(node)
        return node

    def _ensurePropagation(self):
        """The logic for the current source volume, segmentation and engine settings."""
        from SAM3DSegmentSlicerLogic.masking import masking_from_editor_node
        from SAM3DSegmentSlicerLogic.segment_propagation import SegmentPropagation
        from SAM3DSegmentSlicerLogic.session_factory import remote_session_factory

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = _sourceVolume(parameterSetNode)
        segmentationNode = parameterSetNode.GetSegmentationNode()
        spec = self._serverSpec()
        settings = self._moduleSettings()
        key = (volumeNode.GetID() if volumeNode else None, segmentationNode.GetID() if segmentationNode else None,
               spec, settings.projection)
        if self.propagation is not None and key == self._propagationKey:
            return
        self._resetPropagation()
        connection = self._connection()
        if connection is None:
            raise _promptError("The SAM 3D server is still starting; try again in a moment.")
        factory = remote_session_factory(connection, spec)
        self.engineLabel.text = factory.reason
        self.propagation = SegmentPropagation(
            volumeNode, segmentationNode, factory,
            masking=lambda: masking_from_editor_node(self.scriptedEffect.parameterSetNode()),
            save_undo_state=self.scriptedEffect.saveStateForUndo,
            exclude_other_segments=lambda: self._moduleSettings().exclude_other_segments,
        )
        self._propagationKey = key

    def _resetPropagation(self, closeSession=True):
        if self.job is not None and not self.job.finished:
            self.job.abandon()
        self.job = None
        if self.propagation is not None and closeSession:
            try:
                self.propagation.close()  # one short request; a server that is gone is ignored
            except Exception as error:
                logging.warning("SAM 3D: closing the session: %s", error)
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
        from SAM3DSegmentLib.errors import PromptError
        from SAM3DSegmentSlicerLogic.messages import user_message

        logging.error("SAM 3D: %s", error, exc_info=not _isExpected(error))
        if isinstance(error, PromptError):  # e.g. a click outside the volume: ignored, with a message
            self.statusLabel.text = user_message(error)
            return
        self.statusLabel.text = ""
        slicer.util.errorDisplay(user_message(error), windowTitle="SAM 3D")

    def updateButtons(self):
        if not hasattr(self, "propagateButton"):
            return
        busy = (self.job is not None and not self.job.finished) or self._pendingAction is not None
        try:
            segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        except Exception:
            segmentId = None
        self.propagateButton.enabled = not busy
        self.repropagateButton.enabled = not busy and segmentId in self._propagatedSegments
        self.cancelButton.enabled = busy
        self.useSegmentButton.enabled = not busy
        self.clearPromptsButton.enabled = not busy

    def updateMarkers(self):
        """Show the selected segment's clicks (+/-) and boxes, or clear them."""
        from SAM3DSegmentSlicerLogic.markers import (
            clear_prompt_boxes,
            clear_prompt_markers,
            prompt_markups_node,
            show_prompt_boxes,
            show_prompt_markers,
        )

        show = self.scriptedEffect.integerParameter("ShowPromptMarkers") != 0
        if self.propagation is None or not show:
            clear_prompt_markers(prompt_markups_node(slicer.mrmlScene, create=False))
            clear_prompt_boxes(slicer.mrmlScene)
            return
        markups = prompt_markups_node(slicer.mrmlScene)
        try:
            anchors = self.propagation.anchors(self._selectedSegmentId())
        except Exception:
            anchors = {}
        show_prompt_markers(markups, self.propagation.volume, anchors)
        show_prompt_boxes(slicer.mrmlScene, self.propagation.volume, anchors)
        markups.GetDisplayNode().SetVisibility(True)

    def _rightDrag(self, viewWidget, xy):
        """Right-drag zooms the slice view exactly as Slicer's own right-drag does."""
        from SAM3DSegmentSlicerLogic.view_prompts import zoomed_field_of_view

        startXY, startFov, startView, zooming = self._rightPress
        if not zooming and _close(startXY, xy):
            return True
        self._rightPress = (startXY, startFov, startView, True)
        height = viewWidget.sliceView().renderWindow().GetSize()[1]
        fov = zoomed_field_of_view(startFov, xy[1] - startXY[1], height)
        if fov is not None:
            sliceNode = viewWidget.sliceLogic().GetSliceNode()
            sliceNode.SetFieldOfView(*fov)
            sliceNode.UpdateMatrices()
        return True

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

    # --- lasso and scribble strokes (drawn in XY, kept in RAS; geometry in drawn_prompts) -------------

    def _startStroke(self, viewWidget, xy, positive):
        """A left press in lasso / scribble mode: the stroke is on the slice the view shows now."""
        self._stroke = {
            "view": viewWidget, "kind": self._clickMode, "positive": positive,
            "xy": [tuple(xy)], "ras": [self.xyToRas(xy, viewWidget)],
            "sliceToRas": _sliceToRas(viewWidget),
        }
        self._updateStrokeLine(viewWidget)

    def _extendStroke(self, stroke, viewWidget, xy):
        if tuple(xy) != stroke["xy"][-1]:
            stroke["xy"].append(tuple(xy))
            stroke["ras"].append(self.xyToRas(xy, viewWidget))

    def _finishStroke(self, viewWidget, stroke):
        """The released stroke becomes a prompt: a short one is a click; a lasso a mask prompt that
        replaces the slice's prompts; a scribble points along it (drawn_prompts.py)."""
        rasPoints, positive, sliceToRas = list(stroke["ras"]), stroke["positive"], stroke["sliceToRas"]
        if all(_close(stroke["xy"][0], p) for p in stroke["xy"]):
            ras = rasPoints[-1]
            self.addPrompt(viewWidget, lambda axis: self.propagation.point_from_ras(ras, positive, axis))
        elif stroke["kind"] == "lasso":
            self.addPrompt(viewWidget, lambda axis: self.propagation.lasso_from_ras(
                self._selectedSegmentId(), rasPoints, axis, sliceToRas, positive), replace=True)
        else:
            self.addPrompt(viewWidget, lambda axis: self.propagation.scribble_from_ras(
                rasPoints, axis, sliceToRas, positive))

    def _updateStrokeLine(self, viewWidget):
        """The stroke being drawn as a polyline (a lasso closed back to its start) in the view."""
        stroke = self._stroke
        if viewWidget not in self._strokeLines:
            polyData = vtk.vtkPolyData()
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(polyData)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetLineWidth(2)
            self.scriptedEffect.addActor2D(viewWidget, actor)
            self._strokeLines[viewWidget] = (polyData, actor)
        polyData, actor = self._strokeLines[viewWidget]
        actor.GetProperty().SetColor(*(INCLUDE_COLOR if stroke["positive"] else EXCLUDE_COLOR))
        points = vtk.vtkPoints()
        for x, y in stroke["xy"]:
            points.InsertNextPoint(x, y, 0)
        ids = list(range(len(stroke["xy"])))
        if stroke["kind"] == "lasso" and len(ids) > 2:
            ids.append(0)
        lines = vtk.vtkCellArray()
        if len(ids) > 1:
            lines.InsertNextCell(len(ids), ids)
        polyData.SetPoints(points)
        polyData.SetLines(lines)
        polyData.Modified()
        viewWidget.sliceView().scheduleRender()

    def _removeStrokeLine(self, viewWidget):
        entry = self._strokeLines.pop(viewWidget, None)
        if entry is not None:
            self.scriptedEffect.removeActor2D(viewWidget, entry[1])
            viewWidget.sliceView().scheduleRender()

    def _forgetStrokeLines(self):
        """Remove the stroke actors from their views (views already deleted are skipped), then forget them."""
        for viewWidget in list(self._strokeLines):
            try:
                self._removeStrokeLine(viewWidget)
            except Exception:  # the view was already deleted with its renderer
                self._strokeLines.pop(viewWidget, None)
        self._strokeLines = {}

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
