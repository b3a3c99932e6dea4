"""The Slicer logic as a client of a REAL ``sam3d serve`` process (weight-free engine), on real
MRML (slicer-core): starting the server without blocking, previews, propagation jobs polled the
way the effect's QTimer polls them (the poll function is called directly: no Qt event loop),
cancel, a server killed mid-propagation, and restart on the next action."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")
pytest.importorskip("uvicorn", reason="the server needs uvicorn")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAM3DSegment"))

from SAM3DSegmentSlicerLogic.masking import MaskingSettings  # noqa: E402
from SAM3DSegmentSlicerLogic.messages import user_message  # noqa: E402
from SAM3DSegmentSlicerLogic.segment_propagation import SegmentPropagation  # noqa: E402
from SAM3DSegmentSlicerLogic.segment_writer import read_segment, segmentation_history, write_segment  # noqa: E402
from SAM3DSegmentSlicerLogic.server_process import (  # noqa: E402
    ServerLink,
    ServerSpec,
    read_ready_lines,
    serve_command,
    slicer_python,
)
from SAM3DSegmentSlicerLogic.session_factory import remote_session_factory  # noqa: E402
from SAM3DSegmentSlicerLogic.settings import PanelSettings  # noqa: E402
from SAM3DSegmentSlicerLogic.volume_nodes import add_volume_node, volume_from_node  # noqa: E402

from SAM3DSegmentLib.data.sample_volume import make_sample  # noqa: E402
from SAM3DSegmentLib.data.volume import Volume  # noqa: E402
from SAM3DSegmentLib.engines.session import PropagationOptions, StopRule  # noqa: E402
from SAM3DSegmentLib.errors import PromptError, ServerError  # noqa: E402

WEIGHTFREE = ServerSpec(engine="weightfree", device="cpu")


def server_env(folder: Path) -> dict:
    return dict(os.environ, SAM3D_CACHE_DIR=str(folder), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """One local weight-free server for the module, started as Slicer starts it (tests: sys.executable)."""
    running = ServerLink(python=sys.executable, env=server_env(tmp_path_factory.mktemp("cache")), cwd=str(ROOT))
    running.wait_connection(WEIGHTFREE)
    yield running
    running.stop()


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    scene._segmentations_logic = logic
    return scene


def segmentation_for(scene, volume_node, names=("lesion", "body")):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node, [node.GetSegmentation().AddEmptySegment(n, n) for n in names]


def tube_volume(slices: int = 200, size: int = 128) -> Volume:
    """A bright tube through every slice: the weight-free engine needs a few seconds for it."""
    rng = np.random.default_rng(1)
    array = rng.normal(-100, 15, (slices, size, size))
    rows, cols = np.mgrid[:size, :size]
    array[:, (rows - size / 2) ** 2 + (cols - size / 2) ** 2 < (size / 4) ** 2] += 150
    return Volume(array.astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), modality="CT")


def poll_until_finished(job, timeout=120.0):
    """What the effect's QTimer does: call poll() until the job is finished."""
    deadline = time.monotonic() + timeout
    updates = []
    while True:
        updates.append(job.poll())
        if updates[-1].finished:
            return updates
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.05)


def dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture
def sample_case(scene, link):
    sample = make_sample(shape_kji=(14, 64, 72))
    volume_node = add_volume_node(scene, sample.volume, "sample")
    segmentation, ids = segmentation_for(scene, volume_node)
    history = segmentation_history(segmentation)
    logic = SegmentPropagation(volume_node, segmentation, remote_session_factory(link.wait_connection(WEIGHTFREE), WEIGHTFREE),
                               save_undo_state=history.SaveState)
    yield sample, logic, segmentation, ids, history
    logic.close()


# --- starting the server -----------------------------------------------------------------------

