"""Static checks of the Qt layer of the Slicer extension (Slicer itself cannot run here):
.ui names, the effect's methods Slicer calls, compilation, imports, CMake and Extension Index files."""

from __future__ import annotations

import ast
import importlib
import py_compile
import re
import struct
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SAM3DSegment"
MODULE_SCRIPT = MODULE / "SAM3DSegment.py"
EFFECT_SCRIPT = MODULE / "SegmentEditorSAM3DLib" / "SegmentEditorEffect.py"
UI_FILE = MODULE / "Resources" / "UI" / "SAM3DSegment.ui"

# Methods qSlicerSegmentEditorScriptedEffect calls on the Python effect (those it requires
# and those a prompt-driven effect must override to work), with their positional arguments.
EFFECT_METHODS = {
    "clone": 0, "icon": 0, "helpText": 0, "setupOptionsFrame": 0, "createCursor": 1,
    "activate": 0, "deactivate": 0, "setMRMLDefaults": 0, "updateGUIFromMRML": 0, "updateMRMLFromGUI": 0,
    "processInteractionEvents": 3, "sourceVolumeNodeChanged": 0, "referenceGeometryChanged": 0, "layoutChanged": 0,
    "cleanup": 0,
}


def module_python_files() -> list[Path]:
    return sorted(p for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)


def class_methods(path: Path, class_name: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
    raise AssertionError(f"class {class_name} not found in {path.name}")


def ui_widget_names() -> set[str]:
    return {w.get("name") for w in ElementTree.parse(UI_FILE).iter("widget")}


def test_every_module_file_compiles(tmp_path):
    files = module_python_files()
    assert len(files) >= 14
    for path in files:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)


def test_every_ui_name_used_by_the_widget_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SCRIPT.read_text(encoding="utf-8")))
    assert len(used) >= 15
    missing = used - ui_widget_names()
    assert not missing, f"self.ui names missing from {UI_FILE.name}: {sorted(missing)}"


