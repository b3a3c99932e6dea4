"""``sam3d bench --server``: a ``sam3d serve`` process under 1, 4, 16 ... simulated annotators.

Each annotator is a thread with its own token (when the bench starts the server) and its own
:class:`~SAM3DSegmentLib.serving.client.RemoteSession` per round. A round is what a user does on
a new case: upload the volume and open a session, click (the 2D preview), propagate, then a
correction click on a slice the propagation encoded (a decoder-only preview), and close. Rounds
repeat until ``duration`` has passed (a round under way finishes) or ``rounds`` are done; there is
no think time, so every annotator waits only for the server (a worst case for the server).

**Same work, no shared caches.** Every annotator works on the same case and target so that a
round costs the same whatever the annotator count; each round's volume is that volume with its
origin moved by nanometres (:func:`distinct_volume`), so the server sees a new volume
(new sha256, new feature cache, a new upload) and every round pays the image encoder as a new
case would: no round reuses another's encoded slices.

**Figures per annotator count** (:class:`PhaseFigures`): preview latency of the first click and
of the correction click as the client sees it (HTTP, queue wait and model; p50 and p95),
propagations per minute of all annotators together (completed propagations / wall time of the
phase), and the server process's peak resident set size during the phase (``VmRSS`` sampled from
``/proc/<pid>/status`` every 20 ms; only when the server's pid is known, i.e. this machine).
When the bench starts the server itself it starts a fresh one per annotator count, so each
phase's memory and caches are its own.

**Overhead of the server path** (:class:`OverheadFigures`), in the same run, before the first
phase (on a server of its own when the bench starts them), with no other load, after one untimed
round each way: one annotator, the same prompt and options, wall time of click +
propagate through the server against the same model in this process (:class:`store.ModelHost`,
the server's own session pipeline), alternating which goes first, ratio per repeat, then median.

The annotators and the server share this machine's CPUs (and the bench process's threads decode
answers too): the figures are for this machine and say how many CPUs it has.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data.prompts import SlicePrompt
from ..data.volume import Volume
from ..engines.session import PropagationOptions
from ..errors import InputError, ServerError
from .client import ServerConnection, read_tokens

log = logging.getLogger(__name__)

OBJECT_ID = 1


@dataclass(frozen=True)
class Workload:
    """What each annotator does every round: the case, the first click, a correction click on a
    slice the propagation computes (None: no correction), the propagation options."""

    volume: Volume
    prompt: SlicePrompt
    correction: SlicePrompt | None = None
    options: PropagationOptions = field(default_factory=PropagationOptions)
    axis: int = 0
    label: str = ""


def distinct_volume(volume: Volume, serial: float) -> Volume:
    """``volume`` with its origin moved by ``serial`` nanometres along R: the same voxels (the
    same work) under a new sha256, so the server neither finds it uploaded nor reuses a cache."""
    matrix = np.array(volume.ijk_to_ras, dtype=float)
    matrix[0, 3] += serial * 1e-6
    return Volume(volume.array, matrix, volume.name, volume.modality)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation); None without values."""
    return float(np.percentile(values, q)) if values else None


@dataclass
class PhaseFigures:
    """One annotator count: raw per-round timings and the server's memory."""

    annotators: int
    seconds: float = 0.0
    rounds: int = 0
    propagations: int = 0
    open_ms: list[float] = field(default_factory=list)
    first_preview_ms: list[float] = field(default_factory=list)
    correction_preview_ms: list[float] = field(default_factory=list)
    propagation_s: list[float] = field(default_factory=list)
    slices_encoded: list[int] = field(default_factory=list)
    server_rss_start_mb: float | None = None
    server_peak_rss_mb: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def propagations_per_minute(self) -> float:
        return 60.0 * self.propagations / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        """The figures the table shows."""
        return {
            "annotators": self.annotators,
            "seconds": round(self.seconds, 2),
            "rounds": self.rounds,
            "propagations": self.propagations,
            "propagations_per_minute": round(self.propagations_per_minute, 2),
            "preview_ms_p50": _round(percentile(self.first_preview_ms, 50)),
            "preview_ms_p95": _round(percentile(self.first_preview_ms, 95)),
            "correction_preview_ms_p50": _round(percentile(self.correction_preview_ms, 50)),
            "correction_preview_ms_p95": _round(percentile(self.correction_preview_ms, 95)),
            "open_ms_p50": _round(percentile(self.open_ms, 50)),
            "propagation_s_p50": _round(percentile(self.propagation_s, 50), 3),
            "propagation_s_p95": _round(percentile(self.propagation_s, 95), 3),
            "slices_encoded_p50": _round(percentile(self.slices_encoded, 50)),
            "server_rss_start_mb": _round(self.server_rss_start_mb),
            "server_peak_rss_mb": _round(self.server_peak_rss_mb),
            "errors": len(self.errors),
        }