def test_the_server_command_and_its_ready_lines():
    command = serve_command(ServerSpec(engine="slicewise", model="litemedsam", device="cpu"), python="/x/PythonSlicer")
    assert command[:6] == ["/x/PythonSlicer", "-m", "SAM3DSegmentLib.commands.cli", "serve", "--port", "0"]
    assert command[command.index("--engine") + 1] == "slicewise" and command[command.index("--model") + 1] == "litemedsam"
    assert "--checkpoint" not in command
    assert slicer_python() == sys.executable  # no PythonSlicer beside this Python
    assert read_ready_lines("SAM3D_TOKEN_FILE=/t/token\nSAM3D_SERVER_URL=http://127.0.0.1:5") is None  # line not complete
    assert read_ready_lines("SAM3D_TOKEN_FILE=/t/token\nSAM3D_SERVER_URL=http://127.0.0.1:5\n") == ("http://127.0.0.1:5", "/t/token")
    spec = ServerSpec.from_settings(PanelSettings(engine="weightfree", server_url=" http://gpu:8765 ", server_token_file="/t"))
    assert spec.remote and spec.url == "http://gpu:8765" and spec.token_file == "/t"
    assert not ServerSpec.from_settings(PanelSettings(server_token_file="/t")).remote


def test_the_adapter_file_goes_to_the_local_servers_command_only_when_set():
    plain = serve_command(ServerSpec(engine="slicewise", model="litemedsam"), python="/x/PythonSlicer")
    assert "--adapter" not in plain
    spec = ServerSpec.from_settings(PanelSettings(engine="slicewise", model="litemedsam", adapter=" /a/liver.pt "))
    command = serve_command(spec, python="/x/PythonSlicer")
    assert command[command.index("--adapter") + 1] == "/a/liver.pt" and command.count("--adapter") == 1
    assert remote_session_factory(None, spec).reason == "slicewise / litemedsam + adapter liver.pt on local server"
    remote = ServerSpec.from_settings(PanelSettings(adapter="/a/liver.pt", server_url="http://gpu:8765", server_token_file="/t"))
    assert remote.adapter == "" and "--adapter" not in serve_command(remote)  # the server's own setting


def test_changing_the_adapter_file_restarts_the_local_server_at_the_next_action(tmp_path):
    from dataclasses import replace

    link = ServerLink(python=sys.executable, env=server_env(tmp_path), cwd=str(ROOT))
    try:
        assert link.connection(WEIGHTFREE) is None  # starting
        first = link.local
        assert "--adapter" not in first.command
        with_adapter = replace(WEIGHTFREE, engine="slicewise", adapter=str(tmp_path / "liver.pt"))
        assert link.connection(with_adapter) is None  # the next action: a new server with the adapter
        assert first.process.poll() is not None and link.local is not first
        assert link.local.command[link.local.command.index("--adapter") + 1] == str(tmp_path / "liver.pt")
    finally:
        link.stop()


def test_starting_a_local_server_never_blocks_the_caller(tmp_path):
    link = ServerLink(python=sys.executable, env=server_env(tmp_path), cwd=str(ROOT))
    try:
        began = time.monotonic()
        assert link.connection(WEIGHTFREE) is None  # started, not ready yet: ask again from a timer
        assert time.monotonic() - began < 1.0 and link.starting
        polls = 0
        while (connection := link.connection(WEIGHTFREE)) is None:
            polls += 1
            time.sleep(0.05)
        assert polls > 0 and not link.starting
        assert connection.info()["engine"] == "weightfree"
        assert link.connection(WEIGHTFREE) is connection  # kept
    finally:
        link.stop()
    assert link.local is None


def test_a_server_that_cannot_start_gives_a_clear_message(tmp_path):
    link = ServerLink(python=sys.executable, env=server_env(tmp_path), cwd=str(ROOT))
    bad = ServerSpec(engine="weightfree", model="litemedsam")  # the weight-free engine takes no model
    with pytest.raises(ServerError, match="could not start") as failure:
        link.wait_connection(bad, timeout=60)
    assert "weight-free engine uses no model" in str(failure.value) and link.local is None
    assert "Install dependencies" in user_message(failure.value)


# --- prompts and propagation jobs ----------------------------------------------------------------

