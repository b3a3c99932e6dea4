"""The server's session core: volumes, sessions, jobs, undo, leases. Knows nothing of HTTP.

- **Owners.** Every call names an owner (the server derives it from the client's token). An
  owner sees only its own volumes and sessions; anything else is "not found".
- **Volumes** are kept by sha256 (see :mod:`protocol`), so a client reopening a volume uploads
  nothing. Volumes no session uses are dropped after the idle timeout, or earlier, oldest first,
  when they hold more than ``ServerLimits.volume_budget_bytes``.
- **Models and work.** One :class:`ModelHost` builds each model once for all sessions; every
  call touching a session, a model or a feature cache runs on the :class:`ModelWorker` thread.
- **Adapter.** A server started with an adapter (``sam3d serve --adapter FILE``) loads it on top
  of its own model; every session of that engine and model gets it (sessions of other models do
  not). Clients never name adapter files: the server reads no path a client sends.
- **Feature caches** of all sessions draw on one :class:`CachePool` budget. A session's cache is
  kept under (owner, volume, axis, engine, model, window, device): a session opened on the same
  volume again, while another is open or after it closed, reuses the encoded slices. (The
  engines make their own cache; the core swaps it for the shared one: the ``cache`` attribute of
  the session's predictor, or of the session.) The volumetric engine (3DSAM-adapter) has no such
  cache: each of its sessions keeps its last 3D crop's encoder output itself.
- **Undo.** Before each prompt, slice edit, anchor or object removal the core records the
  object's anchors; undo removes the object and adds the recorded anchors again (each anchor's
  2D result is recomputed exactly; the 3D mask is recomputed by the next propagation).
- **Jobs and leases.** A propagation runs as a job; the client polls it. A session is freed when
  no request reached it for ``lease_s`` while a job runs or its result is not yet fetched (the
  client is gone: the job is cancelled), and after ``idle_timeout_s`` otherwise.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data.prompts import SlicePrompt
from ..data.volume import Volume, check_segmentable
from ..engines.choice import EngineChoice, choose_engine, open_session, open_volumetric
from ..engines.feature_cache import CachePool, FeatureCache
from ..engines.session import PropagationOptions
from ..errors import InputError, PromptError, PropagationCancelled, SAM3DError, ServerError
from . import protocol
from .protocol import JobStatus
from .worker import ModelWorker

log = logging.getLogger(__name__)

UNDO_DEPTH = 50
"""Undo steps kept per object."""
MB = 1024**2


class Refused(ServerError):
    """A request the server refuses: ``status`` 404 (not found), 409 (busy) or 503 (full)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerLimits:
    """What one server allows (the ``sam3d serve`` options)."""

    max_sessions: int = 8
    max_volume_bytes: int = 1024 * MB
    idle_timeout_s: float = 1800.0
    lease_s: float = 30.0
    cache_bytes: int = 2048 * MB
    volume_budget_bytes: int = 4096 * MB
    prediction_budget_s: float = 40.0
    """Longest an nnInteractive prediction propagates before answering with what it has (its client waits 60 s)."""


@dataclass
class Job:
    """A propagation: its status (read by the client), options and cancel flag."""

    status: JobStatus
    options: PropagationOptions
    cancel: threading.Event = field(default_factory=threading.Event)
    fetched: bool = False


@dataclass
class HostedSession:
    """A session served to one owner."""

    session_id: str
    owner: str
    volume_sha: str
    axis: int
    session: Any = None  # an engines.session.Session once opened
    cache_key: tuple | None = None
    history: dict[int, list[dict[int, SlicePrompt]]] = field(default_factory=dict)
    job: Job | None = None
    last_seen: float = field(default_factory=time.monotonic)
    slot: str | None = None  # the capacity slot it uses (see ServerCore.hold_slot); None: its own
    adapter: str | None = None  # the file name of the adapter on its model, if any

    def expires_after(self, limits: ServerLimits) -> float:
        waiting = self.job is not None and (not self.job.status.finished or not self.job.fetched)
        return limits.lease_s if waiting else limits.idle_timeout_s


@dataclass
class StoredVolume:
    volume: Volume
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)


