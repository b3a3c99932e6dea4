"""nnInteractive's unmodified remote client (``nninteractive-client`` 2.6.0) against ``sam3d serve``.

Real server processes on loopback, driven by ``nnInteractiveRemoteInferenceSession`` at
``<server URL>/nninteractive``. The weight-free engine runs where the model does not matter;
one test runs LiteMedSAM (real weights) on a real kidney.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("nnInteractive.inference.remote")
from nnInteractive.inference.remote import (  # noqa: E402
    ServerAtCapacityError,
    SessionExpiredError,
    nnInteractiveRemoteInferenceSession,
)
from nnInteractive.inference.remote.serialization import pack_array, unpack_array  # noqa: E402

from SAM3DSegmentLib.data.prompts import Box, Point, SlicePrompt  # noqa: E402
from SAM3DSegmentLib.data.volume import Volume  # noqa: E402
from SAM3DSegmentLib.data.volume_files import guess_modality, read_label_map, read_volume  # noqa: E402
from SAM3DSegmentLib.engines.choice import choose_engine, open_session  # noqa: E402
from SAM3DSegmentLib.errors import InputError  # noqa: E402
from SAM3DSegmentLib.serving.nninteractive_arrays import decode_array, encode_array  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "nninteractive-test-key-" + "k" * 24
KIDNEY = 2  # kidney_right in ct_upper_abdomen_totalseg


class Server:
    """A ``sam3d serve`` process; ``url`` is the base URL the nnInteractive client takes."""

    def __init__(self, args: list[str], folder: Path):
        token_file = folder / "token"
        token_file.write_text(KEY + "\n")
        token_file.chmod(0o600)
        env = dict(os.environ, SAM3D_CACHE_DIR=str(folder), NO_PROXY="127.0.0.1,localhost")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "SAM3DSegmentLib.commands.cli", "serve", "--port", "0",
             "--token-file", str(token_file), *args],
            stdout=subprocess.PIPE, stderr=(folder / "server.log").open("w"), text=True, cwd=ROOT, env=env)
        values = {}
        while "SAM3D_SERVER_URL" not in values:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the server ended: {(folder / 'server.log').read_text()}")
            key, _, value = line.strip().partition("=")
            values[key] = value
        self.root = values["SAM3D_SERVER_URL"]
        self.url = self.root + "/nninteractive"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)
        self.process.stdout.close()


def start(tmp_path_factory, name: str, args: list[str]):
    server = Server(args, tmp_path_factory.mktemp(name))
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # the client honours proxy variables
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start(tmp_path_factory, "server", ["--engine", "weightfree", "--lease", "10"])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """One slot, a 1.5 s lease, a 0.5 s prediction budget and 12 MB images."""
    running = start(tmp_path_factory, "tight", ["--engine", "weightfree", "--max-sessions", "1", "--lease", "1.5",
                                                "--nninteractive-budget", "0.5", "--max-volume-mb", "12"])
    yield running
    running.stop()


def client(url: str, key: str = KEY) -> nnInteractiveRemoteInferenceSession:
    return nnInteractiveRemoteInferenceSession(url, api_key=key)


def v1_info(server: Server) -> dict:
    answer = httpx.get(server.root + "/v1/info", headers={"Authorization": f"Bearer {KEY}"})
    return answer.json()


@pytest.fixture(scope="module")
def kidney(shared_data):
    """(image k, j, i; spacing; kidney mask; a click (k, j, i) deep inside it on its middle slice)."""
    from scipy import ndimage

    folder = shared_data / "ct_upper_abdomen_totalseg"
    volume = read_volume(folder / "image.nii.gz")
    mask = read_label_map(folder / "label.nii.gz", volume) == KIDNEY
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    k = int(slices[len(slices) // 2])
    depth = ndimage.distance_transform_edt(mask[k])
    j, i = np.unravel_index(int(depth.argmax()), depth.shape)
    return volume.array, tuple(float(s) for s in volume.spacing_kji), mask, (k, int(j), int(i))


def as_served(array: np.ndarray, spacing) -> Volume:
    """The volume the server makes of a client's image (no orientation and no modality travel)."""
    return Volume(array, np.diag([*spacing[::-1], 1.0]), name="nnInteractive image", modality=guess_modality(array))


def in_process(volume: Volume, prompts: list[SlicePrompt], engine: str = "weightfree") -> np.ndarray:
    session = open_session(choose_engine(engine), volume, prompts[0].axis, device="cpu")
    for prompt in prompts:
        session.add_prompt(1, prompt)
    mask = session.propagate(1).mask
    session.close()
    return mask


