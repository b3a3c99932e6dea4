"""The volumetric engine (3DSAM-adapter) in the Slicer logic: the panel's engine list and models, the
install plan, the session factory's options, and the refusal of boxes and exclude clicks (with the
library's own messages) before anything reaches the server. The sessions here run in process on a
small random 3DSAM-adapter saved in the authors' layout (test_volumetric_engine.py's SMALL model)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAM3DSegment"))

from SAM3DSegmentSlicerLogic import dependencies  # noqa: E402
from SAM3DSegmentSlicerLogic.engine_choices import (  # noqa: E402
    BOX_REFUSED,
    ENGINE_NAMES,
    EXCLUDE_REFUSED,
    engine_of,
    mode_refusal,
    model_note,
    prompt_refusal,
    volumetric_models,
)
from SAM3DSegmentSlicerLogic.messages import user_message  # noqa: E402
from SAM3DSegmentSlicerLogic.settings import PanelSettings  # noqa: E402
from test_volumetric_engine import VOLUMETRIC_MODELS, small_model  # noqa: E402

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt  # noqa: E402
from SAM3DSegmentLib.engines import choice as choice_module  # noqa: E402
from SAM3DSegmentLib.engines.choice import ENGINES, choose_engine, open_session  # noqa: E402
from SAM3DSegmentLib.errors import CheckpointError, InputError, PromptError  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import authors_checkpoint_layout  # noqa: E402

MODULE_SCRIPT = ROOT / "SAM3DSegment" / "SAM3DSegment.py"
SHAPE = (20, 40, 36)
SPACING_KJI = (3.0, 1.5, 1.5)
BOX = SlicePrompt(axis=0, index=10, box=Box(12, 10, 28, 26))
EXCLUDE = SlicePrompt(axis=0, index=10, points=(Point(20, 18), Point(5, 5, False)))


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("volumetric-slicer") / "last.pth.tar"
    torch.save(authors_checkpoint_layout(small_model()), path)
    return path


def volumetric_settings(authors_file: Path, **changes) -> PanelSettings:
    fields = dict(engine="volumetric", model="3dsam_adapter_kits", checkpoint=str(authors_file), device="cpu",
                  projection="mask")
    return PanelSettings(**{**fields, **changes})


# --- the panel's engines, models and install plan -------------------------------------------------

def test_the_panel_lists_the_librarys_engines_and_the_four_volumetric_models():
    assert ENGINE_NAMES == ENGINES and "volumetric" in ENGINE_NAMES
    assert tuple(volumetric_models()) == VOLUMETRIC_MODELS
    tree = ast.parse(MODULE_SCRIPT.read_text(encoding="utf-8"))
    imported = {alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                and node.module == "SAM3DSegmentSlicerLogic.engine_choices" for alias in node.names}
    assigned = {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                if isinstance(target, ast.Name)}
    assert "ENGINE_NAMES" in imported and "ENGINE_NAMES" not in assigned  # one list, the logic's
    # "auto" with a 3DSAM-adapter model is the volumetric engine, as the library decides
    for model in VOLUMETRIC_MODELS:
        assert engine_of("auto", model) == "volumetric"
    assert engine_of("auto", "litemedsam") == "auto" and engine_of("sam2") == "sam2"


def test_the_panel_says_which_models_the_volumetric_engine_needs():
    names = ", ".join(VOLUMETRIC_MODELS)
    assert names in model_note("volumetric", "") and "last.pth.tar" in model_note("volumetric", "")
    assert "3DSAM-adapter models only" in model_note("volumetric", "litemedsam")
    assert "choose the volumetric engine" in model_note("slicewise", "3dsam_adapter_lits")
    assert model_note("volumetric", "3dsam_adapter_colon") is None and model_note("auto", "3dsam_adapter_kits") is None
    assert model_note("slicewise", "litemedsam") is None and model_note("weightfree", "") is None


def test_the_volumetric_engine_needs_torch_and_segment_anything_only():
    server = {r.module for r in dependencies.SERVER}
    for engine, model in (("volumetric", "3dsam_adapter_kits"), ("auto", "3dsam_adapter_pancreas"),
                          ("volumetric", "")):
        modules = {r.module for r in dependencies.requirements_for(engine, model)}
        assert modules == server | {"torch", "torchvision", "segment_anything"}, (engine, model)
    # that is what the model imports: torch and segment_anything (whose package imports torchvision)
    source = (ROOT / "SAM3DSegmentLib" / "models" / "sam3d_adapter.py").read_text(encoding="utf-8")
    top = {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
           if isinstance(node, ast.ImportFrom) and node.level == 0}  # not our own (relative) modules
    top |= {alias.name.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
            for alias in node.names}
    assert top - set(sys.stdlib_module_names) - {"__future__"} == {"torch", "segment_anything"}


# --- the session factory ----------------------------------------------------------------------------

def test_the_session_factory_passes_no_slice_options_to_the_volumetric_engine(authors_file, monkeypatch):
    from SAM3DSegmentSlicerLogic.session_factory import remote_session_factory, session_factory_for

    for settings in (volumetric_settings(authors_file), volumetric_settings(authors_file, engine="auto")):
        assert settings.engine_options() == {}
    assert PanelSettings(engine="slicewise", projection="mask").engine_options() == {"projection": "mask"}
    assert PanelSettings(engine="auto", model="litemedsam", projection="box").engine_options() == {"projection": "box"}
    seen = []
    real_open_session = choice_module.open_session
    monkeypatch.setattr(choice_module, "open_session",
                        lambda choice, volume, axis, **kwargs: seen.append(kwargs) or real_open_session(
                            choice, volume, axis, **kwargs))
    factory = session_factory_for(volumetric_settings(authors_file, engine="auto"))
    assert factory.engine == "volumetric"
    session = factory(ball_volume(), 0)
    try:
        assert session.engine_name == "volumetric" and seen == [{"device": "cpu"}]
    finally:
        session.close()
    # the library refuses what it does not know for this engine: the factory never sends it
    with pytest.raises(InputError, match="Unknown option"):
        open_session(choose_engine("volumetric", "3dsam_adapter_kits", authors_file), ball_volume(), 0,
                     device="cpu", raw_intensities=True)
    from SAM3DSegmentSlicerLogic.server_process import ServerSpec

    assert remote_session_factory(None, ServerSpec(engine="auto", model="3dsam_adapter_kits")).engine == "volumetric"
    assert remote_session_factory(None, ServerSpec(engine="auto")).engine == "auto"  # known once the session opens


# --- refusals ---------------------------------------------------------------------------------------

def test_the_refusals_are_the_librarys_messages_and_read_well_in_the_panel(authors_file):
    session = open_session(choose_engine("volumetric", "3dsam_adapter_kits", authors_file), ball_volume(), 0,
                           device="cpu")
    try:
        for prompt, expected in ((BOX, BOX_REFUSED), (EXCLUDE, EXCLUDE_REFUSED)):
            with pytest.raises(PromptError) as refused:
                session.add_prompt(1, prompt)
            assert str(refused.value) == expected
            assert prompt_refusal("volumetric", prompt) == expected
            assert prompt_refusal("slicewise", prompt) is None and prompt_refusal("auto", prompt) is None
    finally:
        session.close()
    assert prompt_refusal("volumetric", SlicePrompt(axis=0, index=10, points=(Point(20, 18),))) is None
    assert mode_refusal("volumetric", "box") == BOX_REFUSED and mode_refusal("volumetric", "exclude") == EXCLUDE_REFUSED
    assert mode_refusal("volumetric", "include") is None and mode_refusal("volumetric", "lasso") is None
    assert mode_refusal("sam2", "box") is None
    assert "click inside the object" in user_message(PromptError(BOX_REFUSED))
    text = user_message(PromptError(EXCLUDE_REFUSED))
    assert "add include clicks" in text and "lasso or any Segment Editor tool" in text and "--" not in text


def test_a_manual_checkpoint_is_not_sent_to_the_download_button():
    with pytest.raises(CheckpointError) as missing:
        choose_engine("volumetric", "3dsam_adapter_kits")
    text = user_message(missing.value)
    assert "last.pth.tar" in text and "Download model" not in text and "--" not in text
    assert "checkpoint file with the model 3dsam_adapter_kits in the SAM 3D Segment module" in text
    with pytest.raises(InputError) as no_model:
        choose_engine("volumetric")
    text = user_message(no_model.value)
    assert "--" not in text and "choose it in the SAM 3D Segment module" in text


# --- on real MRML ------------------------------------------------------------------------------------

@pytest.fixture
def mrml_case():
    slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")
    from SAM3DSegmentSlicerLogic.volume_nodes import numpy_to_matrix

    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    volume_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(volume_node, ball_volume().array)
    volume_node.SetIJKToRASMatrix(numpy_to_matrix(np.diag([SPACING_KJI[2], SPACING_KJI[1], SPACING_KJI[0], 1.0])))
    volume_node.SetAttribute("DICOM.Modality", "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    ids = [segmentation.GetSegmentation().AddEmptySegment(n, n) for n in ("tumour", "kidney")]
    return scene, logic, volume_node, segmentation, ids


def test_boxes_and_exclude_clicks_are_refused_and_include_clicks_segment_in_3d(authors_file, mrml_case):
    """Through the panel's session factory: a box or exclude click is refused with the library's message
    and changes nothing (not even the axis); other segments add no exclude points; one include click
    and Propagate write the in-process 3D mask."""
    from SAM3DSegmentSlicerLogic.segment_propagation import SegmentPropagation
    from SAM3DSegmentSlicerLogic.segment_writer import read_segment, write_segment
    from SAM3DSegmentSlicerLogic.session_factory import session_factory_for

    _, _, volume_node, segmentation, (tumour, kidney) = mrml_case
    logic = SegmentPropagation(volume_node, segmentation, session_factory_for(volumetric_settings(authors_file)),
                               exclude_other_segments=True)
    volume = logic.volume
    neighbour = np.zeros(SHAPE, bool)
    neighbour[8:13, 18:23, 26:31] = True  # next to the click: would be an exclude point for the other engines
    write_segment(segmentation, kidney, neighbour, volume)
    assert logic.engine == "volumetric"
    click = logic.point_from_ras(volume.kji_to_ras((10, 20, 18)), True, axis=0)
    logic.add_prompt(tumour, click)
    assert logic.last_exclude_points == [] and all(p.positive for p in logic.anchors(tumour)[10].points)
    for make in (lambda: logic.box_from_ras(volume.kji_to_ras((5, 20, 10)), volume.kji_to_ras((15, 20, 26)), axis=1),
                 lambda: logic.point_from_ras(volume.kji_to_ras((10, 5, 5)), False, axis=2)):
        with pytest.raises(PromptError) as refused:
            make()
        assert str(refused.value) in (BOX_REFUSED, EXCLUDE_REFUSED)
        assert logic.axis == 0 and sorted(logic.anchors(tumour)) == [10]  # nothing dropped, nothing added
    with pytest.raises(PromptError, match="not boxes"):
        logic.add_prompt(tumour, BOX)
    result, _ = logic.propagate(tumour)
    expected = open_session(choose_engine("volumetric", "3dsam_adapter_kits", authors_file), volume, 0, device="cpu")
    expected.add_prompt(1, SlicePrompt(axis=0, index=10, points=click.points))
    mask = expected.propagate(1).mask
    expected.close()
    segment = read_segment(segmentation, tumour, volume)
    assert result.engine == "volumetric" and mask.any() and np.array_equal(result.mask, mask)
    assert np.array_equal(segment & ~neighbour, mask & ~neighbour)  # the neighbour's voxels: the overwrite rule


def ball_volume():
    """test_volumetric_engine's ball, on this file's grid."""
    from test_volumetric_engine import ball_volume as ball

    return ball(SHAPE, SPACING_KJI)