def test_click_preview_and_a_polled_propagation_job_write_the_segment(sample_case):
    sample, logic, segmentation, (lesion, body), history = sample_case
    preview = logic.add_prompt(lesion, logic.point_from_ras(sample.volume.kji_to_ras(sample.click_kji), True, axis=0))
    assert preview.index == sample.click_kji[0]
    job = logic.start_propagation(lesion, PropagationOptions())
    assert logic.busy  # until a poll sees the job finished
    updates = poll_until_finished(job)
    assert updates[-1].state == "done" and not logic.busy
    segment = read_segment(segmentation, lesion, logic.volume)
    assert dice(segment, sample.truth) > 0.6
    assert updates[-1].report.changed_voxels == segment.sum() - segment[sample.click_kji[0]].sum()
    assert not read_segment(segmentation, body, logic.volume).any()
    assert history.GetNumberOfStates() == 2  # preview, propagation
    assert job.poll() is updates[-1]  # polling again changes nothing
    status = slicer.vtkSlicerSegmentationsModuleLogic
    assert status.GetSegmentStatus(segmentation.GetSegmentation().GetSegment(lesion)) == status.InProgress


def test_a_finished_job_is_applied_even_when_first_polled_after_it_ended(sample_case):
    """Issue 13 (1): the result is written by the poll that sees "done", however late it comes."""
    sample, logic, segmentation, (lesion, _), _ = sample_case
    logic.add_prompt(lesion, logic.point_from_ras(sample.volume.kji_to_ras(sample.click_kji), True, axis=0))
    job = logic.start_propagation(lesion)
    deadline = time.monotonic() + 60
    while logic.session.job_status(job.job_id).state != "done":  # the job ends without our poll
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = read_segment(segmentation, lesion, logic.volume)
    update = job.poll()  # the first poll of the effect after the job ended
    assert update.state == "done" and update.report.changed_voxels > 0
    after = read_segment(segmentation, lesion, logic.volume)
    assert after.sum() > before.sum() and dice(after, sample.truth) > 0.6


def test_prompts_and_view_changes_during_a_run_are_refused_and_the_run_completes(sample_case):
    """Issue 13 (2): a click in another view while propagating neither breaks the run nor drops prompts."""
    sample, logic, segmentation, (lesion, _), _ = sample_case
    ras = sample.volume.kji_to_ras(sample.click_kji)
    logic.add_prompt(lesion, logic.point_from_ras(ras, True, axis=0))
    job = logic.start_propagation(lesion)
    session = logic.session
    with pytest.raises(PromptError, match="propagation is running"):
        logic.point_from_ras(ras, True, axis=1)  # another view
    with pytest.raises(PromptError, match="propagation is running"):
        logic.preview_in_session(lesion, logic.point_from_ras(ras, False, axis=0))
    with pytest.raises(PromptError, match="propagation is running"):
        logic.start_propagation(lesion)
    with pytest.raises(PromptError, match="propagation is running"):
        logic.clear_prompts(lesion)
    assert logic.axis == 0 and logic.session is session
    assert poll_until_finished(job)[-1].state == "done"
    assert dice(read_segment(segmentation, lesion, logic.volume), sample.truth) > 0.6
    assert list(logic.anchors(lesion)) == [sample.click_kji[0]]
    logic.point_from_ras(ras, True, axis=1)  # allowed again; a new axis starts a new session
    assert logic.axis == 1


# --- a finished neighbour: locked by the editor's masking, steered away by exclude prompts ------------