def test_ui_file_is_valid_and_declares_its_custom_widgets():
    tree = ElementTree.parse(UI_FILE)
    classes = {w.get("class") for w in tree.iter("widget")}
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    custom = {c for c in classes if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"undeclared custom widgets: {custom - declared}"
    names = [w.get("name") for w in tree.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_effect_implements_the_methods_slicer_calls():
    methods = class_methods(EFFECT_SCRIPT, "SegmentEditorEffect")
    for name, n_args in EFFECT_METHODS.items():
        assert name in methods, f"SegmentEditorEffect.{name} is missing"
        args = methods[name].args.args
        assert len(args) - 1 == n_args, f"{name} takes {len(args) - 1} arguments, Slicer passes {n_args}"
    init = ast.unparse(methods["__init__"])
    assert "scriptedEffect.name = EFFECT_NAME" in init and "AbstractScriptedSegmentEditorEffect.__init__" in init
    tree = ast.parse(EFFECT_SCRIPT.read_text(encoding="utf-8"))
    bases = [ast.unparse(b) for n in tree.body if isinstance(n, ast.ClassDef) for b in n.bases]
    assert "AbstractScriptedSegmentEditorEffect" in bases


def _method_source(name: str, path: Path = EFFECT_SCRIPT, class_name: str = "SegmentEditorEffect") -> str:
    return ast.unparse(class_methods(path, class_name)[name])


def _branches(method: str) -> dict[str, str]:
    """The effect's processInteractionEvents: the source of each ``if eventId == vtk.vtkCommand.X`` branch."""
    found = {}
    for node in ast.walk(class_methods(EFFECT_SCRIPT, "SegmentEditorEffect")[method]):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and ast.unparse(node.test.left) == "eventId":
            event = ast.unparse(node.test.comparators[0]).rsplit(".", 1)[-1]
            found[event] = "\n".join(ast.unparse(n) for n in node.body)
    return found


def test_effect_handles_clicks_right_clicks_shift_drag_double_clicks_and_keys():
    source = _method_source("processInteractionEvents")
    for needed in ("LeftButtonPressEvent", "LeftButtonReleaseEvent", "RightButtonReleaseEvent", "MouseMoveEvent",
                   "GetShiftKey", "GetControlKey", "box_from_ras", "point_from_ras", "qMRMLSliceWidget"):
        assert needed in source, needed
    branches = _branches("processInteractionEvents")
    assert branches["LeftButtonDoubleClickEvent"].strip() == "return True"  # consumed (issue 13, 10)
    assert "_onKey" in branches["KeyPressEvent"]
    right_press = branches["RightButtonPressEvent"]
    # Slicer's own right-button actions with modifiers pass through; a plain right press is a prompt
    # or a right-drag zoom done as Slicer does it (never a half-consumed press/release pair)
    assert right_press.index("return False") < right_press.index("return True")
    assert "GetFieldOfView" in right_press
    right_release = branches["RightButtonReleaseEvent"]
    assert "if self._rightPress is None:\n    return False" in right_release and "not zooming" in right_release
    drag = _method_source("_rightDrag")
    assert "zoomed_field_of_view" in drag and "SetFieldOfView" in drag


def test_no_python_threads_in_slicer_and_the_model_runs_in_the_server():
    """Issue 12 item 4 / 13: no thread in Slicer's Python; jobs are polled by a QTimer."""
    for path in module_python_files():
        text = path.read_text(encoding="utf-8")
        assert "import threading" not in text and "Thread(" not in text, path.name
        for heavy in ("import torch", "import skimage", "from skimage", "import sam2", "import segment_anything"):
            assert heavy not in text, f"{path.name}: {heavy}"
    assert not (MODULE / "SAM3DSegmentSlicerLogic" / "worker.py").exists()
    init = _method_source("__init__")
    assert "self.pollTimer.connect('timeout()', self._poll)" in init
    poll = _method_source("_poll")
    assert "self.job.poll()" in poll and "self._connection()" in poll and "self.pollTimer.stop()" in poll
    assert "start_propagation" in _method_source("_propagateNow")
    assert "self.job.cancel()" in _method_source("onCancel")
    assert "shared_server_link" in _method_source("_connection")
    module = MODULE_SCRIPT.read_text(encoding="utf-8")
    assert "models\", \"download\"" in module and "pollDownload" in module  # the download is a process too


def test_deactivate_and_cleanup_stop_polling():
    """Issue 13 (11)."""
    assert "self._stopPolling(cancelJob=True)" in _method_source("deactivate")
    cleanup = _method_source("cleanup")
    assert "self._stopPolling(cancelJob=True)" in cleanup and "self.pollTimer.disconnect('timeout()', self._poll)" in cleanup
    stop = _method_source("_stopPolling")
    assert "self.pollTimer.stop()" in stop and "abandon()" in stop and "self._pendingAction = None" in stop
    widget_cleanup = _method_source("cleanup", MODULE_SCRIPT, "SAM3DSegmentWidget")
    assert "self._downloadTimer.stop()" in widget_cleanup


def test_layout_changes_remove_rubber_band_actors_before_forgetting_them():
    source = _method_source("layoutChanged")
    assert source.index("self._removeRubberBand(viewWidget)") < source.index("self._rubberBands = {}")
    assert "removeActor2D" in _method_source("_removeRubberBand")
    # the lasso / scribble line too, on layout changes, deactivate and cleanup
    assert "self._forgetStrokeLines()" in source and "self._stroke = None" in source
    forget = _method_source("_forgetStrokeLines")
    assert forget.index("self._removeStrokeLine(viewWidget)") < forget.index("self._strokeLines = {}")
    assert "removeActor2D" in _method_source("_removeStrokeLine")
    assert "self._removeStrokeLine(viewWidget)" in _method_source("deactivate")
    assert "self._forgetStrokeLines()" in _method_source("cleanup")


def test_lasso_and_scribble_strokes():
    """Lasso / scribble mode: a left-drag draws a polyline actor (like Slicer's Draw effect), removed on
    release; the release becomes a prompt through the Qt-free geometry (drawn_prompts.py)."""
    branches = _branches("processInteractionEvents")
    press = branches["LeftButtonPressEvent"]
    assert press.index("if shift") < press.index("self._startStroke(viewWidget, xy, positive=not control)")
    assert "('lasso', 'scribble')" in press
    assert "self._extendStroke(self._stroke, viewWidget, xy)" in branches["MouseMoveEvent"]
    release = branches["LeftButtonReleaseEvent"]
    assert release.index("self._removeStrokeLine(stroke['view'])") < release.index("self._finishStroke(viewWidget, stroke)")
    finish = _method_source("_finishStroke")
    assert "lasso_from_ras" in finish and "replace=True" in finish and "scribble_from_ras" in finish
    assert "point_from_ras" in finish  # a stroke that never left the click tolerance is a click
    line = _method_source("_updateStrokeLine")
    assert "vtkPolyData" in line and "vtkActor2D" in line and "addActor2D" in line and "vtkPolyDataMapper2D" in line
    assert "self._setClickMode(action)" in _method_source("_onKey")
    assert "CLICK_MODES" in _method_source("setupOptionsFrame")
    help_text = _method_source("helpText")
    for words in ("Lasso", "Scribble", "Ctrl+drag", "key <b>l</b>", "key <b>s</b>"):
        assert words in help_text, words
    # the geometry is Qt-free and MRML-free: it runs (and is tested) without Slicer
    geometry = (MODULE / "SAM3DSegmentSlicerLogic" / "drawn_prompts.py").read_text(encoding="utf-8")
    for forbidden in ("import slicer", "import qt", "import vtk", "import ctk"):
        assert forbidden not in geometry


def test_edits_confirm_a_hidden_segment_first_and_markups_are_ours():
    for method in ("addPrompt", "onPropagate"):
        assert "confirmCurrentSegmentVisible()" in _method_source(method), method
    text = EFFECT_SCRIPT.read_text(encoding="utf-8")
    assert "AddNewNodeByClass" not in text  # markups nodes only through markers.add_private_markups_node
    assert "prompt_markups_node" in _method_source("updateMarkers")


def test_no_wait_cursor_over_the_pytorch_confirmation_dialog():
    """Issue 13 (12): installTorch may show a dialog: it runs outside ``with slicer.util.WaitCursor()``."""
    method = class_methods(MODULE_SCRIPT, "SAM3DSegmentWidget")["onInstall"]
    calls_in_wait_cursor = [
        ast.unparse(call) for node in ast.walk(method) if isinstance(node, ast.With)
        and "WaitCursor" in ast.unparse(node.items[0].context_expr)
        for call in ast.walk(node) if isinstance(call, ast.Call)
    ]
    assert calls_in_wait_cursor and not any("installTorch" in c or "confirm" in c for c in calls_in_wait_cursor)
    assert any("installPackages" in c for c in calls_in_wait_cursor)
    logic_torch = _method_source("installTorch", MODULE_SCRIPT, "SAM3DSegmentLogic")
    assert "torchVersionRequirement=dependencies.TORCH_REQUIREMENT" in logic_torch
    packages = _method_source("installPackages", MODULE_SCRIPT, "SAM3DSegmentLogic")
    assert "pip_builds_against_torch" in packages and "check_torch_unchanged" in packages


def test_user_facing_strings_in_slicer_advise_the_panel_not_the_command_line():
    for path in (MODULE_SCRIPT, EFFECT_SCRIPT):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and " " in node.value
                    and id(node) not in docstrings):
                assert not re.search(r"(^|\s)--[a-z]|`sam3d ", node.value), f"{path.name}: {node.value!r}"


def test_module_classes_self_test_and_effect_registration():
    tree = ast.parse(MODULE_SCRIPT.read_text(encoding="utf-8"))
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["SAM3DSegment"]
    assert "ScriptedLoadableModuleWidget" in classes["SAM3DSegmentWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["SAM3DSegmentLogic"]
    assert "ScriptedLoadableModuleTest" in classes["SAM3DSegmentTest"]
    init = ast.unparse(class_methods(MODULE_SCRIPT, "SAM3DSegment")["__init__"])
    assert 'startupCompleted()' in init and "registerSegmentEditorEffect" in init
    test_methods = class_methods(MODULE_SCRIPT, "SAM3DSegmentTest")
    assert "runTest" in test_methods and any(name.startswith("test_") for name in test_methods)


def test_nothing_is_installed_or_heavy_imported_at_import_time():
    for path in (MODULE_SCRIPT, EFFECT_SCRIPT):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        text = "\n".join(ast.unparse(n) for n in top_level)
        for forbidden in ("pip_install", "installTorch", "import torch", "import sam2", "segment_anything"):
            assert forbidden not in text, f"{path.name} does {forbidden!r} at import time"
    module_text = MODULE_SCRIPT.read_text(encoding="utf-8")
    assert "slicer.util.pip_install" in module_text and "PyTorchUtils" in module_text


def test_the_self_test_needs_no_model_package_in_slicer():
    """Issue 13 (8): the self-test propagates on the server; Slicer's Python imports no scikit-image."""
    source = _method_source("test_prompt_and_propagate_with_the_weightfree_engine", MODULE_SCRIPT, "SAM3DSegmentTest")
    assert "shared_server_link" in source and "remote_session_factory" in source and "job.poll()" in source
    assert "skimage" not in source and "session_factory_for" not in source
    # skipped, saying why, when the server cannot run
    check = _method_source("_weightfree_missing", MODULE_SCRIPT, "SAM3DSegmentTest")
    assert "requirements_for('weightfree')" in check and "delayDisplay" in check
    assert "if self._weightfree_missing(" in source
    effect_test = _method_source("test_effect_click_propagate_undo_and_cancel", MODULE_SCRIPT, "SAM3DSegmentTest")
    assert "skimage" not in effect_test and "session_factory_for" not in effect_test
    assert "if self._weightfree_missing(" in effect_test


def test_the_self_test_drives_the_effect_through_its_interaction_events():
    """Issue 13 (remaining, 3): click through processInteractionEvents at the event position of the
    click's RAS, propagate with the effect's action and timer poll, Dice, undo, cancel."""
    source = _method_source("test_effect_click_propagate_undo_and_cancel", MODULE_SCRIPT, "SAM3DSegmentTest")
    for needed in ("setActiveEffectByName(EFFECT_NAME)", ".self()", "GetXYToRAS()", "vtkMatrix4x4.Invert",
                   "SetEventPosition", "interactorStyle().GetInteractor()",
                   "effect.processInteractionEvents(interactor, vtk.vtkCommand.LeftButtonPressEvent, redWidget)",
                   "effect.processInteractionEvents(interactor, vtk.vtkCommand.LeftButtonReleaseEvent, redWidget)",
                   "effect.onPropagate()", "slicer.app.processEvents()", "dice", "editor.undo()",
                   "effect.onCancel()", "'cancelled'", "editor.setActiveEffect(None)"):
        assert needed in source, needed
    # the click comes before propagate, propagate before undo, undo before the cancelled run
    order = [source.index(s) for s in ("LeftButtonPressEvent", "effect.onPropagate()", "editor.undo()", "effect.onCancel()")]
    assert order == sorted(order)
    run = _method_source("runTest", MODULE_SCRIPT, "SAM3DSegmentTest")
    for name in ("test_prompt_and_propagate_with_the_weightfree_engine", "test_effect_click_propagate_undo_and_cancel",
                 "test_effect_is_registered"):
        assert f"self.{name}()" in run, name


@pytest.mark.parametrize("path", [MODULE_SCRIPT, EFFECT_SCRIPT], ids=lambda p: p.name)
def test_imported_names_from_our_packages_exist(path):
    sys.path.insert(0, str(MODULE))
    try:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("SAM3DSegmentSlicerLogic", "SAM3DSegmentLib")):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                        f"{path.name}: {node.module} has no {alias.name}"
                    )
    finally:
        sys.path.remove(str(MODULE))


