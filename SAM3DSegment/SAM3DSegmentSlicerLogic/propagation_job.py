"""A propagation running on the server, polled from Slicer's main thread (a QTimer).

Each :meth:`PropagationJob.poll` is one short request for the job's status. The poll that sees
the job done also writes its result into the segment, in the same call, so a finished job is
always applied, however late its last event comes. A cancelled or failed job, or a server that
stopped answering, writes nothing: the segment stays as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from SAM3DSegmentLib.engines.session import PropagationResult
from SAM3DSegmentLib.errors import PropagationCancelled, SAM3DError, ServerError

from .segment_writer import WriteReport

log = logging.getLogger(__name__)


@dataclass
class JobUpdate:
    """What one poll found. ``state``: "queued", "running", "done", "cancelled" or "failed"."""

    state: str
    done: int = 0
    total: int = 0
    slice_index: int = -1
    result: PropagationResult | None = None
    report: WriteReport | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


class PropagationJob:
    """One propagation job of one segment on the server (see :meth:`SegmentPropagation.start_propagation`)."""

    def __init__(self, propagation, segment_id: str, session, status, edits=None):
        self.propagation = propagation
        self.segment_id = segment_id
        self.session = session
        self.job_id: str = status.job_id
        self.edits = edits
        self.update = JobUpdate(status.state, status.done, status.total, status.index)
        self._cancel_sent = False

    @property
    def finished(self) -> bool:
        return self.update.finished

    def cancel(self) -> None:
        """Ask the server to stop at its next slice; the next poll reports "cancelled"."""
        if self.finished or self._cancel_sent:
            return
        self._cancel_sent = True
        try:
            self._apply(self.session.cancel_job(self.job_id))
        except SAM3DError as error:
            self._fail(error)

    def abandon(self) -> None:
        """Stop following the job (the effect was left, the session closes): ask the server to cancel
        it and count it as cancelled now, without waiting for the server. Nothing is written."""
        if self.finished:
            return
        try:
            if not self._cancel_sent:
                self._cancel_sent = True
                self.session.cancel_job(self.job_id)
        except SAM3DError as error:
            log.warning("cancelling job %s: %s", self.job_id, error)
        self._finish(JobUpdate("cancelled", self.update.done, self.update.total,
                               error=PropagationCancelled("Propagation cancelled; the segment was not changed.")))

    def poll(self) -> JobUpdate:
        """One status request; writes the result when the job is done. Never raises."""
        if self.finished:
            return self.update
        try:
            self._apply(self.session.job_status(self.job_id))
        except SAM3DError as error:
            self._fail(error)
        return self.update

    def _apply(self, status) -> None:
        if status.state == "done":
            try:
                report = self.propagation.write_result(self.segment_id, status.result)
            except Exception as error:  # writing failed: say so, never lose the message
                log.exception("writing the propagation of %s failed", self.segment_id)
                self._finish(JobUpdate("failed", status.done, status.total, error=error))
                return
            self._finish(JobUpdate("done", status.total, status.total, -1, status.result, report))
        elif status.state == "cancelled":
            self._finish(JobUpdate("cancelled", status.done, status.total,
                                   error=PropagationCancelled(status.message or "Propagation cancelled.")))
        elif status.state == "failed":
            self._finish(JobUpdate("failed", status.done, status.total,
                                   error=self.session.connection.error(status.error, status.message or "the propagation failed")))
        else:
            self.update = JobUpdate(status.state, status.done, status.total, status.index)

    def _fail(self, error: BaseException) -> None:
        if isinstance(error, ServerError):
            error = ServerError(
                f"{error} The SAM 3D server stopped answering during the propagation; the segment was not changed. "
                "The next action starts the local server again (or reconnects to the server URL)."
            )
        self._finish(JobUpdate("failed", self.update.done, self.update.total, error=error))

    def _finish(self, update: JobUpdate) -> None:
        self.update = update
        if self.propagation.running_job is self:
            self.propagation.running_job = None
