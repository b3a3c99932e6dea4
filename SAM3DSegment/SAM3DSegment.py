"""SAM 3D: promptable 3D segmentation with Segment Anything models in 3D Slicer.

The module panel keeps the settings (engine, model, device, propagation options, server, adapter
file) in a parameter node, downloads models, and installs dependencies on request. Segmenting
happens in the Segment Editor with the "SAM 3D" effect (SegmentEditorSAM3DLib), registered when
Slicer starts. All work below the Qt layer is in SAM3DSegmentSlicerLogic (no Qt) and the
SAM3DSegmentLib library.
"""

import logging
import os
import sys
import time

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

from SAM3DSegmentSlicerLogic import dependencies  # noqa: E402  (no heavy imports)
from SAM3DSegmentSlicerLogic.engine_choices import ENGINE_NAMES, engine_of, model_note  # noqa: E402
from SAM3DSegmentSlicerLogic.settings import (  # noqa: E402
    DEVICES,
    DIRECTIONS,
    PanelSettings,
    load_settings,
    save_settings,
)

ADAPTER_TOOLTIP = (
    "Optional: an adapter file from fine-tuning, loaded by the local server on top of the model's weights. "
    "It must be made for the chosen model and checkpoint. Changing it restarts the local server at the next action."
)
REMOTE_ADAPTER_TOOLTIP = (
    "With a server URL, the adapter is the server's own setting (chosen when it was started); "
    "the line below shows the adapter the server reports."
)
PROJECTION_NAMES = ("box", "mask", "box+mask", "points", "points+mask", "point")
EFFECT_NAME = "SAM 3D"


#
# Module
#

class SAM3DSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SAM 3D Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["SAM3DSegment contributors"]
        self.parent.helpText = (
            "Promptable 3D segmentation with Segment Anything models (SAM, MedSAM slice by slice; "
            "SAM 2.1, MedSAM2 with video memory; 3DSAM-adapter in 3D at once, include clicks only) and a "
            "weight-free engine. Use the SAM 3D effect in the Segment Editor: click or box on one slice, "
            "then Propagate."
        )
        self.parent.acknowledgementText = (
            "Builds on Segment Anything (Meta, Apache-2.0), SAM 2 (Meta, Apache-2.0), MedSAM and MedSAM2 "
            "(Wang lab, Apache-2.0), and the ideas of Slide-SAM and 3DSAM-adapter."
        )
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)


def registerSegmentEditorEffect():
    """Register the SAM 3D Segment Editor effect (when the Segment Editor is available)."""
    try:
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
    except ImportError:
        logging.info("Segment Editor effects are not available; the SAM 3D effect is not registered.")
        return
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    effect_path = os.path.join(MODULE_DIR, "SegmentEditorSAM3DLib", "SegmentEditorEffect.py")
    instance.setPythonSource(effect_path.replace("\\", "/"))
    instance.self().register()


#
# Widget
#