def _cmake_list(text: str, variable: str) -> list[str]:
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "SAM3DSegment") for line in block.splitlines() if line.strip()]


def test_module_cmake_lists_every_file_that_exists():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = {str(p.relative_to(MODULE)) for p in module_python_files() if p.parent.name != "Testing"}
    assert set(scripts) == on_disk, f"not in CMake: {on_disk - set(scripts)}; missing on disk: {set(scripts) - on_disk}"
    resource_files = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*") if p.suffix in (".png", ".ui")}
    assert set(resources) == resource_files
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_the_library_ships_with_the_module():
    """Slicer imports SAM3DSegmentLib from the module's directory: CMake installs the package and its configs."""
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "${LIBRARY_SOURCE_DIR}/SAM3DSegmentLib/*.py" in text and "SAM3DSegmentLib/models/configs/*.yaml" in text
    assert (MODULE / ".." / "SAM3DSegmentLib" / "__init__.py").resolve().is_file()
    assert any((ROOT / "SAM3DSegmentLib" / "models" / "configs").glob("*.yaml"))
    assert "SOURCE_DIR ${LIBRARY_SOURCE_DIR}" in text and "NO_INSTALL_SUBDIR" in text


def test_extension_cmake_and_index_description():
    """Issue 13 (5)-(7): no superbuild settings, the Extensions Index's JSON entry, a LICENSE."""
    import json

    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "SUPERBUILD" not in text and "EXTENSION_BUILD_SUBDIRECTORY" not in text and "inner" not in text
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS", "EXTENSION_CONTRIBUTORS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text and 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert "add_subdirectory(SAM3DSegment)" in text
    for url in re.findall(r"main/(Resources/\S+\.png)", text):
        assert (ROOT / url).is_file(), url
    assert not (ROOT / "SAM3DSegment.s4ext").exists()
    entry = json.loads((ROOT / "SAM3DSegment.json").read_text(encoding="utf-8"))
    # the keys of Slicer's schema (Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: additionalProperties false)
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and entry["build_subdirectory"] == "."
    assert entry["category"] == "Segmentation" and entry["scm_url"].startswith("https://github.com/")
    assert entry["scm_url"].removesuffix(".git") == re.search(r'EXTENSION_HOMEPAGE "([^"]+)"', text).group(1)
    assert 1 <= entry["tier"] <= 5