def connected(url: str, array: np.ndarray, spacing) -> tuple[nnInteractiveRemoteInferenceSession, np.ndarray]:
    session = client(url)
    session.set_image(array[None], {"spacing": list(spacing)})
    target = np.zeros(array.shape, dtype=np.uint8)
    session.set_target_buffer(target)
    return session, target


def tube(slices: int = 300, size: int = 128) -> np.ndarray:
    """A bright tube through every slice: about 5 ms of weight-free propagation per 128 px slice
    on a 2-core CPU."""
    rng = np.random.default_rng(1)
    array = rng.normal(-100, 15, (slices, size, size))
    rows, cols = np.mgrid[:size, :size]
    array[:, (rows - size / 2) ** 2 + (cols - size / 2) ** 2 < (size / 4) ** 2] += 150
    return array.astype(np.int16)


# --- without a server ----------------------------------------------------------------------------

def test_our_array_format_reads_and_writes_what_the_client_does():
    rng = np.random.default_rng(0)
    for array in (rng.random((1, 4, 5, 6)).astype(np.float32), (rng.random((3, 4, 5)) > 0.5).astype(np.uint8),
                  np.arange(24, dtype=">i2").reshape(2, 3, 4), np.ones((2, 3), dtype=bool)):
        assert np.array_equal(decode_array(pack_array(array), 10**6), array)
        assert np.array_equal(unpack_array(encode_array(array)), array)
    body = pack_array(np.zeros((64, 64, 64), dtype=np.float32))
    with pytest.raises(InputError, match="at most"):
        decode_array(body, 1000)
    for broken in (b"NNIA", b"XXXX" + body[4:], body[:-3], body + b"x"):
        with pytest.raises(InputError):
            decode_array(broken, 10**7)


# --- the weight-free server ---------------------------------------------------------------------

def test_capabilities_say_what_we_do(server):
    with client(server.url) as session:
        assert session.supported_interactions == {"points": True, "bbox2d": True, "bbox3d": False,
                                                  "lasso": True, "scribble": True}
        assert session.supports_undo and session.supports_initial_label and session.do_autozoom is False
        assert session.liveness_timeout_seconds == 10 and session.ping()
        assert session.INFERENCE_SESSION_VERSION.startswith("SAM3DSegment")


def test_a_click_gives_the_in_process_3d_mask_and_only_the_changed_box(server, kidney):
    array, spacing, truth, (k, j, i) = kidney
    session, target = connected(server.url, array, spacing)
    with session:
        box = session.add_point_interaction([k, j, i], include_interaction=True)
        expected = in_process(as_served(array, spacing), [SlicePrompt(0, k, (Point(j, i),))])
        assert np.array_equal(target, expected) and expected.any()
        hull = [[int(h.min()), int(h.max()) + 1] for h in np.nonzero(expected)]
        assert box == hull  # the box of what changed, not the volume
        dice = 2 * np.sum(expected & truth) / (expected.sum() + truth.sum())
        assert dice > 0.6
        assert session.add_point_interaction([k, j, i], include_interaction=True) is None  # nothing changed


def test_box_scribble_undo_and_reset(server, kidney):
    array, spacing, truth, (k, j, i) = kidney
    rows, cols = np.nonzero(truth[k])
    served = as_served(array, spacing)
    session, target = connected(server.url, array, spacing)
    with session:
        session.add_point_interaction([k, j, i], include_interaction=True)
        after_click = target.copy()
        box = [[k, k + 1], [int(rows.min()), int(rows.max()) + 1], [int(cols.min()), int(cols.max()) + 1]]
        session.add_bbox_interaction(box, include_interaction=True)
        expected = in_process(served, [SlicePrompt(0, k, (Point(j, i),)),
                                       SlicePrompt(0, k, box=Box(rows.min(), cols.min(), rows.max(), cols.max()))])
        assert np.array_equal(target, expected)
        assert session.undo() and np.array_equal(target, after_click)  # the buffer exactly as before
        assert session.undo() and not target.any()
        assert session.undo() is False  # nothing left
        stroke = np.zeros((1, 1, 7), dtype=np.uint8) + 1  # a scribble on slice k, along the row of the click
        session.add_scribble_interaction(stroke, include_interaction=True,
                                         interaction_bbox=[[k, k + 1], [j, j + 1], [i - 3, i + 4]])
        clicks = tuple(Point(j, c) for c in (i - 3, i - 1, i, i + 1, i + 3))  # five, spread along the stroke
        assert np.array_equal(target, in_process(served, [SlicePrompt(0, k, clicks)]))
        session.reset_interactions()
        assert not target.any()
        session.add_point_interaction([k, j, i], include_interaction=True)
        assert np.array_equal(target, after_click)