def touching_case(scene, link, masking=None, exclude_other_segments=False, neighbour_visible=True):
    """One bright object of even intensity: its right part is a finished segment ("neighbour"), the user
    prompts the left part ("target") in a new segment. Nothing in the image separates the two."""
    rng = np.random.default_rng(2)
    shape = (12, 64, 64)
    array = rng.normal(-100, 15, shape)
    whole = np.zeros(shape, bool)
    whole[2:10, 20:45, 12:53] = True
    array[whole] += 150
    neighbour = whole.copy()
    neighbour[:, :, :34] = False
    volume_node = add_volume_node(scene, Volume(array.astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), modality="CT"), "touching")
    segmentation, (target_id, neighbour_id) = segmentation_for(scene, volume_node, names=("target", "neighbour"))
    status = slicer.vtkSlicerSegmentationsModuleLogic
    logic = SegmentPropagation(volume_node, segmentation, remote_session_factory(link.wait_connection(WEIGHTFREE), WEIGHTFREE),
                               masking=(lambda: masking) if masking else None, exclude_other_segments=exclude_other_segments)
    write_segment(segmentation, neighbour_id, neighbour, logic.volume)
    status.SetSegmentStatus(segmentation.GetSegmentation().GetSegment(neighbour_id), status.Completed)
    segmentation.GetDisplayNode().SetSegmentVisibility(neighbour_id, neighbour_visible)
    return logic, segmentation, target_id, neighbour_id, neighbour, whole & ~neighbour


CLICK_KJI = (5, 32, 22)
UNTIL_ABSENT = PropagationOptions(stop=StopRule(min_area=1, patience=1))


@pytest.mark.parametrize("masking, neighbour_visible", [
    (MaskingSettings(overwrite="none"), True),
    (MaskingSettings(overwrite="visible"), False),  # a hidden finished segment under "overwrite visible"
    (MaskingSettings(mask_mode="outside_visible", overwrite="all"), True),
    (MaskingSettings(mask_mode="outside_all", overwrite="all"), False),
])
def test_a_finished_neighbour_is_never_overwritten_when_the_editor_says_so(scene, link, masking, neighbour_visible):
    """Issues 86 / 105 of SlicerNNInteractive: prompting next to a finished segment erased it. Through the
    server (weight-free model, which leaks into the touching neighbour here), preview and propagation
    leave the neighbour exactly as it was under the editor's "overwrite none / visible (hidden)" or an
    editable area outside the segments; and Slicer's default "overwrite all" does take its voxels."""
    logic, segmentation, target, neighbour_id, neighbour, _ = touching_case(
        scene, link, masking, neighbour_visible=neighbour_visible)
    volume = logic.volume
    preview = logic.add_prompt(target, logic.point_from_ras(volume.kji_to_ras(CLICK_KJI), True, axis=0))
    assert (preview.mask & neighbour[CLICK_KJI[0]]).sum() > 0.5 * neighbour[CLICK_KJI[0]].sum()  # the model leaks
    assert np.array_equal(read_segment(segmentation, neighbour_id, volume), neighbour)
    poll_until_finished(logic.start_propagation(target, UNTIL_ABSENT))
    assert np.array_equal(read_segment(segmentation, neighbour_id, volume), neighbour)
    target_now = read_segment(segmentation, target, volume)
    assert target_now[:, :, :34].sum() > 1000
    if masking.mask_mode.startswith("outside"):
        assert not (target_now & neighbour).any()
    status = slicer.vtkSlicerSegmentationsModuleLogic
    assert status.GetSegmentStatus(segmentation.GetSegmentation().GetSegment(neighbour_id)) == status.Completed
    logic.close()


def test_slicers_default_overwrite_all_takes_a_neighbours_voxels(scene, link):
    logic, segmentation, target, neighbour_id, neighbour, _ = touching_case(scene, link, MaskingSettings(overwrite="all"))
    logic.add_prompt(target, logic.point_from_ras(logic.volume.kji_to_ras(CLICK_KJI), True, axis=0))
    assert read_segment(segmentation, neighbour_id, logic.volume).sum() < neighbour.sum()
    logic.close()


