"""``sam3d serve`` on loopback: real server processes, real HTTP, the torch-free client.

The weight-free engine runs on small synthetic volumes; one test runs LiteMedSAM (real weights)
to check that remote results equal in-process ones and that features are reused.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import pytest

from SAM3DSegmentLib.commands.cli import main
from SAM3DSegmentLib.data.prompts import Box, SlicePrompt, prompt_from_voxels
from SAM3DSegmentLib.data.sample_volume import make_sample
from SAM3DSegmentLib.data.volume import Volume
from SAM3DSegmentLib.data.volume_files import read_label_map, read_volume
from SAM3DSegmentLib.engines.choice import choose_engine, open_session
from SAM3DSegmentLib.engines.feature_cache import CachePool, FeatureCache
from SAM3DSegmentLib.engines.session import PropagationOptions, PropagationResult, SliceMask
from SAM3DSegmentLib.errors import InputError, PromptError, PropagationCancelled, ServerError
from SAM3DSegmentLib.serving import protocol
from SAM3DSegmentLib.serving.client import ServerConnection, open_remote_session
from SAM3DSegmentLib.serving.store import Refused, ServerCore, ServerLimits
from SAM3DSegmentLib.serving.worker import ModelWorker

TOKEN_A = "token-a-" + "a" * 32
TOKEN_B = "token-b-" + "b" * 32
ROOT = Path(__file__).resolve().parents[1]


# --- helpers -----------------------------------------------------------------------------------

class Server:
    """A ``sam3d serve`` process; ``url`` and ``token_file`` from the lines it prints."""

    def __init__(self, args: list[str], env_dir: Path):
        env = dict(os.environ, SAM3D_CACHE_DIR=str(env_dir))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "SAM3DSegmentLib.commands.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=(env_dir / "server.log").open("w"), text=True, cwd=ROOT, env=env,
        )
        self.log = env_dir / "server.log"
        values = {}
        while "SAM3D_SERVER_URL" not in values:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the server ended: {self.log.read_text()}")
            key, _, value = line.strip().partition("=")
            values[key] = value
        self.url, self.token_file = values["SAM3D_SERVER_URL"], values["SAM3D_TOKEN_FILE"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        self.process.stdout.close()
        if self.process.returncode != 0 and Path(self.token_file).parent.name.startswith("sam3d-serve-"):  # a killed server's private folder
            shutil.rmtree(Path(self.token_file).parent, ignore_errors=True)


def raw(url: str, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN_A,
        headers: dict | None = None) -> tuple[int, dict]:
    """One plain HTTP request; (status, JSON answer)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    answer = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, answer


def tube_volume(slices: int = 300, size: int = 128) -> Volume:
    """A bright tube through every slice: the weight-free engine needs a few seconds for it."""
    rng = np.random.default_rng(1)
    array = rng.normal(-100, 15, (slices, size, size))
    rows, cols = np.mgrid[:size, :size]
    array[:, (rows - size / 2) ** 2 + (cols - size / 2) ** 2 < (size / 4) ** 2] += 150
    return Volume(array.astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), modality="CT")