class SAM3DSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: settings in a parameter node, model download, dependency install."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._download = None  # the `sam3d models download` process
        self._downloadTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAM3DSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAM3DSegmentLogic()

        for name in ENGINE_NAMES:
            self.ui.engineComboBox.addItem(name)
        for name in DIRECTIONS:
            self.ui.directionComboBox.addItem(name)
        for name in PROJECTION_NAMES:
            self.ui.projectionComboBox.addItem(name)
        for name in DEVICES:
            self.ui.deviceComboBox.addItem(name)
        self.ui.modelComboBox.addItem("(engine default)", "")
        for name, description in self.logic.modelChoices():
            self.ui.modelComboBox.addItem(name, name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, description, qt.Qt.ToolTipRole)
        self.ui.checkpointPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.checkpointPathLineEdit.nameFilters = ["Checkpoints (*.pt *.pth *.pth.tar)", "All files (*)"]
        self.ui.downloadProgressBar.setVisible(False)

        for combo in (self.ui.engineComboBox, self.ui.directionComboBox, self.ui.projectionComboBox,
                      self.ui.deviceComboBox, self.ui.modelComboBox):
            combo.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        for spin in (self.ui.firstSliceSpinBox, self.ui.lastSliceSpinBox, self.ui.minAreaSpinBox,
                     self.ui.patienceSpinBox, self.ui.minScoreSpinBox):
            spin.connect("valueChanged(double)" if spin is self.ui.minScoreSpinBox else "valueChanged(int)",
                         self.updateParameterNodeFromGUI)
        self.ui.excludeOtherSegmentsCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        self.ui.serverTokenFileLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.serverTokenFileLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.adapterPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.adapterPathLineEdit.nameFilters = ["Adapters (*.pt *.pth)", "All files (*)"]
        self.ui.adapterPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.stopServerButton.connect("clicked(bool)", self.onStopServer)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownload)
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.updateDependencyState()

    def cleanup(self):
        self.removeObservers()
        if self._downloadTimer is not None:
            self._downloadTimer.stop()
            self._downloadTimer.disconnect("timeout()", self.pollDownload)
        if self._download is not None and self._download.poll() is None:
            self._download.terminate()

    def enter(self):
        self.logic.forgetServerAdapter()  # ask a remote server again
        self.initializeParameterNode()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node --------------------------------------------------------------------

    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtkModifiedEvent(), self.updateGUIFromParameterNode)
        self._parameterNode = node
        self.addObserver(node, vtkModifiedEvent(), self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            settings = load_settings(self._parameterNode)
            self.ui.engineComboBox.currentText = settings.engine
            index = self.ui.modelComboBox.findData(settings.model)
            self.ui.modelComboBox.currentIndex = max(index, 0)
            self.ui.checkpointPathLineEdit.currentPath = settings.checkpoint
            self.ui.deviceComboBox.currentText = settings.device
            self.ui.directionComboBox.currentText = settings.direction
            self.ui.firstSliceSpinBox.value = settings.first_slice
            self.ui.lastSliceSpinBox.value = settings.last_slice
            self.ui.minAreaSpinBox.value = settings.min_area
            self.ui.minScoreSpinBox.value = settings.min_score
            self.ui.patienceSpinBox.value = settings.patience
            self.ui.projectionComboBox.currentText = settings.projection
            engine = engine_of(settings.engine, settings.model)
            self.ui.projectionComboBox.enabled = engine not in ("sam2", "volumetric")  # they take no projection
            self.ui.excludeOtherSegmentsCheckBox.checked = settings.exclude_other_segments
            self.ui.serverUrlLineEdit.text = settings.server_url
            self.ui.serverTokenFileLineEdit.currentPath = settings.server_token_file
            self.ui.adapterPathLineEdit.currentPath = settings.adapter
            remote = settings.uses_remote_server
            self.ui.adapterPathLineEdit.enabled = not remote
            self.ui.adapterPathLineEdit.toolTip = REMOTE_ADAPTER_TOOLTIP if remote else ADAPTER_TOOLTIP
            self.ui.adapterStateLabel.text = self.logic.adapterState(settings)
            self.ui.modelStateLabel.text = self.logic.modelState(settings)
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *unused):
        if self._parameterNode is None or self._updatingGUI:
            return
        settings = PanelSettings(
            engine=self.ui.engineComboBox.currentText,
            model=self.ui.modelComboBox.currentData or "",
            checkpoint=self.ui.checkpointPathLineEdit.currentPath,
            device=self.ui.deviceComboBox.currentText,
            direction=self.ui.directionComboBox.currentText,
            first_slice=self.ui.firstSliceSpinBox.value,
            last_slice=self.ui.lastSliceSpinBox.value,
            min_area=self.ui.minAreaSpinBox.value,
            min_score=self.ui.minScoreSpinBox.value,
            patience=self.ui.patienceSpinBox.value,
            projection=self.ui.projectionComboBox.currentText,
            exclude_other_segments=self.ui.excludeOtherSegmentsCheckBox.checked,
            server_url=self.ui.serverUrlLineEdit.text.strip(),
            server_token_file=self.ui.serverTokenFileLineEdit.currentPath,
            adapter=self.ui.adapterPathLineEdit.currentPath,
        )
        save_settings(settings, self._parameterNode)
        self.updateDependencyState()

    # --- model download ----------------------------------------------------------------------

    def onDownload(self):
        """Download in a separate process (`sam3d models download`), polled by a timer: the main
        thread never waits for the network and no Python thread runs inside Slicer."""
        import subprocess

        from SAM3DSegmentSlicerLogic.server_process import slicer_python

        name = self.ui.modelComboBox.currentData or self.logic.defaultModel(self.ui.engineComboBox.currentText)
        if not name:
            slicer.util.infoDisplay(self.logic.noModelToDownload(self.ui.engineComboBox.currentText))
            return
        if not slicer.util.confirmOkCancelDisplay(self.logic.downloadQuestion(name), windowTitle="Download model"):
            return
        if self._download is not None and self._download.poll() is None:
            return
        self._downloadName = name
        self._download = subprocess.Popen(
            [slicer_python(), "-m", "SAM3DSegmentLib.commands.cli", "models", "download", name, "--no-progress"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        if self._downloadTimer is None:
            self._downloadTimer = qt.QTimer()
            self._downloadTimer.setInterval(250)
            self._downloadTimer.connect("timeout()", self.pollDownload)
        self.ui.downloadButton.enabled = False
        self.ui.downloadProgressBar.maximum = 0  # busy
        self.ui.downloadProgressBar.setVisible(True)
        self.ui.statusLabel.text = f"Downloading {name}..."
        self._downloadTimer.start()

    def pollDownload(self):
        from SAM3DSegmentSlicerLogic.messages import panel_advice

        if self._download is None or self._download.poll() is None:
            return
        self._downloadTimer.stop()
        self.ui.downloadButton.enabled = True
        self.ui.downloadProgressBar.setVisible(False)
        errors = self._download.stderr.read() if self._download.stderr else ""
        if self._download.returncode == 0:
            self.ui.statusLabel.text = f"Downloaded and verified: {self._downloadName}"
        else:
            lines = [line for line in errors.strip().splitlines() if line.strip()]
            slicer.util.errorDisplay(panel_advice(lines[-1] if lines else f"The download of {self._downloadName} failed."),
                                     windowTitle="Download model")
        self._download = None
        self.updateGUIFromParameterNode()

    def onStopServer(self):
        from SAM3DSegmentSlicerLogic.server_process import shared_server_link

        shared_server_link().stop()
        self.ui.statusLabel.text = "The local SAM 3D server was stopped; it starts again on the next prompt."

    # --- dependencies ------------------------------------------------------------------------

    def updateDependencyState(self):
        settings = load_settings(self._parameterNode) if self._parameterNode is not None else PanelSettings()
        if settings.uses_remote_server:
            self.ui.dependencyStateLabel.text = "A remote server runs the models: Slicer needs no extra packages."
            self.ui.installButton.enabled = False
            return
        needed = dependencies.requirements_for(settings.engine, settings.model)
        self.ui.dependencyStateLabel.text = dependencies.describe_state(needed)
        missing = dependencies.missing(needed)
        self.ui.installButton.enabled = bool(missing)
        if missing:
            self.ui.dependenciesCollapsibleButton.collapsed = False

    def onInstall(self):
        """Ask, install PyTorch (its own confirmation dialog, without a wait cursor over it), then the
        other packages under a wait cursor."""
        from SAM3DSegmentSlicerLogic.messages import user_message

        settings = load_settings(self._parameterNode)
        needed = dependencies.requirements_for(settings.engine, settings.model)
        packages = dependencies.pip_requirements(needed) + [" ".join(a) for a in dependencies.pip_builds_against_torch(needed)]
        question = "SAM 3D will install:\n"
        if dependencies.needs_pytorch(needed):
            question += f"- PyTorch {dependencies.TORCH_REQUIREMENT}, through the PyTorch extension (a large download)\n"
        if packages:
            question += f"- with pip: {', '.join(packages)}\n"
        question += "Slicer may be unresponsive during the installation. Continue?"
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle="Install dependencies"):
            return
        try:
            self.logic.installTorch(needed)  # may show the PyTorch extension's own dialog: no wait cursor
            with slicer.util.WaitCursor():
                self.logic.installPackages(needed)
        except Exception as error:
            slicer.util.errorDisplay(user_message(error))
        self.updateDependencyState()

    def onOpenSegmentEditor(self):
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setActiveEffectByName(EFFECT_NAME)


def vtkModifiedEvent():
    import vtk

    return vtk.vtkCommand.ModifiedEvent


#
# Logic (Slicer application glue; everything testable lives in SAM3DSegmentSlicerLogic)
#

class SAM3DSegmentLogic(ScriptedLoadableModuleLogic):
    """Settings, model download and dependency installation for the module and the effect."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._serverAdapters = {}  # (url, token file) -> what that server reported

    def settings(self) -> PanelSettings:
        return load_settings(self.getParameterNode())

    def adapterState(self, settings: PanelSettings) -> str:
        """The adapter line: the local file, or the remote server's adapter (asked once per URL and
        token file, with a short timeout)."""
        from SAM3DSegmentSlicerLogic.server_process import adapter_state

        if not settings.uses_remote_server:
            return adapter_state(settings)
        key = (settings.server_url.strip(), settings.server_token_file.strip())
        if key not in self._serverAdapters:
            with slicer.util.WaitCursor():
                self._serverAdapters[key] = adapter_state(settings)
        return self._serverAdapters[key]

    def forgetServerAdapter(self):
        self._serverAdapters.clear()

    def modelChoices(self):
        from SAM3DSegmentLib.models.registry import REGISTRY

        return [(name, f"{spec.description} ({spec.licence})") for name, spec in REGISTRY.items()]

    def defaultModel(self, engine):
        from SAM3DSegmentLib.models.registry import DEFAULT_MODEL, DEFAULT_SAM2_MODEL

        return {"sam2": DEFAULT_SAM2_MODEL, "weightfree": "", "volumetric": ""}.get(engine, DEFAULT_MODEL)

    def noModelToDownload(self, engine) -> str:
        if engine == "volumetric":
            return model_note(engine, "")
        return "The weight-free engine needs no model. Choose a model to download."

    def modelState(self, settings: PanelSettings) -> str:
        note = model_note(settings.engine, settings.model)
        if note:
            return note
        if settings.checkpoint:
            exists = os.path.isfile(settings.checkpoint)
            return f"Local checkpoint {'found' if exists else 'NOT FOUND'}: {settings.checkpoint}"
        name = settings.model or self.defaultModel(settings.engine)
        if not name:
            return "Weight-free engine: no model needed."
        from SAM3DSegmentLib.models.checkpoint_cache import (
            cached_path,
            package_file_path,
        )
        from SAM3DSegmentLib.models.registry import get_spec

        path = cached_path(name)
        spec = get_spec(name)
        if not path.is_file() and spec.published_filename:  # shared as a page only (3DSAM-adapter)
            return (f"{name}: not here. Download the {spec.dataset or name} checkpoint ({spec.published_filename}) "
                    f"by hand from {spec.url} and choose it as the Checkpoint file.")
        if not path.is_file():
            return f"{name}: not downloaded ({path})"
        where = "installed with its Python package" if path == package_file_path(spec) else "in the cache"
        return f"{name}: {where} ({path})"

    def downloadQuestion(self, name) -> str:
        from SAM3DSegmentLib.models.checkpoint_cache import cache_dir
        from SAM3DSegmentLib.models.registry import get_spec

        spec = get_spec(name)
        size = f"{spec.file_size / 1e6:.0f} MB" if spec.file_size else "size not published"
        return (f"Download {spec.name} ({size}, licence {spec.licence}) from\n{spec.url}\n"
                f"into {cache_dir()}?\nThe checksum is verified after download.")

    def installTorch(self, needed=dependencies.REQUIREMENTS):
        """PyTorch (at least TORCH_REQUIREMENT) through the PyTorch extension, when it is needed and missing."""
        from SAM3DSegmentLib.errors import DependencyError

        if not dependencies.needs_pytorch(needed):
            return
        try:
            import PyTorchUtils
        except ImportError as error:
            raise DependencyError(
                "The PyTorch extension is not installed. Install 'PyTorch' from the Extensions Manager, "
                "restart Slicer, then press 'Install dependencies' again."
            ) from error
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=dependencies.TORCH_REQUIREMENT,
            torchvisionVersionRequirement=dependencies.TORCHVISION_REQUIREMENT,
        )
        if torch is None:
            raise DependencyError("PyTorch was not installed. Press 'Install dependencies' again to retry.")

    def installPackages(self, needed=dependencies.REQUIREMENTS):
        """The other packages with pip; sam2 without build isolation, against the installed torch.
        Raises DependencyError when pip replaced torch."""
        torchBefore = dependencies.installed_version("torch")
        packages = dependencies.pip_requirements(needed)
        if packages:
            slicer.util.pip_install(packages)
        for arguments in dependencies.pip_builds_against_torch(needed):
            os.environ.setdefault("SAM2_BUILD_CUDA", "0")  # sam2's optional CUDA extension is not needed
            slicer.util.pip_install(arguments)
        dependencies.check_torch_unchanged(torchBefore)


#
# Self-test (runs inside Slicer: Developer Tools > Self Tests, or the Reload and Test button)
#

class SAM3DSegmentTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_prompt_and_propagate_with_the_weightfree_engine()
        self.setUp()
        self.test_effect_click_propagate_undo_and_cancel()
        self.setUp()
        self.test_effect_is_registered()

    def _weightfree_missing(self, what: str) -> bool:
        """Whether the server's weight-free engine lacks packages (then says so: the test is skipped)."""
        missing = dependencies.missing(dependencies.requirements_for("weightfree"))
        if missing:
            self.delayDisplay(f"{what} skipped: the server's weight-free engine needs "
                              f"{', '.join(r.pip for r in missing)} (SAM 3D module: 'Install dependencies').")
        return bool(missing)

    def _sample_scene(self, shape_kji):
        """The synthetic lesion volume shown in the views and an empty 'lesion' segment on it."""
        from SAM3DSegmentSlicerLogic.volume_nodes import add_volume_node

        from SAM3DSegmentLib.data.sample_volume import make_sample

        sample = make_sample(shape_kji=shape_kji)
        volumeNode = add_volume_node(slicer.mrmlScene, sample.volume, "SAM3D sample")
        volumeNode.CreateDefaultDisplayNodes()
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        lesion = segmentationNode.GetSegmentation().AddEmptySegment("lesion")
        return sample, volumeNode, segmentationNode, lesion

    def test_prompt_and_propagate_with_the_weightfree_engine(self):
        """A synthetic CT with a lesion: one click, propagate on the SAM 3D server (weight-free engine),
        compare the segment with the truth. Slicer itself imports no model package (no torch, no
        scikit-image): they run in the server process. Skipped, saying why, when the server cannot run."""
        import numpy as np
        from SAM3DSegmentSlicerLogic.segment_propagation import SegmentPropagation
        from SAM3DSegmentSlicerLogic.segment_writer import read_segment
        from SAM3DSegmentSlicerLogic.server_process import ServerSpec, shared_server_link
        from SAM3DSegmentSlicerLogic.session_factory import remote_session_factory

        if self._weightfree_missing("Propagation test"):
            return

        self.delayDisplay("Synthetic volume")
        sample, volumeNode, segmentationNode, lesion = self._sample_scene((20, 80, 96))

        self.delayDisplay("Start the SAM 3D server (weight-free engine)")
        spec = ServerSpec(engine="weightfree", device="cpu")
        connection = shared_server_link().wait_connection(spec, timeout=180)

        self.delayDisplay("Click and propagate")
        logic = SegmentPropagation(volumeNode, segmentationNode, remote_session_factory(connection, spec))
        try:
            logic.add_prompt(lesion, logic.point_from_ras(sample.volume.kji_to_ras(sample.click_kji), True, axis=0))
            job = logic.start_propagation(lesion)
            while not job.poll().finished:  # what the effect's timer does
                slicer.app.processEvents()
                time.sleep(0.05)
            update = job.update
            self.assertEqual(update.state, "done", str(update.error))
            segment = read_segment(segmentationNode, lesion, logic.volume)
            dice = 2 * np.count_nonzero(segment & sample.truth) / (segment.sum() + sample.truth.sum())
            self.assertGreater(dice, 0.6)
            self.assertEqual(update.result.engine, "weightfree")
            self.assertEqual(update.report.changed_voxels, int(segment.sum()) - int(segment[sample.click_kji[0]].sum()))
            self.delayDisplay(f"Dice {dice:.2f} with {len(update.result.slices_computed)} slices computed")
        finally:
            logic.close()

    def test_effect_click_propagate_undo_and_cancel(self):
        """The effect as a user drives it, in a Segment Editor widget on the sample volume: a left click
        in the red slice view through the effect's processInteractionEvents (the event position
        computed from the click's RAS with the inverse of the slice node's XYToRAS), the preview once
        the local server is up, Propagate through the effect's button action and its QTimer poll, Dice
        with the truth, Undo (the segment returns to the preview), then a run started and cancelled
        (the segment unchanged). Skipped, saying why, when the server cannot run."""
        import numpy as np
        import vtk
        from SAM3DSegmentSlicerLogic.segment_writer import read_segment
        from SAM3DSegmentSlicerLogic.volume_nodes import volume_from_node

        if self._weightfree_missing("Effect test"):
            return

        self.delayDisplay("Sample volume, segmentation and a Segment Editor with the SAM 3D effect")
        sample, volumeNode, segmentationNode, lesion = self._sample_scene((60, 80, 96))
        volume = volume_from_node(volumeNode)
        settingsNode = SAM3DSegmentLogic().getParameterNode()  # the settings the effect reads
        save_settings(PanelSettings(engine="weightfree", device="cpu"), settingsNode)

        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.setMRMLSegmentEditorNode(editorNode)
        editor.setSegmentationNode(segmentationNode)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(volumeNode)
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(volumeNode)
        editorNode.SetSelectedSegmentID(lesion)
        if editor.effectByName(EFFECT_NAME) is None:
            registerSegmentEditorEffect()
            editor.updateEffectList()
        editor.setActiveEffectByName(EFFECT_NAME)
        effect = editor.activeEffect().self()

        def segment():
            return read_segment(segmentationNode, lesion, volume)

        def waitForEffect(what, timeout=180.0):
            """Let the effect's QTimer poll (server start, job) until nothing is pending."""
            deadline = time.monotonic() + timeout
            while effect._pendingAction is not None or effect.job is not None:
                if time.monotonic() > deadline:
                    self.fail(f"{what}: still waiting after {timeout:.0f} s ({effect.statusLabel.text})")
                slicer.app.processEvents()
                time.sleep(0.05)

        try:
            self.delayDisplay("Left click on the lesion in the red view (through processInteractionEvents)")
            redWidget = slicer.app.layoutManager().sliceWidget("Red")
            sliceNode = redWidget.mrmlSliceNode()
            clickRas = [float(c) for c in sample.volume.kji_to_ras(sample.click_kji)]
            sliceNode.JumpSliceByCentering(*clickRas)
            rasToXy = vtk.vtkMatrix4x4()
            vtk.vtkMatrix4x4.Invert(sliceNode.GetXYToRAS(), rasToXy)
            x, y, _, _ = rasToXy.MultiplyPoint(clickRas + [1.0])
            interactor = redWidget.interactorStyle().GetInteractor()
            interactor.SetEventPosition(int(round(x)), int(round(y)))
            interactor.SetShiftKey(0)
            interactor.SetControlKey(0)
            interactor.SetAltKey(0)
            self.assertTrue(effect.processInteractionEvents(interactor, vtk.vtkCommand.LeftButtonPressEvent, redWidget))
            self.assertTrue(effect.processInteractionEvents(interactor, vtk.vtkCommand.LeftButtonReleaseEvent, redWidget))
            waitForEffect("starting the server and the preview")
            preview = segment()
            self.assertTrue(preview[sample.click_kji], f"no preview at the click ({effect.statusLabel.text})")
            self.assertFalse(np.delete(preview, sample.click_kji[0], axis=0).any())

            self.delayDisplay("Propagate (the effect's action, polled by its timer)")
            effect.onPropagate()
            waitForEffect("propagation")
            result = segment()
            dice = 2 * np.count_nonzero(result & sample.truth) / (result.sum() + sample.truth.sum())
            self.assertGreater(dice, 0.6, effect.statusLabel.text)
            self.delayDisplay(f"Dice {dice:.2f}: {effect.statusLabel.text}")

            self.delayDisplay("Undo: the segment returns to the preview")
            editor.undo()
            self.assertTrue(np.array_equal(segment(), preview))

            self.delayDisplay("Start a run and cancel it: the segment is unchanged")
            # no stop rule: the run goes to the volume's edges, so Cancel reaches it while it runs
            save_settings(PanelSettings(engine="weightfree", device="cpu", min_area=0, min_score=0.0, patience=60),
                          settingsNode)
            effect.onPropagate()
            job = effect.job
            self.assertIsNotNone(job, effect.statusLabel.text)
            effect.onCancel()
            waitForEffect("cancel")
            self.assertEqual(job.update.state, "cancelled", effect.statusLabel.text)
            self.assertTrue(np.array_equal(segment(), preview))
        finally:
            editor.setActiveEffect(None)  # deactivate: stops polling, cancels anything left

    def test_effect_is_registered(self):
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.setMRMLSegmentEditorNode(node)
        if editor.effectByName(EFFECT_NAME) is None:
            registerSegmentEditorEffect()
            editor.updateEffectList()
        self.assertIsNotNone(editor.effectByName(EFFECT_NAME))