def test_other_segments_as_exclude_prompts_steer_the_model_away_from_a_touching_neighbour(scene, link):
    """"Other segments are exclude prompts": the click gets an exclude point deep inside the visible
    neighbour on the prompted slice only; the model's preview then leaves the neighbour (which it
    otherwise floods), the propagation follows, and with the editor's editable area outside the visible
    segments the new segment holds none of the neighbour's voxels and the neighbour is intact."""
    k = CLICK_KJI[0]
    leaked = {}
    for exclude in (False, True):
        logic, segmentation, target, neighbour_id, neighbour, target_truth = touching_case(
            scene, link, MaskingSettings(overwrite="all"), exclude_other_segments=exclude)
        preview = logic.add_prompt(target, logic.point_from_ras(logic.volume.kji_to_ras(CLICK_KJI), True, axis=0))
        leaked[exclude] = (preview.mask & neighbour[k]).sum() / neighbour[k].sum()
        assert (preview.mask & target_truth[k]).sum() > 0.8 * target_truth[k].sum()
        points = logic.anchors(target)[k].points
        if exclude:
            assert list(logic.anchors(target)) == [k]  # only on the prompted slice
            assert len(points) == 2 and not points[1].positive and points == (points[0], *logic.last_exclude_points)
            row, col = int(points[1].row), int(points[1].col)
            assert neighbour[k, row, col] and 34 + 4 <= col <= 52 - 4 and 20 + 4 <= row <= 44 - 4  # deep inside
        else:
            assert len(points) == 1 and logic.last_exclude_points == []
        poll_until_finished(logic.start_propagation(target, UNTIL_ABSENT))
        assert list(logic.anchors(target)) == [k]  # propagated slices got no prompts
        if exclude:
            after = read_segment(segmentation, neighbour_id, logic.volume)
            assert after.sum() > 0.85 * neighbour.sum()  # steered away, even under "overwrite all"
        logic.close()
        scene.Clear(0)
    assert leaked[False] > 0.75 and leaked[True] < 0.2

    logic, segmentation, target, neighbour_id, neighbour, target_truth = touching_case(
        scene, link, MaskingSettings(mask_mode="outside_visible", overwrite="all"), exclude_other_segments=True)
    logic.add_prompt(target, logic.point_from_ras(logic.volume.kji_to_ras(CLICK_KJI), True, axis=0))
    poll_until_finished(logic.start_propagation(target, UNTIL_ABSENT))
    target_now = read_segment(segmentation, target, logic.volume)
    assert np.array_equal(read_segment(segmentation, neighbour_id, logic.volume), neighbour)
    assert not (target_now & neighbour).any() and dice(target_now, target_truth) > 0.8
    logic.close()