@dataclass
class OverheadFigures:
    """Click + propagate, one annotator, through the server and in this process, per repeat."""

    server_seconds: list[float] = field(default_factory=list)
    local_seconds: list[float] = field(default_factory=list)
    server_preview_ms: list[float] = field(default_factory=list)
    local_preview_ms: list[float] = field(default_factory=list)
    same_mask: list[bool] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Median over repeats of (server wall / in-process wall)."""
        return statistics.median(s / max(l, 1e-12) for s, l in zip(self.server_seconds, self.local_seconds))

    def summary(self) -> dict:
        return {
            "repeats": len(self.server_seconds),
            "server_click_propagate_s": _round(statistics.median(self.server_seconds), 3),
            "in_process_click_propagate_s": _round(statistics.median(self.local_seconds), 3),
            "ratio_server_over_in_process": _round(self.ratio, 3),
            "server_preview_ms": _round(statistics.median(self.server_preview_ms)),
            "in_process_preview_ms": _round(statistics.median(self.local_preview_ms)),
            "same_mask": all(self.same_mask),
        }


@dataclass
class LoadBenchReport:
    """What ``sam3d bench --server`` prints (and writes with ``--json``)."""

    server: str
    engine: str
    model: str | None
    device: str
    workload: str
    n_slices: int
    cpu_count: int
    threads: str
    duration_s: float
    max_rounds: int | None
    started_server: bool
    phases: list[PhaseFigures] = field(default_factory=list)
    overhead: OverheadFigures | None = None

    def lines(self) -> list[str]:
        rounds = f", at most {self.max_rounds} rounds each" if self.max_rounds else ""
        server = ("`sam3d serve` on loopback, started by the bench, a fresh one per annotator count"
                  if self.started_server else self.server)
        lines = [
            f"server: {server}: "
            f"engine {self.engine}{f' ({self.model})' if self.model else ''}, device {self.device}",
            f"work per round: {self.workload}",
            f"machine: {self.cpu_count} CPUs ({self.threads}); the server and all annotator threads share them",
            f"each count runs {self.duration_s:g} s{rounds} (a round under way finishes); no think time",
        ]
        if self.overhead is not None:
            o = self.overhead.summary()
            lines.append(
                f"server path vs in-process (1 annotator, same prompt, {o['repeats']} repeats, median): click + propagate "
                f"{o['server_click_propagate_s']:.2f} s vs {o['in_process_click_propagate_s']:.2f} s, ratio "
                f"{o['ratio_server_over_in_process']:.2f} (target <= 1.15); click {o['server_preview_ms']:.0f} ms vs "
                f"{o['in_process_preview_ms']:.0f} ms; same mask: {'yes' if o['same_mask'] else 'NO'}"
            )
        header = ("annotators", "rounds", "prop/min", "preview p50", "p95", "correction p50", "p95",
                  "propagation p50", "p95", "server peak RSS", "errors")
        rows = [header]
        for phase in self.phases:
            s = phase.summary()
            rows.append((
                str(s["annotators"]), str(s["rounds"]), f"{s['propagations_per_minute']:.1f}",
                _ms(s["preview_ms_p50"]), _ms(s["preview_ms_p95"]),
                _ms(s["correction_preview_ms_p50"]), _ms(s["correction_preview_ms_p95"]),
                _s(s["propagation_s_p50"]), _s(s["propagation_s_p95"]),
                "n/a" if s["server_peak_rss_mb"] is None else f"{s['server_peak_rss_mb']:.0f} MB",
                str(s["errors"]),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
        lines.append("preview: the first click on a new case (its slice not yet encoded); correction: a click on a slice "
                     "the propagation encoded (decoder only); latencies as the client sees them (HTTP + queue + model); "
                     "prop/min: all annotators together")
        for phase in self.phases:
            for error in phase.errors[:3]:
                lines.append(f"error with {phase.annotators} annotators: {error}")
        return lines

    def to_json(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if key not in ("phases", "overhead")}
        data["phases"] = [dict(phase.summary(), raw=asdict(phase)) for phase in self.phases]
        data["overhead"] = None if self.overhead is None else dict(self.overhead.summary(), raw=asdict(self.overhead))
        return data

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")


def _round(value, digits: int = 1):
    return None if value is None else round(float(value), digits)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _s(value) -> str:
    return "-" if value is None else f"{value:.2f} s"


# --- the server's memory -------------------------------------------------------------------------

def rss_mb(pid: int, field_name: str = "VmRSS") -> float | None:
    """A memory line of ``/proc/<pid>/status`` in MB (None where there is no /proc or no process)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