def tube_prompt(volume: Volume) -> SlicePrompt:
    k, j, i = (s // 2 for s in volume.shape)
    return prompt_from_voxels(0, [(k, j, i)])


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def in_process(volume: Volume, prompt: SlicePrompt, engine: str = "weightfree", model: str | None = None,
               options: PropagationOptions | None = None) -> PropagationResult:
    session = open_session(choose_engine(engine, model), volume, 0, device="cpu")
    session.add_prompt(1, prompt)
    result = session.propagate(1, options)
    session.close()
    return result


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A weight-free server accepting two tokens, with a short lease."""
    folder = tmp_path_factory.mktemp("server")
    token_file = folder / "tokens"
    token_file.write_text(f"# two users\n{TOKEN_A}\n{TOKEN_B}\n")
    token_file.chmod(0o600)
    running = Server(["--engine", "weightfree", "--token-file", str(token_file), "--lease", "2",
                      "--max-volume-mb", "12"], folder)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sample():
    return make_sample((32, 64, 64))


# --- without a server ----------------------------------------------------------------------------

def test_the_client_imports_no_torch():
    code = "import sys, SAM3DSegmentLib.serving.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_wire_format_round_trips_and_rejects_malformed_input(sample):
    volume = sample.volume
    sha, decoded = protocol.decode_volume(protocol.encode_volume(volume), 10**9)
    assert sha == protocol.volume_sha256(volume)
    assert np.array_equal(decoded.array, volume.array) and decoded.array.dtype == volume.array.dtype
    assert np.array_equal(decoded.ijk_to_ras, volume.ijk_to_ras) and decoded.modality == "CT"

    mask = np.random.default_rng(0).random((7, 13)) > 0.5
    assert np.array_equal(protocol.mask_from_json(protocol.mask_to_json(mask)), mask)
    prompt = SlicePrompt(0, 3, points=(), box=Box(1, 2, 5, 9), mask=mask)
    back = protocol.prompt_from_json(protocol.prompt_to_json(prompt))
    assert (back.axis, back.index, back.box) == (0, 3, prompt.box) and np.array_equal(back.mask, mask)
    options = PropagationOptions(direction="forward", slice_range=(2, 9))
    assert protocol.options_from_json(protocol.options_to_json(options)) == options

    header, _, payload = protocol.encode_volume(volume).partition(b"\n")
    with pytest.raises(InputError, match="dtype must be a numeric"):
        protocol.decode_volume(header.replace(b'"<i2"', b'"O"') + b"\n" + payload, 10**9)
    with pytest.raises(InputError, match="after decompression"):
        protocol.decode_volume(header + b"\n" + zlib.compress(b"\0" * 10), 10**9)
    with pytest.raises(InputError, match="not valid zlib"):
        protocol.decode_volume(header + b"\nnot zlib", 10**9)
    with pytest.raises(protocol.TooLarge, match="at most 0 MB"):
        protocol.decode_volume(header + b"\n" + payload, 1000)
    with pytest.raises(InputError, match="shape \\[7, 13\\] needs 12"):
        protocol.mask_from_json({"shape": [7, 13], "bits": protocol.mask_to_json(mask[:3])["bits"]})
    with pytest.raises(PromptError, match="point must be"):
        protocol.prompt_from_json({"axis": 0, "index": 1, "points": [[1, "x", True]]})


def test_the_worker_takes_sessions_in_turn():
    worker = ModelWorker()
    started, gate, order = threading.Event(), threading.Event(), []
    first = worker.submit("A", lambda: started.set() or gate.wait(5) and order.append("A1"))
    started.wait(5)  # A1 runs; the others queue behind it
    calls = [worker.submit(owner, lambda name=name: order.append(name))
             for owner, name in [("A", "A2"), ("A", "A3"), ("B", "B1"), ("B", "B2")]]
    gate.set()
    for call in [first, *calls]:
        call.result(5)
    worker.stop()
    assert order == ["A1", "A2", "B1", "A3", "B2"]


def test_caches_in_a_pool_share_one_budget():
    pool = CachePool(budget_bytes=3000)
    first, second = pool.cache(), pool.cache()
    first.put(0, np.zeros(1000, np.uint8))
    second.put(0, np.zeros(1000, np.uint8))
    first.put(1, np.zeros(1000, np.uint8))
    assert first.get(0) is not None  # now the least recently used entry is second's
    second.put(1, np.zeros(1000, np.uint8))
    assert 0 not in second and 0 in first and pool.used_bytes == 3000 and second.evictions == 1
    first.clear()
    assert pool.used_bytes == 1000 and len(first) == 0
    alone = FeatureCache(budget_bytes=1500)  # a cache without a pool keeps its own budget
    alone.put("a", np.zeros(1000, np.uint8))
    alone.put("b", np.zeros(1000, np.uint8))
    assert "a" not in alone and alone.used_bytes == 1000 and alone.evictions == 1


def test_another_sessions_click_runs_between_the_slices_of_a_propagation(sample):
    core = ServerCore(choose_engine("weightfree"), ServerLimits())
    try:
        tube = tube_volume()
        for volume in (tube, sample.volume):
            core.put_volume("me", protocol.volume_sha256(volume), protocol.encode_volume(volume))
        long = core.open_session("me", {"volume": protocol.volume_sha256(tube)}).result(10)["session_id"]
        short = core.open_session("me", {"volume": protocol.volume_sha256(sample.volume)}).result(10)["session_id"]
        core.call("me", long, "add_prompt", 1, tube_prompt(tube), False).result(10)
        job = core.start_propagation("me", long, 1, PropagationOptions())
        wait_for(lambda: job.state == "running" and job.done > 0, 10, "the propagation to start")
        click = prompt_from_voxels(0, [sample.click_kji])
        preview = core.call("me", short, "add_prompt", 1, click, False).result(10)
        assert preview["index"] == click.index and job.state == "running"
        core.cancel_job("me", long, job.job_id)
        wait_for(lambda: job.finished, 10, "the cancelled job to end")
        assert job.state == "cancelled"
    finally:
        core.stop()


def test_sessions_are_limited_and_idle_ones_are_freed_with_their_volume(sample):
    core = ServerCore(choose_engine("weightfree"), ServerLimits(max_sessions=1, idle_timeout_s=60))
    try:
        sha = protocol.volume_sha256(sample.volume)
        core.put_volume("me", sha, protocol.encode_volume(sample.volume))
        core.open_session("me", {"volume": sha}).result(10)
        with pytest.raises(Refused, match="--max-sessions") as refused:
            core.open_session("me", {"volume": sha})
        assert refused.value.status == 503
        core.sweep(time.monotonic() + 30)
        assert core.info("me")["sessions_open"] == 1 and core.volume_info("me", sha)
        core.sweep(time.monotonic() + 61)
        assert core.info("me")["sessions_open"] == 0
        with pytest.raises(Refused, match="not on this server"):
            core.volume_info("me", sha)
    finally:
        core.stop()


# --- a real server -------------------------------------------------------------------------------

def test_the_server_listens_on_loopback_and_needs_the_token(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert raw(server.url, "GET", "/v1/info", token=None)[0] == 401
    status, answer = raw(server.url, "GET", "/v1/info", token="wrong-token-of-some-length")
    assert status == 401 and "Bearer" in answer["message"]
    status, answer = raw(server.url, "POST", "/v1/sessions", b"{}", token=None)
    assert status == 401
    status, answer = raw(server.url, "GET", "/v1/info")
    assert status == 200 and answer["engine"] == "weightfree" and answer["limits"]["max_volume_mb"] == 12
    with pytest.raises(ServerError, match="refused the token"):
        ServerConnection(server.url, "wrong-token-of-some-length").info()


def test_two_clients_at_once_get_in_process_results_and_cannot_see_each_other(server, sample):
    other = make_sample((32, 64, 64), seed=3)
    cases = {TOKEN_A: sample, TOKEN_B: other}
    results, sessions, failures = {}, {}, []

    def use(token: str) -> None:
        try:
            case = cases[token]
            session = open_remote_session(server.url, case.volume, 0, token=token)
            sessions[token] = session
            session.add_prompt(1, prompt_from_voxels(0, [case.click_kji]))
            results[token] = session.propagate(1)
        except Exception as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=use, args=(token,)) for token in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    for token, case in cases.items():
        expected = in_process(case.volume, prompt_from_voxels(0, [case.click_kji]))
        assert np.array_equal(results[token].mask, expected.mask) and results[token].scores == expected.scores
    a, b = sessions[TOKEN_A], sessions[TOKEN_B]
    assert raw(server.url, "GET", f"/v1/sessions/{a.session_id}", token=TOKEN_B)[0] == 404
    assert raw(server.url, "GET", f"/v1/volumes/{protocol.volume_sha256(sample.volume)}", token=TOKEN_B)[0] == 404
    with pytest.raises(ServerError, match="not open on this server"):
        ServerConnection(server.url, TOKEN_B).request("DELETE", f"/sessions/{a.session_id}")
    a.close(), b.close()
    assert raw(server.url, "GET", f"/v1/sessions/{a.session_id}")[0] == 404


def test_segment_on_the_server_writes_the_same_file_as_in_process(server, sample, tmp_path, capsys):
    import SimpleITK as sitk

    from SAM3DSegmentLib.data.volume_files import image_from_array

    image = tmp_path / "image.nrrd"
    sitk.WriteImage(image_from_array(sample.volume.array, sample.volume.ijk_to_ras), str(image))
    k, j, i = sample.click_kji
    common = ["segment", str(image), "--point", f"{i},{j},{k}", "--engine", "weightfree", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "here.nii.gz")]) == 0
    remote = ["--server", server.url, "--token-file", server.token_file, "--out", str(tmp_path / "there.nii.gz")]
    assert main([*common, *remote]) == 0, capsys.readouterr().err
    assert f"on the server {server.url}" in capsys.readouterr().out
    volume = read_volume(image)
    here, there = (read_label_map(tmp_path / name, volume) for name in ("here.nii.gz", "there.nii.gz"))
    assert here.any() and np.array_equal(here, there)


def test_eval_on_the_server_gives_the_in_process_figures(server, sample, tmp_path, capsys):
    import csv

    import SimpleITK as sitk

    from SAM3DSegmentLib.data.volume_files import image_from_array

    case = tmp_path / "data" / "lesion_case"
    case.mkdir(parents=True)
    sitk.WriteImage(image_from_array(sample.volume.array, sample.volume.ijk_to_ras), str(case / "image.nrrd"))
    sitk.WriteImage(image_from_array(sample.truth.astype(np.uint8), sample.volume.ijk_to_ras), str(case / "label.nrrd"))
    common = ["eval", "--data", str(tmp_path / "data"), "--engine", "weightfree", "--rounds", "1", "--no-montage"]
    assert main([*common, "--out", str(tmp_path / "here")]) == 0
    remote = ["--server", server.url, "--token-file", server.token_file, "--out", str(tmp_path / "there")]
    assert main([*common, *remote]) == 0, capsys.readouterr().err
    here, there = ([{k: v for k, v in row.items() if k != "seconds"}
                    for row in csv.DictReader(open(tmp_path / name / "results.csv", encoding="utf-8"))]
                   for name in ("here", "there"))
    assert len(here) == 2 and float(here[0]["dice"]) > 0.5 and here == there
    assert main([*common, *remote, "--engine-option", "projection=mask"]) == 2  # the server's engine as configured


def test_malformed_input_gets_400_with_the_librarys_message(server, sample):
    session = open_remote_session(server.url, sample.volume, 0, token=TOKEN_A)
    base = f"/v1/sessions/{session.session_id}/objects/1"
    status, answer = raw(server.url, "POST", base + "/prompts", b"{not json")
    assert status == 400 and answer["error"] == "InputError" and "not valid JSON" in answer["message"]
    outside = protocol.prompt_to_json(SlicePrompt(0, 5, points=()))
    outside["points"] = [[500.0, 3.0, True]]
    status, answer = raw(server.url, "POST", base + "/prompts", json.dumps({"prompt": outside}).encode())
    assert status == 400 and answer["error"] == "PromptError"
    assert answer["message"] == "Point (row 500, col 3) is outside the 64 x 64 slice. Click inside the image."
    with pytest.raises(PromptError, match="outside the 64 x 64 slice"):
        session.add_prompt(1, protocol.prompt_from_json(outside))
    bad_mask = {"mask": {"shape": [64, 64], "bits": "AAAA"}}
    status, answer = raw(server.url, "PUT", base + "/slices/3", json.dumps(bad_mask).encode())
    assert status == 400 and "not valid zlib" in answer["message"]
    status, answer = raw(server.url, "PUT", base + "/slices/x", b"{}")
    assert status == 400 and "must be an integer" in answer["message"]
    header, _, payload = protocol.encode_volume(sample.volume).partition(b"\n")
    sha = "0" * 64
    status, answer = raw(server.url, "PUT", f"/v1/volumes/{sha}", header + b"\n" + payload)
    assert status == 400 and "not 000" in answer["message"]
    status, answer = raw(server.url, "PUT", f"/v1/volumes/{sha}", header.replace(b"[32,64,64]", b"[32,64]") + b"\n")
    assert status == 400 and "volume shape must be a list of 3 integers" in answer["message"]
    status, answer = raw(server.url, "POST", "/v1/sessions", json.dumps({"volume": sha}).encode())
    assert status == 404 and "upload it first" in answer["message"]
    blank = Volume(np.zeros((4, 8, 8), np.int16), np.eye(4), name="blank")
    status, answer = raw(server.url, "PUT", f"/v1/volumes/{protocol.volume_sha256(blank)}", protocol.encode_volume(blank))
    assert status == 400 and "same value (0) in every voxel" in answer["message"]  # as `sam3d segment` says
    session.close()


def test_oversized_requests_get_413_with_the_limit(server):
    status, answer = raw(server.url, "PUT", "/v1/volumes/" + "0" * 64, headers={"Content-Length": str(10**9)})
    assert status == 413 and "12.2 MB" in answer["message"]
    status, answer = raw(server.url, "POST", "/v1/sessions", headers={"Content-Length": str(10**9)})
    assert status == 413 and "16.0 MB" in answer["message"]
    big = Volume(np.zeros((100, 256, 256), np.int16))  # 12.5 MB of voxels, a tiny upload
    body = protocol.encode_volume(big)
    status, answer = raw(server.url, "PUT", f"/v1/volumes/{protocol.volume_sha256(big)}", body)
    assert status == 413 and "at most 12 MB (sam3d serve --max-volume-mb)" in answer["message"]
    with pytest.raises(InputError, match="at most 12 MB"):  # the client checks before uploading
        open_remote_session(server.url, big, 0, token=TOKEN_A)


def test_objects_edits_and_undo(server, sample):
    session = open_remote_session(server.url, sample.volume, 0, token=TOKEN_A)
    click = prompt_from_voxels(0, [sample.click_kji])
    first = session.add_prompt(1, click)
    session.add_prompt(2, prompt_from_voxels(0, [(click.index, 10, 10)]))
    assert session.object_ids == [1, 2]
    result = session.propagate(1)
    edit = click.index + 2
    edited = session.set_slice_mask(1, edit, result.mask[edit] | np.eye(64, dtype=bool))
    assert np.array_equal(edited.mask, result.mask[edit] | np.eye(64, dtype=bool))
    assert sorted(session.anchors(1)) == [click.index, edit]
    assert session.undo(1) == [click.index]  # the edit is gone, the click is back exactly
    assert np.array_equal(session.anchor_result(1, click.index).mask, first.mask)
    assert session.anchors(1)[click.index].points == click.points
    assert session.mask(1) is None  # the 3D mask comes with the next propagation
    again = session.propagate(1)
    assert np.array_equal(again.mask, result.mask)
    session.remove_anchor(2, click.index)
    assert session.object_ids == [1]
    session.undo(2)
    assert session.object_ids == [1, 2]
    session.remove_object(2)
    with pytest.raises(PromptError, match="Object 2 has no prompts"):
        session.mask(2)
    assert session.undo(1) == [] and session.object_ids == []
    with pytest.raises(PromptError, match="nothing to undo"):
        session.undo(1)
    session.close()


def test_a_volume_is_uploaded_once(server, sample):
    connection = ServerConnection(server.url, TOKEN_A)
    sent = []
    request = connection.request
    connection.request = lambda method, path, *args, **kw: sent.append((method, path)) or request(method, path, *args, **kw)
    volume = make_sample((16, 48, 48), seed=7).volume
    connection.open_session(volume).close()
    connection.open_session(volume).close()
    assert [m for m, p in sent if p.startswith("/volumes/")] == ["GET", "PUT", "GET"]


def test_progress_and_cancel_through_the_client(server):
    volume = tube_volume()
    session = open_remote_session(server.url, volume, 0, token=TOKEN_A)
    session.add_prompt(1, tube_prompt(volume))
    seen = []
    with pytest.raises(PropagationCancelled):
        session.propagate(1, progress=lambda *where: seen.append(where), cancel=lambda: len(seen) >= 2)
    assert len(seen) >= 2 and all(total >= 100 for _, total, _ in seen)
    assert session.mask(1) is None  # nothing changed
    session.close()


def test_a_client_that_stops_polling_loses_its_session(server):
    volume = tube_volume()
    session = open_remote_session(server.url, volume, 0, token=TOKEN_B)
    session.add_prompt(1, tube_prompt(volume))
    path = f"/v1/sessions/{session.session_id}"
    started = time.monotonic()
    status, job = raw(server.url, "POST", path + "/objects/1/propagate", b"{}", token=TOKEN_B)
    assert status == 202 and job["state"] in ("queued", "running")
    info = lambda: raw(server.url, "GET", "/v1/info", token=TOKEN_B)[1]  # touches no session
    wait_for(lambda: info()["sessions_open"] == 0, 15, "the session to be freed")
    assert time.monotonic() - started >= 2  # the lease
    assert raw(server.url, "GET", path, token=TOKEN_B)[0] == 404
    assert "while its propagation waited for the client" in server.log.read_text()


def test_a_server_killed_mid_propagation_gives_a_clear_error_and_writes_nothing(tmp_path):
    import SimpleITK as sitk

    from SAM3DSegmentLib.data.volume_files import image_from_array

    doomed = Server(["--engine", "weightfree"], tmp_path)
    try:
        volume = tube_volume()
        image = tmp_path / "tube.nrrd"
        sitk.WriteImage(image_from_array(volume.array, volume.ijk_to_ras), str(image))
        k, j, i = (s // 2 for s in volume.shape)
        out = tmp_path / "out.nii.gz"
        client = subprocess.Popen(
            [sys.executable, "-m", "SAM3DSegmentLib.commands.cli", "segment", str(image), "--point", f"{i},{j},{k}",
             "--server", doomed.url, "--token-file", doomed.token_file, "--out", str(out), "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        token = Path(doomed.token_file).read_text().strip()
        running = lambda: raw(doomed.url, "GET", "/v1/info", token=token)[1]["jobs_running"] == 1
        wait_for(running, 30, "the client's propagation to start")
        doomed.process.kill()
        _, err = client.communicate(timeout=30)
        assert client.returncode == 2, err
        assert "sam3d segment: error: The SAM3D server at" in err and "did not answer" in err
        assert not out.exists()
    finally:
        doomed.stop()


def test_litemedsam_on_the_server_equals_in_process_and_reuses_features(tmp_path):
    case = make_sample((12, 64, 64))
    click = prompt_from_voxels(0, [case.click_kji])
    options = PropagationOptions(direction="forward", slice_range=(click.index, click.index + 1))
    served = Server(["--engine", "slicewise", "--model", "litemedsam", "--device", "cpu"], tmp_path)
    try:
        expected = in_process(case.volume, click, "slicewise", "litemedsam", options)
        session = open_remote_session(served.url, case.volume, 0, token_file=served.token_file)
        assert session.engine_name == "slicewise:litemedsam"
        session.add_prompt(1, click)
        result = session.propagate(1, options)
        assert np.array_equal(result.mask, expected.mask) and result.scores == expected.scores
        assert result.slices_encoded == expected.slices_encoded > 0
        assert isinstance(session.anchor_result(1, click.index), SliceMask)
        session.close()
        again = open_remote_session(served.url, case.volume, 0, token_file=served.token_file)
        again.add_prompt(1, click)
        assert again.propagate(1, options).slices_encoded == 0 and again.slices_encoded_total == 0
        again.close()
        served.stop()  # SIGTERM: a clean exit that removes the private token folder
        assert served.process.returncode == 0 and not Path(served.token_file).parent.exists()
    finally:
        served.stop()