def test_lasso_and_initial_segmentation_fix_slices(server, kidney):
    array, spacing, truth, (k, j, i) = kidney
    session, target = connected(server.url, array, spacing)
    with session:
        rows, cols = np.nonzero(truth[k])
        where = [[k, k + 1], [int(rows.min()), int(rows.max()) + 1], [int(cols.min()), int(cols.max()) + 1]]
        crop = truth[tuple(slice(lb, ub) for lb, ub in where)].astype(np.uint8)
        session.add_lasso_interaction(crop, include_interaction=True, interaction_bbox=where)
        assert np.array_equal(target[k], truth[k])  # the lasso's slice is its region
        assert target.any(axis=(1, 2)).sum() > 3  # and the object propagates from it
        half = crop.copy()
        half[:, :, : crop.shape[2] // 2] = 0
        session.add_lasso_interaction(half, include_interaction=False, interaction_bbox=where)
        taken = np.zeros_like(truth[k])
        taken[where[1][0]:where[1][1], where[2][0]:where[2][1]] = half[0] != 0
        assert np.array_equal(target[k], truth[k] & ~taken)
        # an initial segmentation replaces the object; its slices stay fixed when a click refines one
        assert session.add_initial_seg_interaction(truth.astype(np.uint8)) is None
        assert np.array_equal(target, truth)
        session.add_point_interaction([k, j, i], include_interaction=True)
        for index in np.flatnonzero(truth.any(axis=(1, 2))):
            if index != k:
                assert np.array_equal(target[index], truth[index])


def test_a_prompt_in_another_plane_keeps_the_object(server, kidney):
    array, spacing, truth, (k, j, i) = kidney
    session, target = connected(server.url, array, spacing)
    with session:
        session.add_point_interaction([k, j, i], include_interaction=True)
        axial = target.copy()
        rows = np.flatnonzero(truth[:, :, i].any(axis=1))
        cols = np.flatnonzero(truth[:, :, i].any(axis=0))
        session.add_bbox_interaction([[int(rows[0]), int(rows[-1]) + 1], [int(cols[0]), int(cols[-1]) + 1], [i, i + 1]],
                                     include_interaction=True)  # a box in a sagittal slice
        seeded = [index for index in range(array.shape[2]) if index != i and axial[:, :, index].any()]
        assert all(np.array_equal(target[:, :, index], axial[:, :, index]) for index in seeded)
        assert not np.array_equal(target[:, :, i], axial[:, :, i])
        assert session.undo() and np.array_equal(target, axial)


def test_two_clients_at_once_are_isolated(server, kidney):
    array, spacing, truth, (k, j, i) = kidney
    first, first_target = connected(server.url, array, spacing)
    second, second_target = connected(server.url, array[::-1].copy(), spacing)
    flipped = array.shape[0] - 1 - k
    with first, second:
        threads = [threading.Thread(target=first.add_point_interaction, args=([k, j, i], True)),
                   threading.Thread(target=second.add_point_interaction, args=([flipped, j, i], True))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        served = as_served(array, spacing)
        assert np.array_equal(first_target, in_process(served, [SlicePrompt(0, k, (Point(j, i),))]))
        served = as_served(array[::-1].copy(), spacing)
        assert np.array_equal(second_target, in_process(served, [SlicePrompt(0, flipped, (Point(j, i),))]))
        second.reset_interactions()
        assert first.undo() and not first_target.any() and not second_target.any()
        assert second.undo() is False  # the second's reset left it nothing; the first's undo did not touch it


def test_bad_input_gets_400_and_no_lease_410(server, kidney):
    array, spacing, _, (k, j, i) = kidney
    with client(server.url) as session:
        with pytest.raises(httpx.HTTPStatusError) as raised:
            session.add_point_interaction([k, j, i], include_interaction=True)  # no image yet
        assert raised.value.response.status_code == 400
        session.set_image(array[None], {"spacing": list(spacing)})
        for bad in ([[0, 5], [0, 5], [0, 5]], [[k, k], [0, 5], [0, 5]]):  # a 3D box; an empty one
            with pytest.raises(httpx.HTTPStatusError) as raised:
                session.add_bbox_interaction(bad, include_interaction=True)
            assert raised.value.response.status_code == 400 and "box" in raised.value.response.json()["detail"]
    answer = httpx.post(server.url + "/heartbeat", json={}, headers={"Authorization": f"Bearer {KEY}",
                                                                      "X-Lease-Token": "not-a-lease"})
    assert answer.status_code == 410 and answer.json() == {"detail": "lease expired or unknown"}


def test_a_wrong_key_is_refused(server):
    with pytest.raises(httpx.HTTPStatusError) as raised:
        client(server.url, key="wrong-key-" + "x" * 20)
    assert raised.value.response.status_code == 401


def test_heartbeats_are_answered_during_a_long_prediction_and_release_writes_nothing(server):
    array = tube(600)  # about 3 s of propagation
    session, target = connected(server.url, array, (2.0, 1.0, 1.0))
    k, j, i = (s // 2 for s in array.shape)
    errors = []

    def click() -> None:
        try:
            session.add_point_interaction([k, j, i], include_interaction=True)
        except Exception as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    with session:
        thread = threading.Thread(target=click)
        thread.start()
        time.sleep(0.5)
        for ask in (session.heartbeat, session.lease_status, session.ping):
            started = time.monotonic()
            ask()
            assert time.monotonic() - started < 1.0, ask.__name__
        assert thread.is_alive(), "the propagation should still run"
        release = httpx.post(server.url + "/release", headers={"Authorization": f"Bearer {KEY}",
                                                               "X-Lease-Token": session._lease_token})
        assert release.json() == {"released": True}
        thread.join(60)
        assert len(errors) == 1 and isinstance(errors[0], SessionExpiredError)
        assert not target.any()  # the answer of a released lease is void
        with pytest.raises(SessionExpiredError):
            session.undo()
    time.sleep(0.2)
    assert v1_info(server)["sessions_open"] == 0


# --- limits ------------------------------------------------------------------------------------

def test_a_full_server_answers_503_and_the_client_raises_its_capacity_error(tight):
    with client(tight.url):
        with pytest.raises(ServerAtCapacityError):
            client(tight.url)
        answer = httpx.post(tight.url + "/claim", headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "10"
    with client(tight.url):  # released: the slot is free again
        pass


def test_an_idle_lease_expires(tight):
    session = client(tight.url)  # beats every 5 s; the lease lives 1.5 s
    time.sleep(2.5)
    with pytest.raises(SessionExpiredError):
        session.set_image(np.zeros((1, 4, 4, 4), dtype=np.float32))
    session.close()


def test_too_large_images_get_413(tight):
    with client(tight.url) as session:
        with pytest.raises(httpx.HTTPStatusError) as raised:
            session.set_image(np.zeros((1, 64, 256, 256), dtype=np.float32))  # 16 MB of voxels
        assert raised.value.response.status_code == 413


def test_a_prediction_over_budget_answers_with_the_slices_done(tight):
    array = tube(360)  # 11.8 MB, about 1.7 s of propagation
    session, target = connected(tight.url, array, (2.0, 1.0, 1.0))
    k, j, i = (s // 2 for s in array.shape)
    with session:
        assert session.add_point_interaction([k, j, i], True, run_prediction=False) is None  # opens the session
        assert not target.any()
        started = time.monotonic()
        assert session._predict() is not None
        assert time.monotonic() - started < 8  # a 0.5 s budget
        done = np.flatnonzero(target.any(axis=(1, 2)))
        assert k in done and 1 < len(done) < 360  # the clicked slice and a run of slices next to it
        assert np.array_equal(done, np.arange(done[0], done[-1] + 1))


# --- LiteMedSAM ----------------------------------------------------------------------------------

def test_litemedsam_segments_the_kidney_within_the_clients_timeout(tmp_path_factory, kidney):
    array, spacing, truth, (k, j, i) = kidney
    crop = slice(k - 6, k + 6)  # 12 of the kidney's 19 slices: a shorter run of the real model
    array, truth, k = array[crop].copy(), truth[crop], 6
    served = start(tmp_path_factory, "litemedsam", ["--engine", "slicewise", "--model", "litemedsam",
                                                    "--device", "cpu", "--nninteractive-budget", "8"])
    try:
        session, target = connected(served.url, array, spacing)
        with session:
            assert session.license == "Apache-2.0"
            thread = threading.Thread(target=session.add_point_interaction, args=([k, j, i], True))
            started = time.monotonic()
            thread.start()
            time.sleep(3)
            for ask in (session.heartbeat, session.lease_status):
                asked = time.monotonic()
                ask()
                assert time.monotonic() - asked < 1.0, ask.__name__
            thread.join(60)
            seconds = [time.monotonic() - started]
            while True:  # past the budget: each prediction goes on from the slices encoded so far
                started = time.monotonic()
                more = session._predict()
                seconds.append(time.monotonic() - started)
                if more is None:
                    break
                assert len(seconds) < 30  # each continuation finishes at least one slice (12 here)
            assert max(seconds) < 60, seconds
            dice = 2 * np.sum((target > 0) & truth) / (target.sum() + truth.sum())
            assert dice > 0.85, dice
    finally:
        served.stop()