class RssSampler:
    """Peak ``VmRSS`` of another process during a ``with`` block, sampled in a thread."""

    def __init__(self, pid: int | None, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.start_mb = self.peak_mb = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def _take(self) -> None:
        value = rss_mb(self.pid)
        if value is not None:
            self.peak_mb = value if self.peak_mb is None else max(self.peak_mb, value)

    def __enter__(self) -> "RssSampler":
        if self.pid is not None:
            self.start_mb = rss_mb(self.pid)
            self._take()
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.pid is not None:
            self._stop.set()
            self._thread.join()
            self._take()


# --- a server process ----------------------------------------------------------------------------

class LocalServer:
    """A ``sam3d serve --port 0`` process on loopback with ``tokens`` (one per annotator)."""

    def __init__(self, serve_args: list[str], tokens: list[str], folder: Path, start_timeout: float = 300.0):
        self.folder = folder
        self.token_file = folder / "tokens"
        with os.fdopen(os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
            handle.write("\n".join(tokens) + "\n")
        self.log_path = folder / "server.log"
        self._log = self.log_path.open("w")
        command = [sys.executable, "-m", "SAM3DSegmentLib.commands.cli", "serve", "--port", "0",
                   "--token-file", str(self.token_file), *serve_args]
        log.info("starting %s", " ".join(command))
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True)
        values: dict[str, str] = {}
        timer = threading.Timer(start_timeout, self.process.kill)
        timer.start()
        try:
            while "SAM3D_SERVER_URL" not in values:
                line = self.process.stdout.readline()
                if not line:
                    self.stop()
                    raise ServerError(f"`sam3d serve` ended before it was ready: {self.log_tail()}")
                key, _, value = line.strip().partition("=")
                values[key] = value
        finally:
            timer.cancel()
        self.url = values["SAM3D_SERVER_URL"]
        self.pid = self.process.pid

    def log_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process.stdout.close()
        self._log.close()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the annotators ------------------------------------------------------------------------------

class _Serials:
    """Distinct origin shifts (nanometres) for every volume of a run: 1, 2, 3 ... plus a random
    fraction drawn per run, so that two runs on one server do not collide either."""

    def __init__(self):
        self._count = itertools.count(1)
        self._base = secrets.randbelow(10**6) / 10**6
        self._lock = threading.Lock()

    def next(self) -> float:
        with self._lock:
            return self._base + next(self._count)


def one_round(connection: ServerConnection, workload: Workload, volume: Volume) -> dict:
    """Open a session on ``volume``, click, propagate, correct, close; the timings."""
    started = time.perf_counter()
    session = connection.open_session(volume, workload.axis)
    try:
        opened = time.perf_counter()
        session.add_prompt(OBJECT_ID, workload.prompt)
        clicked = time.perf_counter()
        result = session.propagate(OBJECT_ID, workload.options)
        propagated = time.perf_counter()
        correction_ms = None
        if workload.correction is not None:
            session.add_prompt(OBJECT_ID, workload.correction)
            correction_ms = 1000 * (time.perf_counter() - propagated)
    finally:
        session.close()
    return dict(open_ms=1000 * (opened - started), first_preview_ms=1000 * (clicked - opened),
                propagation_s=propagated - clicked, correction_ms=correction_ms,
                slices_encoded=result.slices_encoded, mask=result.mask)


def run_phase(url: str, tokens: list[str], workload: Workload, annotators: int, duration: float,
              max_rounds: int | None, serials: _Serials, server_pid: int | None) -> PhaseFigures:
    """``annotators`` threads doing rounds until ``duration`` has passed (or ``max_rounds`` each)."""
    figures = PhaseFigures(annotators)
    lock = threading.Lock()
    gate = threading.Barrier(annotators + 1)
    deadline = [0.0]

    def annotator(number: int) -> None:
        gate.wait()
        connection = ServerConnection(url, tokens[number % len(tokens)])
        done = 0
        while (max_rounds is None or done < max_rounds) and (done == 0 or time.perf_counter() < deadline[0]):
            volume = distinct_volume(workload.volume, serials.next())
            try:
                timings = one_round(connection, workload, volume)
            except Exception as exc:  # recorded, and this annotator stops: the table shows it
                with lock:
                    figures.errors.append(f"annotator {number + 1}, round {done + 1}: {type(exc).__name__}: {exc}")
                return
            done += 1
            with lock:
                figures.rounds += 1
                figures.propagations += 1
                figures.open_ms.append(timings["open_ms"])
                figures.first_preview_ms.append(timings["first_preview_ms"])
                figures.propagation_s.append(timings["propagation_s"])
                figures.slices_encoded.append(timings["slices_encoded"])
                if timings["correction_ms"] is not None:
                    figures.correction_preview_ms.append(timings["correction_ms"])

    threads = [threading.Thread(target=annotator, args=(n,), name=f"annotator-{n + 1}", daemon=True)
               for n in range(annotators)]
    for thread in threads:
        thread.start()
    with RssSampler(server_pid) as memory:
        started = time.perf_counter()
        deadline[0] = started + duration
        gate.wait()
        for thread in threads:
            thread.join()
        figures.seconds = time.perf_counter() - started
    figures.server_rss_start_mb, figures.server_peak_rss_mb = memory.start_mb, memory.peak_mb
    log.info("%d annotators: %d rounds in %.1f s", annotators, figures.rounds, figures.seconds)
    return figures


def measure_overhead(url: str, token: str, workload: Workload, local_session, repeats: int,
                     serials: _Serials) -> OverheadFigures:
    """Click + propagate through the server vs ``local_session(volume)`` (an in-process session
    on the same model), alternating the order; no other load."""
    figures = OverheadFigures()
    connection = ServerConnection(url, token)

    def click_and_propagate(open_session) -> tuple[float, float, np.ndarray]:
        """(click + propagate seconds, click seconds, mask) on a fresh copy of the volume."""
        session = open_session(distinct_volume(workload.volume, serials.next()))
        try:
            started = time.perf_counter()
            session.add_prompt(OBJECT_ID, workload.prompt)
            clicked = time.perf_counter()
            result = session.propagate(OBJECT_ID, workload.options)
            return time.perf_counter() - started, clicked - started, result.mask
        finally:
            session.close()

    def remote() -> tuple[float, float, np.ndarray]:
        return click_and_propagate(lambda volume: connection.open_session(volume, workload.axis))

    def local() -> tuple[float, float, np.ndarray]:
        return click_and_propagate(local_session)

    remote(), local()  # untimed: first calls in each process (imports, allocator, first forward passes)
    for index in range(repeats):
        first, second = (remote, local) if index % 2 == 0 else (local, remote)
        a, b = first(), second()
        (server, here) = (a, b) if first is remote else (b, a)
        figures.server_seconds.append(server[0])
        figures.local_seconds.append(here[0])
        figures.server_preview_ms.append(1000 * server[1])
        figures.local_preview_ms.append(1000 * here[1])
        figures.same_mask.append(bool(np.array_equal(server[2], here[2])))
    return figures


def thread_setting() -> str:
    """How many threads the model may use here (the server inherits this environment)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={omp}" if omp else "OMP_NUM_THREADS unset: torch uses all CPUs"


def run_load_bench(
    workload: Workload,
    annotators: list[int] = (1, 4, 16),
    duration: float = 60.0,
    max_rounds: int | None = None,
    engine: str = "auto",
    model: str | None = None,
    checkpoint: str | None = None,
    device: str = "cpu",
    server_url: str | None = None,
    token_file: str | Path | None = None,
    server_pid: int | None = None,
    overhead_repeats: int = 3,
    warmup: bool = True,
) -> LoadBenchReport:
    """Measure a server under each annotator count (see the module docstring).

    Without ``server_url`` a fresh ``sam3d serve`` (``engine``, ``model``, ``checkpoint`` on
    ``device``) is started for each count, with one token per annotator and room for all their
    sessions. With ``server_url`` that server is used (tokens from ``token_file``, shared round
    robin; it must allow ``max(annotators)`` sessions); its memory is read only with ``server_pid``.
    ``overhead_repeats`` 0 skips the in-process comparison. A first untimed round warms the model.
    """
    annotators = [int(n) for n in annotators]
    if not annotators or min(annotators) < 1:
        raise InputError(f"Annotator counts must be 1 or more; got {annotators}.")
    if duration <= 0 or (max_rounds is not None and max_rounds < 1):
        raise InputError("Give a positive --duration (and --rounds, if any, of at least 1).")
    if overhead_repeats < 0:
        raise InputError("Overhead repeats cannot be negative.")
    if server_url is not None and token_file is None:
        raise InputError("A running server needs its token: give --token-file with --server-url.")
    serials = _Serials()
    own = server_url is None
    tokens = ([f"annotator-{n + 1}-{secrets.token_urlsafe(24)}" for n in range(max(annotators))] if own
              else read_tokens(token_file))
    serve_args = ["--engine", engine, "--device", device, "--max-sessions", str(max(8, max(annotators)))]
    if model:
        serve_args += ["--model", model]
    if checkpoint:
        serve_args += ["--checkpoint", checkpoint]

    report: LoadBenchReport | None = None
    steps = ([None] if overhead_repeats else []) + annotators  # None: the overhead measurement
    with tempfile.TemporaryDirectory(prefix="sam3d-load-bench-") as folder:
        for count in steps:
            server = LocalServer(serve_args, tokens, Path(folder)) if own else None
            try:
                url = server.url if own else server_url
                pid = server.pid if own else server_pid
                if report is None:
                    info = ServerConnection(url, tokens[0]).info()
                    report = LoadBenchReport(
                        server=url, engine=info["engine"], model=info.get("model"), device=info.get("device", "?"),
                        workload=_describe(workload), n_slices=workload.volume.n_slices(workload.axis),
                        cpu_count=os.cpu_count() or 0, threads=thread_setting(), duration_s=duration,
                        max_rounds=max_rounds, started_server=own,
                    )
                if count is None:  # its own server (when the bench starts them): the phases' memory stays theirs
                    report.overhead = measure_overhead(url, tokens[0], workload,
                                                       _local_sessions(info, checkpoint, device, workload.axis),
                                                       overhead_repeats, serials)
                    continue
                if warmup:  # the first forward passes of a fresh process are slow: not counted
                    one_round(ServerConnection(url, tokens[0]), workload,
                              distinct_volume(workload.volume, serials.next()))
                report.phases.append(run_phase(url, tokens, workload, count, duration, max_rounds, serials, pid))
            finally:
                if server is not None:
                    server.stop()
    return report


def _local_sessions(info: dict, checkpoint: str | None, device: str, axis: int):
    """Opens in-process sessions of the server's engine and model, building the model once
    (:class:`store.ModelHost`: the server's own pipeline)."""
    from ..engines.choice import choose_engine
    from .store import ModelHost

    choice = choose_engine(info["engine"], info.get("model"), checkpoint)
    host = ModelHost(None if device in (None, "auto") else device)
    if choice.engine != "weightfree":
        host.model(choice)  # built before any timing, as the server builds it before it is ready

    def open_local(volume: Volume):
        return host.open(choice, volume, axis, None)

    return open_local


def _describe(workload: Workload) -> str:
    shape = "x".join(str(s) for s in workload.volume.shape)
    correction = (f", correction click on slice {workload.correction.index}" if workload.correction is not None
                  else "")
    stop = "stop rule" if workload.options.slice_range is None else f"slices {workload.options.slice_range}"
    return (f"{workload.label or workload.volume.name or 'volume'} ({shape}, axis {workload.axis}): open a session on a "
            f"new copy of the volume (origin moved by nanometres: new upload, no cached features), click on slice "
            f"{workload.prompt.index}, propagate ({workload.options.direction}, {stop}){correction}, close")
