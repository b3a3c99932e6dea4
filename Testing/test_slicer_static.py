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


def test_effect_handles_clicks_right_clicks_and_shift_drag():
    source = ast.unparse(class_methods(EFFECT_SCRIPT, "SegmentEditorEffect")["processInteractionEvents"])
    for needed in ("LeftButtonPressEvent", "LeftButtonReleaseEvent", "RightButtonReleaseEvent", "MouseMoveEvent",
                   "GetShiftKey", "GetControlKey", "box_from_ras", "point_from_ras", "qMRMLSliceWidget"):
        assert needed in source, needed


def test_effect_and_widget_touch_mrml_only_through_main_thread_callbacks():
    """Jobs given to the worker call only the session-side methods of the logic."""
    source = EFFECT_SCRIPT.read_text(encoding="utf-8")
    jobs = re.findall(r"lambda progress, cancelled: ([^\n]+)", source)
    assert jobs and all(re.search(r"(preview_in_session|propagate_in_session|clear_prompts|close)\(", j) for j in jobs)
    for writer in ("write_preview", "write_result", "edited_slices"):
        assert not any(writer in j for j in jobs)


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
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS", "EXTENSION_CONTRIBUTORS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text and 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert "add_subdirectory(SAM3DSegment)" in text
    for url in re.findall(r"main/(Resources/\S+\.png)", text):
        assert (ROOT / url).is_file(), url
    s4ext = dict(
        line.split(" ", 1) for line in (ROOT / "SAM3DSegment.s4ext").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )
    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "category",
                "iconurl", "description", "screenshoturls", "enabled"):
        assert s4ext.get(key), key
    assert s4ext["depends"] == "PyTorch" and s4ext["category"] == "Segmentation"


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