class ModelHost:
    """Opens sessions of the chosen engines, building each model once and sharing it."""

    def __init__(self, device: str | None = None):
        self.device = device
        self._models: dict[tuple, Any] = {}

    def model(self, choice: EngineChoice):
        """The model of ``choice``, built on first use (worker thread)."""
        key = (choice.engine, choice.spec.name, str(choice.checkpoint_path), str(choice.adapter))
        if key not in self._models:
            from ..models.builders import build_model
            from ..models.devices import select_device

            log.info("loading %s (%s%s) on %s", choice.spec.name, choice.checkpoint_path,
                     f", adapter {choice.adapter}" if choice.adapter else "", self.device or "auto")
            if choice.spec.family == "sam3d_adapter":
                self._models[key] = self._volumetric_model(choice)
            else:
                self._models[key] = build_model(
                    choice.spec, choice.checkpoint_path, select_device(self.device), video=choice.engine == "sam2",
                    adapter=choice.adapter,
                )
        return self._models[key]

    def _volumetric_model(self, choice: EngineChoice):
        """A 3DSAM-adapter model with the choice's adapter loaded on it once (the builder leaves adapters
        of this family to the session; here every session shares the model, so it is done here)."""
        from ..models.builders import build_model
        from ..models.devices import select_device

        model = build_model(choice.spec, choice.checkpoint_path, select_device(self.device))
        if choice.adapter is None:
            return model
        from ..models.adapters import apply_sam3d_adapter
        from ..models.checkpoint_cache import recorded_sha256, sha256_of

        path = Path(choice.checkpoint_path)
        metadata = apply_sam3d_adapter(model, choice.adapter, recorded_sha256(path) or sha256_of(path))
        trained_with = metadata.get("dataset")
        if trained_with is not None and trained_with != choice.spec.dataset:
            from ..models.registry import REGISTRY

            fitting = [n for n, s in REGISTRY.items() if s.family == choice.spec.family and s.dataset == trained_with]
            raise InputError(
                f"Adapter {choice.adapter.name} was trained with the {trained_with} intensity handling, but "
                f"{choice.spec.name} uses {choice.spec.dataset}: serve it with the model of its task "
                f"(--model {' / '.join(fitting) or metadata.get('base_model')})."
            )
        return model

    def open(self, choice: EngineChoice, volume: Volume, axis: int, window):
        """A session of ``choice`` on ``volume`` using the shared model (worker thread)."""
        if choice.engine == "weightfree":
            return open_session(choice, volume, axis, window=window)
        model = self.model(choice)
        if choice.engine == "volumetric":
            return open_volumetric(choice, volume, axis, self.device, window, model=model)  # its own cache
        if choice.engine == "slicewise":
            from ..engines.sam_slice_predictor import open_sam_session

            return open_sam_session(volume, axis, model, choice.spec, device=self.device, window=window)
        from ..data.intensity import WindowSpec
        from ..engines.sam2_video import Sam2Session
        from ..models.devices import select_device

        return Sam2Session(volume, axis, model, choice.spec, window=window or WindowSpec(),
                           device=select_device(self.device))


def adapter_summary(choice: EngineChoice) -> dict | None:
    """What the server tells clients about its adapter (None without one): the file name, never its
    folder, and what its metadata say it was trained on. CheckpointError when the file is missing or
    not an adapter; :meth:`ServerCore.start` checks that it fits the model."""
    if choice.adapter is None:
        return None
    from ..models.adapters import read_adapter

    metadata, _ = read_adapter(choice.adapter)
    summary = {"file": choice.adapter.name, "base_model": metadata.get("base_model"),
               "family": metadata.get("family"), "base_sha256": metadata.get("base_sha256")}
    dice = metadata.get("validation_dice")
    if isinstance(dice, (int, float)) and not isinstance(dice, bool) and math.isfinite(dice):
        summary["validation_dice"] = float(dice)
    return summary


def _cache_holder(session) -> Any:
    """The object whose ``cache`` attribute is the session's feature cache, or None."""
    for holder in (getattr(session, "predictor", None), session):
        if isinstance(getattr(holder, "cache", None), FeatureCache):
            return holder
    return None