def test_license_is_the_apache_2_text_and_matches_the_package_metadata():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    assert len(text) > 10000  # the full text, not a notice
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license = \{ text = "Apache-2.0" \}', pyproject, re.M)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icons_are_real_pngs():
    assert _png_size(ROOT / "Resources" / "SAM3DSegment.png") == (128, 128)
    assert _png_size(MODULE / "Resources" / "Icons" / "SAM3DSegment.png") == (128, 128)
    assert _png_size(MODULE / "SegmentEditorSAM3DLib" / "SegmentEditorEffect.png") == (21, 21)
    width, height = _png_size(ROOT / "Resources" / "Screenshots" / "weightfree_sample.png")
    assert width > 300 and height > 200


def test_the_effect_and_self_test_never_open_in_process_sessions():
    for path in (MODULE_SCRIPT, EFFECT_SCRIPT):
        assert "session_factory_for" not in path.read_text(encoding="utf-8"), path.name


def test_every_panel_setting_is_read_and_written_by_the_panel_and_exclusion_reaches_the_logic():
    """Each PanelSettings field goes GUI -> parameter node and back (a forgotten field would reset to its
    default); "Other segments are exclude prompts" is in the panel, the effect's options and the logic."""
    from dataclasses import fields

    sys.path.insert(0, str(MODULE))
    from SAM3DSegmentSlicerLogic.settings import PanelSettings

    to_node = _method_source("updateParameterNodeFromGUI", MODULE_SCRIPT, "SAM3DSegmentWidget")
    to_gui = _method_source("updateGUIFromParameterNode", MODULE_SCRIPT, "SAM3DSegmentWidget")
    for f in fields(PanelSettings):
        assert f"{f.name}=" in to_node, f"{f.name} is not saved from the panel"
        assert f"settings.{f.name}" in to_gui, f"{f.name} is not shown in the panel"
    assert "excludeOtherSegmentsCheckBox" in ui_widget_names()
    assert "exclude_other_segments=lambda: self._moduleSettings().exclude_other_segments" in _method_source("_ensurePropagation")
    assert "onExcludeOtherSegmentsToggled" in _method_source("setupOptionsFrame")
    assert "excludeOtherSegmentsCheckBox.checked = settings.exclude_other_segments" in _method_source("updateGUIFromMRML")