def test_cancel_leaves_the_segment_as_it_was(scene, link):
    volume = tube_volume()
    volume_node = add_volume_node(scene, volume, "tube")
    segmentation, (tube, _) = segmentation_for(scene, volume_node)
    logic = SegmentPropagation(volume_node, segmentation, remote_session_factory(link.wait_connection(WEIGHTFREE), WEIGHTFREE))
    try:
        k, j, i = (s // 2 for s in volume.shape)
        logic.add_prompt(tube, logic.point_from_ras(volume.kji_to_ras((k, j, i)), True, axis=0))
        before = read_segment(segmentation, tube, logic.volume)
        job = logic.start_propagation(tube, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
        job.poll()
        job.cancel()
        updates = poll_until_finished(job)
        assert updates[-1].state == "cancelled" and "not changed" in user_message(updates[-1].error)
        assert np.array_equal(read_segment(segmentation, tube, logic.volume), before) and not logic.busy
        # leaving the effect (or closing the session) while a job runs: abandoned, nothing written
        job = logic.start_propagation(tube, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
        job.poll()
        logic.close()
        assert job.finished and job.update.state == "cancelled" and not logic.busy
        assert np.array_equal(read_segment(segmentation, tube, logic.volume), before)
    finally:
        logic.close()


def test_a_server_killed_mid_propagation_changes_nothing_and_the_next_action_restarts_it(scene, tmp_path):
    link = ServerLink(python=sys.executable, env=server_env(tmp_path), cwd=str(ROOT))
    try:
        volume = tube_volume()
        volume_node = add_volume_node(scene, volume, "tube")
        segmentation, (tube, _) = segmentation_for(scene, volume_node)
        logic = SegmentPropagation(volume_node, segmentation, remote_session_factory(link.wait_connection(WEIGHTFREE), WEIGHTFREE))
        ras = volume.kji_to_ras(tuple(s // 2 for s in volume.shape))
        logic.add_prompt(tube, logic.point_from_ras(ras, True, axis=0))
        before = read_segment(segmentation, tube, logic.volume)
        job = logic.start_propagation(tube, PropagationOptions(stop=StopRule(min_area=1, patience=1)))
        assert job.poll().state in ("queued", "running")
        link.local.process.kill()
        link.local.process.wait(10)
        update = poll_until_finished(job, timeout=30)[-1]
        assert update.state == "failed" and isinstance(update.error, ServerError)
        assert "segment was not changed" in user_message(update.error)
        assert np.array_equal(read_segment(segmentation, tube, logic.volume), before) and not logic.busy
        with pytest.raises(ServerError, match="stopped"):
            link.check()  # the effect checks before the next action, and forgets the dead server
        connection = link.wait_connection(WEIGHTFREE)  # the next action starts a new one
        logic = SegmentPropagation(volume_node, segmentation, remote_session_factory(connection, WEIGHTFREE))
        logic.add_prompt(tube, logic.point_from_ras(ras, True, axis=0))
        assert poll_until_finished(logic.start_propagation(tube, PropagationOptions(slice_range=(90, 110))))[-1].state == "done"
        assert read_segment(segmentation, tube, logic.volume)[90:111].any()
        logic.close()
    finally:
        link.stop()


def test_weightfree_engine_through_the_panel_settings(scene, link):
    sample = make_sample(shape_kji=(14, 64, 72))
    volume_node = add_volume_node(scene, sample.volume, "sample")
    segmentation, (lesion, body) = segmentation_for(scene, volume_node)
    spec = ServerSpec.from_settings(PanelSettings(engine="weightfree", device="cpu"))
    assert spec == WEIGHTFREE
    logic = SegmentPropagation(volume_node, segmentation, remote_session_factory(link.connection(spec), spec))
    logic.add_prompt(lesion, logic.point_from_ras(sample.volume.kji_to_ras(sample.click_kji), True, axis=0))
    result, report = logic.propagate(lesion)  # the blocking form, for scripts and the self-test
    segment = read_segment(segmentation, lesion, logic.volume)
    assert result.engine == "weightfree" and dice(segment, sample.truth) > 0.6
    assert not read_segment(segmentation, body, logic.volume).any()
    logic.close()


def test_real_case_through_the_server(scene, link, shared_data, cases):
    """A real CT through a volume node and the server: the weight-free engine segments a kidney
    from one click, and the other segment is untouched."""
    from scipy import ndimage

    from SAM3DSegmentLib.data.volume_files import read_label_map, read_volume

    case = next(c for c in cases if c["case"] == "ct_upper_abdomen_totalseg")
    folder = shared_data / case["case"]
    volume = read_volume(folder / "image.nii.gz", modality=case["modality"])
    labels = read_label_map(folder / "label.nii.gz", volume)
    kidney = labels == int(next(v for v, n in case["labels"].items() if n == "kidney_left"))
    node = add_volume_node(scene, volume)
    segmentation, (target, other) = segmentation_for(scene, node, ("kidney_left", "liver"))
    k = int(np.argmax(kidney.sum(axis=(1, 2))))
    depth = ndimage.distance_transform_edt(kidney[k])
    j, i = np.unravel_index(int(np.argmax(depth)), depth.shape)
    logic = SegmentPropagation(node, segmentation, remote_session_factory(link.wait_connection(WEIGHTFREE), WEIGHTFREE))
    in_slicer = volume_from_node(node)
    logic.add_prompt(target, logic.point_from_ras(in_slicer.kji_to_ras((k, j, i)), True, axis=0))
    update = poll_until_finished(logic.start_propagation(target), timeout=300)[-1]
    assert update.state == "done", update.error
    segment = read_segment(segmentation, target, in_slicer)
    assert dice(segment, kidney) > 0.5, f"weight-free Dice {dice(segment, kidney):.2f} on kidney_left"
    assert not read_segment(segmentation, other, in_slicer).any()
    logic.close()
