"""``sam3d bench --server`` smoke tests: real ``sam3d serve`` processes with the weight-free
engine, 1 and 2 annotators, a tiny duration, a small synthetic volume. The report's fields must be
filled and plausible; nothing here asserts a time."""

from __future__ import annotations

import json
import math
import secrets

import numpy as np
import pytest

from SAM3DSegmentLib.commands.cli import main
from SAM3DSegmentLib.data.prompts import prompt_from_voxels
from SAM3DSegmentLib.data.sample_volume import make_sample
from SAM3DSegmentLib.errors import InputError
from SAM3DSegmentLib.serving import protocol
from SAM3DSegmentLib.serving.load_bench import (
    LoadBenchReport,
    LocalServer,
    Workload,
    distinct_volume,
    rss_mb,
    run_load_bench,
)


@pytest.fixture(scope="module")
def workload() -> Workload:
    case = make_sample((32, 64, 64))
    k, j, i = case.click_kji
    return Workload(case.volume, prompt_from_voxels(0, [(k, j, i)]), prompt_from_voxels(0, [(k + 1, j, i)]),
                    label="synthetic sample")


def check_phase(summary: dict, annotators: int, with_memory: bool = True) -> None:
    assert summary["annotators"] == annotators and summary["errors"] == 0
    assert summary["rounds"] >= annotators and summary["propagations"] == summary["rounds"]
    assert summary["seconds"] > 0 and summary["propagations_per_minute"] > 0
    for name in ("preview_ms", "correction_preview_ms"):
        p50, p95 = summary[f"{name}_p50"], summary[f"{name}_p95"]
        assert 0 < p50 <= p95 < 60_000, (name, p50, p95)
    assert 0 < summary["propagation_s_p50"] <= summary["propagation_s_p95"] < 60
    assert summary["open_ms_p50"] > 0 and summary["slices_encoded_p50"] >= 0
    if with_memory:  # a Python process with numpy and FastAPI: tens of MB at least, well under 100 GB
        assert 20 < summary["server_rss_start_mb"] <= summary["server_peak_rss_mb"] < 100_000


def test_a_started_server_under_one_and_two_annotators(workload):
    report = run_load_bench(workload, annotators=[1, 2], duration=0.3, engine="weightfree", overhead_repeats=1)
    assert isinstance(report, LoadBenchReport) and report.started_server
    assert report.engine == "weightfree" and report.device == "cpu" and report.cpu_count >= 1
    assert report.n_slices == 32 and "OMP_NUM_THREADS" in report.threads
    assert [phase.annotators for phase in report.phases] == [1, 2]
    for phase, annotators in zip(report.phases, (1, 2)):
        check_phase(phase.summary(), annotators)
    overhead = report.overhead.summary()
    assert overhead["repeats"] == 1 and overhead["same_mask"]  # the server path computes what this process does
    assert overhead["server_click_propagate_s"] > 0 and overhead["in_process_click_propagate_s"] > 0
    assert math.isclose(overhead["ratio_server_over_in_process"],
                        overhead["server_click_propagate_s"] / overhead["in_process_click_propagate_s"], rel_tol=0.05)
    text = "\n".join(report.lines())
    assert "CPUs" in text and "share them" in text and "prop/min" in text and "target <= 1.15" in text
    assert len([line for line in report.lines() if line.strip().startswith(("1 ", "2 "))]) == 2  # the table's rows
    data = json.loads(json.dumps(report.to_json()))
    assert [p["annotators"] for p in data["phases"]] == [1, 2] and data["overhead"]["repeats"] == 1
    assert len(data["phases"][1]["raw"]["first_preview_ms"]) == data["phases"][1]["rounds"]


def test_a_running_server_given_by_url_tokens_and_pid(workload, tmp_path):
    tokens = [secrets.token_urlsafe(24)]
    with LocalServer(["--engine", "weightfree"], tokens, tmp_path) as server:
        report = run_load_bench(workload, annotators=[2], duration=0.2, max_rounds=1, server_url=server.url,
                                token_file=server.token_file, server_pid=server.pid, overhead_repeats=0)
        assert server.process.poll() is None  # a given server is left running
    assert not report.started_server and report.server == server.url and report.overhead is None
    (phase,) = report.phases
    check_phase(phase.summary(), 2)
    assert phase.rounds == 2  # --rounds 1: one round per annotator, the two sharing one token
    assert rss_mb(2**22 + 7) is None  # no such process: memory "n/a", not a failure


def test_each_round_is_a_new_volume_with_the_same_voxels(workload):
    a, b = distinct_volume(workload.volume, 1), distinct_volume(workload.volume, 2)
    assert np.shares_memory(a.array, workload.volume.array) and np.array_equal(a.ijk_to_ras[:3, :3],
                                                                              workload.volume.ijk_to_ras[:3, :3])
    assert len({protocol.volume_sha256(v) for v in (workload.volume, a, b)}) == 3
    assert 0 < abs(a.ijk_to_ras[0, 3] - workload.volume.ijk_to_ras[0, 3]) < 1e-5  # nanometres


def test_bad_settings_are_input_errors(workload):
    with pytest.raises(InputError, match="Annotator counts"):
        run_load_bench(workload, annotators=[0])
    with pytest.raises(InputError, match="token"):
        run_load_bench(workload, server_url="http://127.0.0.1:1")
    assert main(["bench"]) == 2  # neither --engine nor --server


def test_the_command_on_a_real_case(shared_data, tmp_path, capsys):
    out = tmp_path / "load.json"
    code = main(["bench", "--server", "--engine", "weightfree", "--data", str(shared_data), "--annotators", "1",
                 "--duration", "0.2", "--overhead-repeats", "1", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ct_upper_abdomen_totalseg / kidney_left" in printed and "annotators" in printed
    data = json.loads(out.read_text())
    check_phase(data["phases"][0], 1)
    assert data["overhead"]["same_mask"]
