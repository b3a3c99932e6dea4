"""One worker thread that runs model jobs in order; the main thread polls its events.

Model work (opening a session, previews, propagation) runs on this one thread, so the session
and its model are only ever used from it. The main thread submits jobs and calls ``poll()``
(from a QTimer in Slicer) to receive progress, results and errors, and touches MRML only there.
Cancel sets a flag the running job checks between slices.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from SAM3DSegmentLib.errors import InputError, PropagationCancelled

log = logging.getLogger(__name__)

Job = Callable[[Callable[[int, int, int], None], Callable[[], bool]], Any]
"""A job is called as ``job(progress, cancelled)`` on the worker thread and returns its result."""


@dataclass(frozen=True)
class WorkerEvent:
    """Something a job reported: kind is "progress", "finished", "cancelled" or "failed"."""

    job_id: int
    label: str
    kind: str
    result: Any = None
    error: BaseException | None = None
    done: int = 0
    total: int = 0
    slice_index: int = -1


class ModelWorker:
    """A single background thread that owns the model and runs submitted jobs in order."""

    def __init__(self, name: str = "SAM3D model worker"):
        self._jobs: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending = 0
        self._cancel_generation = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._pending > 0

    def submit(self, job: Job, label: str = "job") -> int:
        """Queue ``job``; returns its id. Jobs run one after another."""
        if not self._thread.is_alive():
            raise InputError("The model worker has stopped; reload the module.")
        job_id = next(self._ids)
        with self._lock:
            self._pending += 1
            generation = self._cancel_generation
        self._jobs.put((job_id, label, job, generation))
        return job_id

    def cancel(self) -> None:
        """Cancel the running job (at its next slice) and every job queued before this call."""
        with self._lock:
            self._cancel_generation += 1

    def poll(self) -> list[WorkerEvent]:
        """Events since the last poll, oldest first (call from the main thread)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float = 60.0) -> list[WorkerEvent]:
        """Block until every job submitted so far is done, then return the events (scripts, tests)."""
        done = threading.Event()
        self._jobs.put((0, "", lambda progress, cancelled: done.set(), None))
        if not done.wait(timeout):
            raise TimeoutError(f"The model worker did not finish within {timeout:g} s.")
        return self.poll()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel what runs and stop the thread."""
        self.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _cancelled(self, generation: int) -> bool:
        with self._lock:
            return generation < self._cancel_generation

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job_id, label, job, generation = item
            if generation is None:  # a barrier from wait()
                job(None, None)
                continue

            def progress(done: int, total: int, index: int) -> None:
                self._events.put(WorkerEvent(job_id, label, "progress", done=done, total=total, slice_index=index))

            def cancelled() -> bool:
                return self._cancelled(generation)

            try:
                if cancelled():
                    raise PropagationCancelled(f"{label} was cancelled before it started.")
                event = WorkerEvent(job_id, label, "finished", result=job(progress, cancelled))
            except PropagationCancelled as exc:
                event = WorkerEvent(job_id, label, "cancelled", error=exc)
            except BaseException as exc:  # reported to the main thread, never lost
                log.exception("%s failed", label)
                event = WorkerEvent(job_id, label, "failed", error=exc)
            with self._lock:
                self._pending -= 1
            self._events.put(event)