class ServerCore:
    """Sessions of several owners over one model worker: what ``sam3d serve`` serves."""

    def __init__(self, choice: EngineChoice, limits: ServerLimits = ServerLimits(), device: str | None = None):
        self.choice = choice
        self.adapter = adapter_summary(choice)
        """The server's adapter as :meth:`info` reports it (None: the base weights)."""
        self.limits = limits
        self.device = device
        self.models = ModelHost(device)
        self.worker = ModelWorker()
        self.pool = CachePool(limits.cache_bytes)
        self._lock = threading.Lock()
        self._volumes: dict[tuple[str, str], StoredVolume] = {}
        self._sessions: dict[str, HostedSession] = {}
        self._caches: dict[tuple, FeatureCache] = {}
        self._held_slots: set[str] = set()
        self.sweep_hooks: list[Callable[[float], None]] = []
        """Called with the time on each sweep (another protocol freeing its own expired leases)."""
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="sam3d-sweeper", daemon=True)

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the default model (so the server is ready when it says so; an adapter that does not fit
        it raises CheckpointError here) and start freeing idle sessions."""
        if self.choice.engine != "weightfree":
            self.worker.submit("server", lambda: self.models.model(self.choice)).result()
        self._sweeper.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            hosted = list(self._sessions.values())
            self._sessions.clear()
        for item in hosted:
            self._free(item, "the server stops")
        self.worker.submit("server", lambda: None).result(timeout=30)
        self.worker.stop()

    # --- volumes -------------------------------------------------------------------------------

    def info(self, owner: str) -> dict:
        with self._lock:
            mine = [s for s in self._sessions.values() if s.owner == owner]
        running = sum(1 for s in mine if s.job is not None and not s.job.status.finished)
        spec = self.choice.spec
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "engine": self.choice.engine,
            "model": None if spec is None else spec.name,
            "adapter": self.adapter,
            "device": self.device or "auto",
            "sessions_open": len(mine),
            "jobs_running": running,
            "cache_used_mb": round(self.pool.used_bytes / MB, 1),
            "limits": {
                "max_sessions": self.limits.max_sessions,
                "max_volume_mb": self.limits.max_volume_bytes / MB,
                "max_request_mb": protocol.MAX_JSON_BYTES / MB,
                "idle_timeout_seconds": self.limits.idle_timeout_s,
                "lease_seconds": self.limits.lease_s,
                "cache_mb": self.limits.cache_bytes / MB,
            },
        }

    def volume_info(self, owner: str, sha: str) -> dict:
        with self._lock:
            stored = self._volumes.get((owner, sha))
            if stored is None:
                raise Refused(404, f"Volume {sha} is not on this server; upload it (PUT /v1/volumes/{sha}).")
            stored.last_used = time.monotonic()
        return {"sha256": sha, "shape": list(stored.volume.shape), "dtype": stored.volume.array.dtype.str}

    def put_volume(self, owner: str, sha: str, body: bytes) -> dict:
        """Store an uploaded volume (:func:`protocol.decode_volume`); ``sha`` must be its content hash."""
        actual, volume = protocol.decode_volume(body, self.limits.max_volume_bytes)
        if actual != sha.lower():
            raise InputError(f"The uploaded volume's sha256 is {actual}, not {sha}; upload it under its own hash.")
        check_segmentable(volume)  # the checks and messages of `sam3d segment`
        with self._lock:
            self._volumes[(owner, actual)] = StoredVolume(volume, volume.array.nbytes)
            self._drop_unused_volumes(time.monotonic(), keep=(owner, actual))
        log.info("volume %s: %s %s stored", actual[:12], volume.array.dtype, volume.shape)
        return self.volume_info(owner, actual)

    def store_volume(self, owner: str, volume: Volume) -> dict:
        """Keep a volume decoded elsewhere (another protocol's upload) under its sha256, as :meth:`put_volume`."""
        sha = protocol.volume_sha256(volume)
        check_segmentable(volume)
        with self._lock:
            self._volumes[(owner, sha)] = StoredVolume(volume, volume.array.nbytes)
            self._drop_unused_volumes(time.monotonic(), keep=(owner, sha))
        return self.volume_info(owner, sha)

    # --- sessions ------------------------------------------------------------------------------

    def hold_slot(self, slot: str) -> None:
        """Count ``slot`` (another protocol's lease, before it opens a session) against ``max_sessions``;
        sessions opened with that ``slot`` share it. :class:`Refused` 503 when the server is full."""
        with self._lock:
            if slot not in self._held_slots and self._slots_used() >= self.limits.max_sessions:
                raise Refused(503, f"The server has {self.limits.max_sessions} sessions open, its limit "
                                   "(sam3d serve --max-sessions); close one or try again later.")
            self._held_slots.add(slot)

    def drop_slot(self, slot: str) -> None:
        with self._lock:
            self._held_slots.discard(slot)

    def _slots_used(self) -> int:
        """Held slots and open sessions, sessions sharing a slot counted once (lock held)."""
        return len(self._held_slots | {s.slot or s.session_id for s in self._sessions.values()})

    def open_session(self, owner: str, request: dict, slot: str | None = None) -> Future:
        """Open a session on an uploaded volume; the future gives :meth:`session_info`.
        ``slot``: a slot held with :meth:`hold_slot` that the session uses instead of its own."""
        named = sorted({"adapter", "checkpoint"} & set(request))
        if named:
            raise InputError(f"A session cannot name files ({', '.join(named)}): the checkpoint and adapter are "
                             "the server's own settings (sam3d serve --checkpoint / --adapter); GET /v1/info "
                             "reports the adapter.")
        sha = request.get("volume")
        if not isinstance(sha, str):
            raise InputError("Opening a session needs 'volume': the sha256 of an uploaded volume.")
        axis = request.get("axis", 0)
        if axis not in (0, 1, 2) or isinstance(axis, bool):
            raise PromptError(f"Propagation axis must be 0, 1 or 2 (array axes k, j, i); got {axis!r}.")
        window = protocol.window_from_json(request.get("window"))
        choice = self._choice(request.get("engine"), request.get("model"))
        session_id = secrets.token_hex(12)
        with self._lock:
            stored = self._volumes.get((owner, sha))
            if stored is None:
                raise Refused(404, f"Volume {sha} is not on this server; upload it first.")
            if slot not in self._held_slots and self._slots_used() >= self.limits.max_sessions:
                raise Refused(503, f"The server has {self.limits.max_sessions} sessions open, its limit "
                                   "(sam3d serve --max-sessions); close one or try again later.")
            stored.last_used = time.monotonic()
            hosted = HostedSession(session_id, owner, sha, axis, slot=slot,
                                   adapter=None if choice.adapter is None else choice.adapter.name)
            self._sessions[session_id] = hosted  # holds the place while the worker opens it
        cache_key = (owner, sha, axis, choice.engine, choice.spec and choice.spec.name,
                     str(choice.checkpoint_path), str(choice.adapter), repr(window), self.device)

        def run() -> dict:
            session = self.models.open(choice, stored.volume, axis, window)
            holder = _cache_holder(session)
            if holder is not None:
                holder.cache = self._caches.setdefault(cache_key, self.pool.cache())
                hosted.cache_key = cache_key
            hosted.session = session
            return self.session_info(owner, session_id)

        future = self.worker.submit(session_id, run, interactive=True)
        future.add_done_callback(lambda f: f.exception() is None or self._forget(session_id))
        return future

    def _choice(self, engine: str | None, model: str | None) -> EngineChoice:
        """The server's own choice (its checkpoint and adapter) when the request names nothing else or
        the server's engine and model; otherwise that engine and model from the server's cache, without
        the adapter (it was made for the server's model)."""
        served = self.choice
        if engine in (None, "auto") and model is None:
            return served
        if engine == served.engine == "volumetric" and model is None:  # the engine has no default model
            return served
        if served.spec is not None and model == served.spec.name and engine in (None, "auto", served.engine):
            return served
        choice = choose_engine(engine or "auto", model)
        same = choice.engine == served.engine and choice.spec == served.spec
        return served if same and choice.checkpoint_path == served.checkpoint_path else choice

    def session_info(self, owner: str, session_id: str) -> dict:
        hosted = self._get(owner, session_id)
        session = hosted.session
        return {
            "session_id": session_id,
            "volume": hosted.volume_sha,
            "axis": hosted.axis,
            "engine": session.engine_name,
            "adapter": hosted.adapter,
            "objects": session.object_ids,
            "slices_encoded_total": int(session.slices_encoded_total),
            "job": None if hosted.job is None else hosted.job.status.job_id,
            "lease_seconds": self.limits.lease_s,
            "idle_timeout_seconds": self.limits.idle_timeout_s,
        }

    def close_session(self, owner: str, session_id: str) -> None:
        hosted = self._get(owner, session_id)
        self._forget(session_id)
        self._free(hosted, "the client closed it")

    def run(self, owner: str, session_id: str, fn: Callable[[Any], Any]) -> Future:
        """Run ``fn(session)`` on the worker in the session's turn as an interactive call (another
        protocol's own actions); the future gives its result."""
        hosted = self._get(owner, session_id)
        if hosted.session is None:
            raise Refused(409, "The session is still opening; wait for the open request to answer.")
        return self.worker.submit(session_id, lambda: fn(hosted.session), interactive=True)

    def call(self, owner: str, session_id: str, action: str, object_id: int, *args) -> Future:
        """Run a session action on the worker: add_prompt, set_slice_mask, remove_anchor,
        remove_object, undo, mask, anchors or anchor_result. The future gives its JSON answer."""
        hosted = self._get(owner, session_id)
        if hosted.session is None:
            raise Refused(409, "The session is still opening; wait for the open request to answer.")
        method: Callable[..., Any] = getattr(self, f"_{action}")
        return self.worker.submit(session_id, lambda: method(hosted, object_id, *args), interactive=True)

    # --- actions (worker thread) -----------------------------------------------------------------

    def _add_prompt(self, hosted: HostedSession, object_id: int, prompt: SlicePrompt, replace: bool) -> dict:
        preview = self._recorded(hosted, object_id, lambda: hosted.session.add_prompt(object_id, prompt, replace))
        return protocol.preview_to_json(preview)

    def _set_slice_mask(self, hosted: HostedSession, object_id: int, index: int, mask) -> dict:
        preview = self._recorded(hosted, object_id, lambda: hosted.session.set_slice_mask(object_id, index, mask))
        return protocol.preview_to_json(preview)

    def _remove_anchor(self, hosted: HostedSession, object_id: int, index: int) -> dict:
        self._recorded(hosted, object_id, lambda: hosted.session.remove_anchor(object_id, index))
        return {"anchors": self._anchor_indices(hosted, object_id)}

    def _remove_object(self, hosted: HostedSession, object_id: int) -> dict:
        self._recorded(hosted, object_id, lambda: hosted.session.remove_object(object_id))
        return {"anchors": []}

    def _undo(self, hosted: HostedSession, object_id: int) -> dict:
        history = hosted.history.get(object_id)
        if not history:
            raise PromptError(f"Object {object_id} has nothing to undo.")
        anchors = history.pop()
        session = hosted.session
        session.remove_object(object_id)
        for index in sorted(anchors):
            session.add_prompt(object_id, anchors[index], replace_existing=True)
        return {"anchors": sorted(anchors)}

    def _mask(self, hosted: HostedSession, object_id: int) -> dict:
        mask = hosted.session.mask(object_id)
        return {"mask": None if mask is None else protocol.mask_to_json(mask)}

    def _anchors(self, hosted: HostedSession, object_id: int) -> dict:
        anchors = hosted.session.anchors(object_id)
        return {"anchors": [protocol.prompt_to_json(anchors[i]) for i in sorted(anchors)]}

    def _anchor_result(self, hosted: HostedSession, object_id: int, index: int) -> dict:
        try:
            result = hosted.session.anchor_result(object_id, index)
        except KeyError:
            raise PromptError(f"Object {object_id} has no anchor on slice {index}.") from None
        return protocol.slice_mask_to_json(result)

    def _recorded(self, hosted: HostedSession, object_id: int, change: Callable[[], Any]) -> Any:
        """Run ``change``; when it succeeds, record the object's anchors before it for undo."""
        session = hosted.session
        before = session.anchors(object_id) if object_id in session.object_ids else {}
        result = change()
        history = hosted.history.setdefault(object_id, [])
        history.append(before)
        del history[:-UNDO_DEPTH]
        return result

    @staticmethod
    def _anchor_indices(hosted: HostedSession, object_id: int) -> list[int]:
        session = hosted.session
        return sorted(session.anchors(object_id)) if object_id in session.object_ids else []

    # --- propagation jobs ------------------------------------------------------------------------

    def start_propagation(self, owner: str, session_id: str, object_id: int, options: PropagationOptions) -> JobStatus:
        hosted = self._get(owner, session_id)
        if hosted.session is None:
            raise Refused(409, "The session is still opening; wait for the open request to answer.")
        if hosted.job is not None and not hosted.job.status.finished:
            raise Refused(409, f"Propagation job {hosted.job.status.job_id} of this session is still running; "
                               "cancel it or wait for it.")
        job = Job(JobStatus(secrets.token_hex(8), object_id, "queued"), options)
        hosted.job = job
        self.worker.submit(session_id, lambda: self._propagate(hosted, job))
        return job.status

    def job_status(self, owner: str, session_id: str, job_id: str) -> JobStatus:
        job = self._job(owner, session_id, job_id)
        if job.status.finished:
            job.fetched = True
        return job.status

    def cancel_job(self, owner: str, session_id: str, job_id: str) -> JobStatus:
        job = self._job(owner, session_id, job_id)
        job.cancel.set()
        return job.status

    def _job(self, owner: str, session_id: str, job_id: str) -> Job:
        job = self._get(owner, session_id).job
        if job is None or job.status.job_id != job_id:
            raise Refused(404, f"Job {job_id} is not a job of session {session_id} (only the latest is kept).")
        return job

    def _propagate(self, hosted: HostedSession, job: Job) -> None:
        status = job.status
        if job.cancel.is_set():
            status.message = "Propagation cancelled; the segmentation was not changed."
            status.state = "cancelled"
            return
        status.state = "running"

        def progress(done: int, total: int, index: int) -> None:
            status.done, status.total, status.index = done, total, index
            self.worker.run_waiting()  # other sessions' clicks go between this job's slices

        try:
            status.result = hosted.session.propagate(status.object_id, job.options, progress, job.cancel.is_set)
            status.state = "done"
        except PropagationCancelled as exc:
            status.message, status.state = str(exc), "cancelled"
        except Exception as exc:
            if not isinstance(exc, SAM3DError):
                log.exception("propagation of session %s failed", hosted.session_id)
            status.error, status.message, status.state = type(exc).__name__, str(exc), "failed"

    # --- bookkeeping -----------------------------------------------------------------------------

    def _get(self, owner: str, session_id: str) -> HostedSession:
        with self._lock:
            hosted = self._sessions.get(session_id)
            if hosted is None or hosted.owner != owner:
                raise Refused(404, f"Session {session_id} is not open on this server (closed, freed after "
                                   "being idle, or opened with another token).")
            hosted.last_seen = time.monotonic()
            self._volumes[(owner, hosted.volume_sha)].last_used = hosted.last_seen
            return hosted

    def _forget(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _free(self, hosted: HostedSession, why: str) -> None:
        """Cancel the session's job and close it on the worker (its feature cache stays for reuse)."""
        log.info("session %s freed: %s", hosted.session_id, why)
        if hosted.job is not None:
            hosted.job.cancel.set()

        def close() -> None:
            if hosted.session is None:
                return
            holder = _cache_holder(hosted.session)
            if holder is not None:
                holder.cache = FeatureCache(0)  # keep the shared one out of the session's close()
            hosted.session.close()

        try:
            self.worker.submit(hosted.session_id, close, interactive=True)
        except ServerError:
            pass  # the worker has stopped: nothing to free

    def sweep(self, now: float | None = None) -> None:
        """Free sessions past their lease or idle timeout, and volumes no session uses."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [s for s in self._sessions.values()
                       if s.session is not None and now - s.last_seen > s.expires_after(self.limits)]
            for hosted in expired:
                del self._sessions[hosted.session_id]
            self._drop_unused_volumes(now)
        for hosted in expired:
            lease = hosted.expires_after(self.limits) == self.limits.lease_s
            self._free(hosted, f"no request for {now - hosted.last_seen:.0f} s "
                               + ("while its propagation waited for the client" if lease else "(idle timeout)"))
        for hook in self.sweep_hooks:
            hook(now)

    def _drop_unused_volumes(self, now: float, keep: tuple | None = None) -> None:
        """Drop volumes no session uses: idle ones, then the oldest while over budget (lock held)."""
        used = {(s.owner, s.volume_sha) for s in self._sessions.values()} | {keep}
        unused = sorted((v.last_used, key) for key, v in self._volumes.items() if key not in used)
        total = sum(v.nbytes for v in self._volumes.values())
        for last_used, key in unused:
            if now - last_used > self.limits.idle_timeout_s or total > self.limits.volume_budget_bytes:
                total -= self._volumes.pop(key).nbytes
                stale = [k for k in self._caches if k[:2] == key]
                caches = [self._caches.pop(k) for k in stale]
                if caches:
                    self.worker.submit("server", lambda: [c.clear() for c in caches])

    def _sweep_loop(self) -> None:
        interval = max(0.1, min(1.0, self.limits.lease_s / 4))
        while not self._stopping.wait(interval):
            try:
                self.sweep()
            except Exception:  # never let the sweeper die
                log.exception("freeing idle sessions failed")
