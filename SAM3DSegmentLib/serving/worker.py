"""The model worker: one thread runs all model work of the server, taking sessions in turn.

Each owner (a session) has a first-in-first-out queue of calls; the worker takes one call from
the next owner with work (round robin), so a client sending many requests cannot starve another.
A long call (a propagation) lets other owners' short interactive calls (previews, edits) run
between its slices: the propagation's progress callback calls :meth:`ModelWorker.run_waiting`.
An owner never has two calls running at once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from ..errors import ServerError

log = logging.getLogger(__name__)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future
    interactive: bool


class ModelWorker:
    """A thread owning the models; :meth:`submit` queues a call and returns its future."""

    def __init__(self, name: str = "sam3d-model"):
        self._queues: OrderedDict[Hashable, deque[_Call]] = OrderedDict()
        self._running: set[Hashable] = set()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, owner: Hashable, fn: Callable[[], Any], interactive: bool = False) -> Future:
        """Queue ``fn()`` for ``owner``; ``interactive`` calls may run between a propagation's slices."""
        future: Future = Future()
        with self._condition:
            if self._stopping:
                raise ServerError("The server is shutting down; start it again.")
            self._queues.setdefault(owner, deque()).append(_Call(fn, future, interactive))
            self._condition.notify()
        return future

    def run_waiting(self) -> None:
        """Run the waiting interactive calls of other owners, one per owner (worker thread only)."""
        for _ in range(len(self._queues)):
            taken = self._take(interactive_only=True)
            if taken is None:
                return
            self._run(*taken)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the queued calls, let the running one finish, end the thread."""
        with self._condition:
            self._stopping = True
            for queue in self._queues.values():
                for call in queue:
                    call.future.cancel()
            self._queues.clear()
            self._condition.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _take(self, interactive_only: bool) -> tuple[Hashable, _Call] | None:
        with self._condition:
            for owner, queue in self._queues.items():
                if owner in self._running or (interactive_only and not queue[0].interactive):
                    continue
                call = queue.popleft()
                if queue:
                    self._queues.move_to_end(owner)  # the others go first next time
                else:
                    del self._queues[owner]
                self._running.add(owner)
                return owner, call
        return None

    def _run(self, owner: Hashable, call: _Call) -> None:
        try:
            if call.future.set_running_or_notify_cancel():
                try:
                    call.future.set_result(call.fn())
                except BaseException as exc:  # the caller gets it from the future
                    call.future.set_exception(exc)
        finally:
            with self._condition:
                self._running.discard(owner)

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._queues and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
            taken = self._take(interactive_only=False)
            if taken is not None:
                self._run(*taken)
