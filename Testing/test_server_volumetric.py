"""``sam3d serve --engine volumetric``: the 3DSAM-adapter engine served.

A real server process on loopback with a small random 3DSAM-adapter saved in the authors' layout
(the SMALL model of test_volumetric_engine.py; TEST-ONLY): one include click and a propagation
give the in-process ``open_session(..., engine="volumetric")`` mask; a box or an exclude click
answers 400 with the library's own message; nnInteractive's routes refuse what the model cannot
take. The job machinery (progress in 4 steps, cancel between them) runs on an in-process core.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")
pytest.importorskip("uvicorn", reason="the server needs uvicorn")

from test_server import Server, raw, wait_for  # noqa: E402
from test_volumetric_engine import ball_volume, small_model  # noqa: E402

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt  # noqa: E402
from SAM3DSegmentLib.data.volume import Volume  # noqa: E402
from SAM3DSegmentLib.data.volume_files import guess_modality  # noqa: E402
from SAM3DSegmentLib.engines.choice import choose_engine, open_session  # noqa: E402
from SAM3DSegmentLib.engines.session import PropagationOptions  # noqa: E402
from SAM3DSegmentLib.errors import InputError, PromptError  # noqa: E402
from SAM3DSegmentLib.models.adapters import save_adapter  # noqa: E402
from SAM3DSegmentLib.models.checkpoint_cache import sha256_of  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import authors_checkpoint_layout  # noqa: E402
from SAM3DSegmentLib.serving import protocol  # noqa: E402
from SAM3DSegmentLib.serving.client import ServerConnection, open_remote_session, read_token  # noqa: E402
from SAM3DSegmentLib.serving.store import ServerCore  # noqa: E402

MODEL = "3dsam_adapter_kits"
CLICK = SlicePrompt(axis=0, index=10, points=(Point(20, 18),))  # inside ball_volume's ball


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory) -> Path:
    """A SMALL random 3DSAM-adapter saved as the authors save theirs (``last.pth.tar``)."""
    path = tmp_path_factory.mktemp("volumetric-served") / "last.pth.tar"
    torch.save(authors_checkpoint_layout(small_model()), path)
    return path


@pytest.fixture(scope="module")
def served(authors_file, tmp_path_factory):
    running = Server(["--engine", "volumetric", "--model", MODEL, "--checkpoint", str(authors_file),
                      "--device", "cpu", "--lease", "10"], tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


def in_process(authors_file: Path, volume: Volume, prompts: list[SlicePrompt]):
    """(preview of the last prompt, propagation) of the engine in this process."""
    session = open_session(choose_engine("volumetric", MODEL, authors_file), volume, 0, device="cpu")
    try:
        preview = None
        for prompt in prompts:
            preview = session.add_prompt(1, prompt)
        return preview, session.propagate(1)
    finally:
        session.close()


def library_message(authors_file: Path, prompt: SlicePrompt) -> str:
    """What the in-process session says when it refuses ``prompt``."""
    session = open_session(choose_engine("volumetric", MODEL, authors_file), ball_volume(), 0, device="cpu")
    try:
        with pytest.raises(PromptError) as refused:
            session.add_prompt(1, prompt)
        return str(refused.value)
    finally:
        session.close()


def test_a_click_and_propagate_on_the_server_equal_in_process(served, authors_file):
    volume = ball_volume()
    expected_preview, expected = in_process(authors_file, volume, [CLICK])
    steps = []
    with open_remote_session(served.url, volume, 0, token_file=served.token_file) as session:
        assert session.engine_name == "volumetric"
        preview = session.add_prompt(1, CLICK)
        result = session.propagate(1, progress=lambda done, total, index: steps.append((done, total)))
    assert np.array_equal(preview.mask, expected_preview.mask)
    assert result.mask.shape == volume.shape and result.mask.any()
    assert np.array_equal(result.mask, expected.mask)
    assert result.engine == "volumetric" and result.scores == pytest.approx(expected.scores)
    assert all(total == 4 for _, total in steps)
    status, info = raw(served.url, "GET", "/v1/info", token=read_token(served.token_file))
    assert status == 200 and info["engine"] == "volumetric" and info["model"] == MODEL


def test_a_box_or_an_exclude_click_answers_400_with_the_librarys_message(served, authors_file):
    token = read_token(served.token_file)
    box = SlicePrompt(axis=0, index=10, box=Box(12, 10, 28, 26))
    exclude = SlicePrompt(axis=0, index=10, points=(Point(20, 18), Point(5, 5, False)))
    connection = ServerConnection(served.url, token)
    sha = connection.upload_volume(ball_volume())
    status, info = raw(served.url, "POST", "/v1/sessions", json.dumps({"volume": sha, "axis": 0}).encode(),
                       token=token, headers={"Content-Type": "application/json"})
    assert status == 201 and info["engine"] == "volumetric"
    for prompt in (box, exclude):
        body = json.dumps({"prompt": protocol.prompt_to_json(prompt)}).encode()
        status, answer = raw(served.url, "POST", f"/v1/sessions/{info['session_id']}/objects/1/prompts", body,
                             token=token, headers={"Content-Type": "application/json"})
        assert status == 400, answer
        assert answer == {"error": "PromptError", "message": library_message(authors_file, prompt)}
    assert "click inside the object" in library_message(authors_file, box)
    raw(served.url, "DELETE", f"/v1/sessions/{info['session_id']}", token=token)
    # the client raises the library's error, as an in-process session would
    with open_remote_session(served.url, ball_volume(), 0, token_file=served.token_file) as session:
        with pytest.raises(PromptError, match="not boxes"):
            session.add_prompt(1, box)
        session.add_prompt(1, CLICK)  # the session goes on


def test_a_session_naming_the_engine_without_a_model_gets_the_servers_model(served):
    connection = ServerConnection(served.url, read_token(served.token_file))
    session = connection.open_session(ball_volume(), 0, engine="volumetric")  # what Slicer's panel sends
    try:
        assert session.info()["engine"] == "volumetric"
    finally:
        session.close()


def test_propagation_jobs_report_four_steps_and_cancel_between_them(authors_file, monkeypatch):
    """The server's job machinery with the volumetric session: cancel after the first step leaves the
    object as it was; the next propagation runs all 4 steps."""
    core = ServerCore(choose_engine("volumetric", MODEL, authors_file), device="cpu")
    core.start()
    try:
        volume = ball_volume()
        sha = core.store_volume("me", volume)["sha256"]
        sid = core.open_session("me", {"volume": sha, "axis": 0}).result(60)["session_id"]
        core.call("me", sid, "add_prompt", 1, CLICK, False).result(60)
        core.call("me", sid, "add_prompt", 1, SlicePrompt(axis=0, index=11, points=(Point(20, 18),)), False).result(60)
        core.call("me", sid, "remove_anchor", 1, 11).result(60)  # the clicks changed: propagate runs the model
        assert core._sessions[sid].cache_key is None and core.pool.used_bytes == 0  # it caches its encoder itself
        run_waiting = core.worker.run_waiting

        def cancel_after_the_first_step() -> None:
            job = core._sessions[sid].job
            if job.status.done >= 1:
                job.cancel.set()
            run_waiting()

        monkeypatch.setattr(core.worker, "run_waiting", cancel_after_the_first_step)
        status = core.start_propagation("me", sid, 1, PropagationOptions())
        wait_for(lambda: status.finished, 60, "the cancelled job")
        assert status.state == "cancelled" and (status.done, status.total) == (1, 4), status
        assert "not changed" in status.message
        assert core.call("me", sid, "mask", 1).result(60) == {"mask": None}
        monkeypatch.setattr(core.worker, "run_waiting", run_waiting)
        status = core.start_propagation("me", sid, 1, PropagationOptions())
        wait_for(lambda: status.finished, 60, "the job")
        assert status.state == "done" and status.done == status.total == 4
        _, expected = in_process(authors_file, volume, [CLICK])
        assert np.array_equal(status.result.mask, expected.mask)
    finally:
        core.stop()


def test_the_servers_adapter_goes_on_the_shared_model_once_and_equals_in_process(authors_file, tmp_path):
    """``sam3d serve --engine volumetric --adapter FILE`` (the core it runs): sessions get the adapter, as
    ``open_session(choose_engine(..., adapter=FILE))`` does; an adapter of another task stops the start."""
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=generator)
             for k, v in small_model().state_dict().items()
             if k.startswith("decoder.") and v.is_floating_point() and v.numel() > 1}
    metadata = {"base_model": MODEL, "family": "sam3d_adapter", "base_sha256": sha256_of(authors_file),
                "dataset": "kits"}
    adapter = save_adapter(tmp_path / "kits_adapter.pt", state, metadata)
    choice = choose_engine("volumetric", MODEL, authors_file, adapter)
    volume = ball_volume()
    session = open_session(choice, volume, 0, device="cpu")
    expected = session.add_prompt(1, CLICK).mask
    session.close()
    assert not np.array_equal(expected, in_process(authors_file, volume, [CLICK])[0].mask)  # the adapter acts
    core = ServerCore(choice, device="cpu")
    core.start()
    try:
        sha = core.store_volume("me", volume)["sha256"]
        masks = []
        for _ in range(2):  # two sessions share the one model with the adapter on it
            info = core.open_session("me", {"volume": sha, "axis": 0}).result(60)
            assert info["adapter"] == "kits_adapter.pt"
            preview = core.call("me", info["session_id"], "add_prompt", 1, CLICK, False).result(60)
            masks.append(protocol.mask_from_json(preview["mask"], "preview"))
        assert all(np.array_equal(mask, expected) for mask in masks)
    finally:
        core.stop()
    lits = save_adapter(tmp_path / "lits_adapter.pt", state, {**metadata, "dataset": "lits"})
    core = ServerCore(choose_engine("volumetric", MODEL, authors_file, lits), device="cpu")
    with pytest.raises(InputError, match="lits intensity handling.*--model 3dsam_adapter_lits"):
        core.start()
    core.stop()


# --- nnInteractive's protocol --------------------------------------------------------------------

def test_nninteractive_takes_include_points_and_refuses_the_rest(served, authors_file):
    httpx = pytest.importorskip("httpx")
    remote = pytest.importorskip("nnInteractive.inference.remote")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # the client honours proxy variables
    volume = ball_volume()
    spacing = volume.spacing_kji
    array = volume.array
    served_volume = Volume(array, np.diag([*spacing[::-1], 1.0]), name="nnInteractive image",
                           modality=guess_modality(array))
    with remote.nnInteractiveRemoteInferenceSession(served.url + "/nninteractive",
                                                    api_key=read_token(served.token_file)) as session:
        assert session.supported_interactions == {"points": True, "bbox2d": False, "bbox3d": False,
                                                  "lasso": False, "scribble": False}
        assert not session.supports_initial_label
        session.set_image(array[None], {"spacing": list(spacing)})
        target = np.zeros(array.shape, dtype=np.uint8)
        session.set_target_buffer(target)
        refusals = {
            "a box": lambda: session.add_bbox_interaction([[10, 11], [12, 28], [10, 26]], include_interaction=True),
            "a negative (exclude) point": lambda: session.add_point_interaction([10, 5, 5], include_interaction=False),
            "a lasso": lambda: session.add_lasso_interaction(_slice_square(array.shape), include_interaction=True),
            "a scribble": lambda: session.add_scribble_interaction(_slice_square(array.shape),
                                                                   include_interaction=True),
        }
        for what, call in refusals.items():
            with pytest.raises(httpx.HTTPStatusError) as refused:
                call()
            detail = refused.value.response.json()["detail"]
            assert refused.value.response.status_code == 400
            assert f"include clicks only: {what} cannot be used" in detail and "positive points" in detail, detail
        assert not target.any()
        session.add_point_interaction([10, 20, 18], include_interaction=True)
        _, expected = in_process(authors_file, served_volume, [CLICK])
        assert expected.mask.any() and np.array_equal(target, expected.mask)


def _slice_square(shape) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[10, 15:25, 12:24] = 1
    return mask
