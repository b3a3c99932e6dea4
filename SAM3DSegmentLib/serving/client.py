"""Sessions on a ``sam3d serve`` server: the session interface over HTTP (numpy + stdlib only).

:class:`RemoteSession` has the methods, arguments and results of the in-process sessions
(:class:`~SAM3DSegmentLib.engines.session.Session`), plus :meth:`RemoteSession.undo`. Its
``propagate`` starts a job on the server and polls it, calling ``progress`` and honouring
``cancel``; polling also keeps the session's lease (a session whose client stops polling is
freed). Errors come back as the library's exceptions; a server that cannot be reached or stops
answering gives :class:`~SAM3DSegmentLib.errors.ServerError`. Nothing here imports torch.

    with open_remote_session("http://127.0.0.1:8765", volume, token_file="token") as session:
        session.add_prompt(1, prompt)
        result = session.propagate(1, progress=print)
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from .. import errors
from ..data.prompts import SlicePrompt
from ..data.volume import Volume
from ..engines.session import (
    CancelCheck,
    Preview,
    ProgressCallback,
    PropagationOptions,
    PropagationResult,
    SliceMask,
)
from ..errors import InputError, PropagationCancelled, SAM3DError, ServerError
from . import protocol
from .protocol import JobStatus

log = logging.getLogger(__name__)

API = "/v1"
MB = 1024**2


def read_tokens(path: str | Path) -> list[str]:
    """The tokens in a token file: one per line; blank lines and ``#`` comments skipped."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"Cannot read the token file {path} ({exc.strerror}); give the file the server printed.") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise InputError(f"The token file {path} holds no token.")
    return tokens


def read_token(path: str | Path) -> str:
    """The first token of a token file."""
    return read_tokens(path)[0]


class ServerConnection:
    """Requests to one server with one token; answers as dicts, failures as library exceptions."""

    def __init__(self, url: str, token: str, timeout: float = 600.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"Server address {url!r} must look like http://HOST:PORT.")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._parts = parts

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                missing_ok: bool = False) -> dict | None:
        """Send one request under ``/v1``; the JSON answer (None for a 404 when ``missing_ok``)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        data = raw
        if raw is not None:
            headers["Content-Type"] = "application/octet-stream"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(self._parts.hostname, self._parts.port, timeout=self.timeout)
        try:
            try:
                connection.request(method, self._parts.path.rstrip("/") + API + path, body=data, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may have refused the body early (413): read its answer
            response = connection.getresponse()
            status, payload = response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServerError(
                f"The SAM3D server at {self.url} did not answer ({type(exc).__name__}: {exc}). "
                "Is `sam3d serve` running there? Nothing was changed or written."
            ) from None
        finally:
            connection.close()
        try:
            answer = json.loads(payload) if payload else {}
        except ValueError:
            answer = {"message": payload[:200].decode("utf-8", "replace")}
        if status == 404 and missing_ok:
            return None
        if status >= 400:
            raise self.error(answer.get("error"), answer.get("message") or f"HTTP {status}", status)
        return answer

    def error(self, name: str | None, message: str, status: int = 500) -> SAM3DError:
        """The library exception for a server's error name and message."""
        if status == 401:
            return ServerError(f"The server at {self.url} refused the token ({message}). Check --token-file.")
        if status == 413:
            return InputError(message)
        kind = getattr(errors, name, None) if isinstance(name, str) else None
        if isinstance(kind, type) and issubclass(kind, SAM3DError):
            return kind(message)
        return ServerError(f"The server at {self.url} answered: {message}")

    def info(self) -> dict:
        return self.request("GET", "/info")

    def upload_volume(self, volume: Volume) -> str:
        """Make sure the server has ``volume`` (uploading it only when it has not); its sha256."""
        sha = protocol.volume_sha256(volume)
        if self.request("GET", f"/volumes/{sha}", missing_ok=True) is not None:
            return sha
        limit_mb = self.info()["limits"]["max_volume_mb"]
        if volume.array.nbytes > limit_mb * MB:
            raise InputError(
                f"The volume has {volume.array.nbytes / MB:.1f} MB of voxels; this server accepts at most "
                f"{limit_mb:.0f} MB (sam3d serve --max-volume-mb)."
            )
        self.request("PUT", f"/volumes/{sha}", raw=protocol.encode_volume(volume))
        return sha

    def open_session(self, volume: Volume, axis: int = 0, engine: str | None = None,
                     model: str | None = None, window=None) -> "RemoteSession":
        """A session on ``volume`` (uploaded if the server lacks it). ``engine``/``model`` None: the server's."""
        sha = self.upload_volume(volume)
        request = {"volume": sha, "axis": axis, "engine": engine, "model": model,
                   "window": protocol.window_to_json(window)}
        return RemoteSession(self, self.request("POST", "/sessions", request), volume)


def open_remote_session(url: str, volume: Volume, axis: int = 0, *, token: str | None = None,
                        token_file: str | Path | None = None, engine: str | None = None,
                        model: str | None = None, window=None) -> "RemoteSession":
    """A :class:`RemoteSession` on the server at ``url`` (token given, or read from ``token_file``)."""
    if token is None:
        if token_file is None:
            raise InputError("A server needs its token: give --token-file (the file `sam3d serve` printed).")
        token = read_token(token_file)
    return ServerConnection(url, token).open_session(volume, axis, engine, model, window)


class RemoteSession:
    """A session on a server, used like an in-process :class:`~SAM3DSegmentLib.engines.session.Session`."""

    poll_seconds = 0.1

    def __init__(self, connection: ServerConnection, info: dict, volume: Volume):
        self.connection = connection
        self.session_id: str = info["session_id"]
        self.volume = volume
        self.axis = int(info["axis"])
        self.engine_name: str = info["engine"]
        self._closed = False

    def _call(self, method: str, tail: str = "", body: Any = None) -> dict:
        return self.connection.request(method, f"/sessions/{self.session_id}{tail}", body)

    def info(self) -> dict:
        return self._call("GET")

    @property
    def object_ids(self) -> list[int]:
        return [int(i) for i in self.info()["objects"]]

    @property
    def slices_encoded_total(self) -> int:
        return int(self.info()["slices_encoded_total"])

    def anchors(self, object_id: int) -> dict[int, SlicePrompt]:
        prompts = [protocol.prompt_from_json(p) for p in self._call("GET", f"/objects/{object_id}/anchors")["anchors"]]
        return {p.index: p for p in prompts}

    def anchor_result(self, object_id: int, index: int) -> SliceMask:
        return protocol.slice_mask_from_json(self._call("GET", f"/objects/{object_id}/anchors/{index}"))

    def mask(self, object_id: int) -> np.ndarray | None:
        mask = self._call("GET", f"/objects/{object_id}/mask")["mask"]
        return None if mask is None else protocol.mask_from_json(mask, "object mask", ndim=3)

    def add_prompt(self, object_id: int, prompt: SlicePrompt, replace_existing: bool = False) -> Preview:
        body = {"prompt": protocol.prompt_to_json(prompt), "replace": bool(replace_existing)}
        return protocol.preview_from_json(self._call("POST", f"/objects/{object_id}/prompts", body))

    def set_slice_mask(self, object_id: int, index: int, mask: np.ndarray) -> Preview:
        body = {"mask": protocol.mask_to_json(mask)}
        return protocol.preview_from_json(self._call("PUT", f"/objects/{object_id}/slices/{index}", body))

    def remove_anchor(self, object_id: int, index: int) -> None:
        self._call("DELETE", f"/objects/{object_id}/anchors/{index}")

    def remove_object(self, object_id: int) -> None:
        self._call("DELETE", f"/objects/{object_id}")

    def undo(self, object_id: int) -> list[int]:
        """Undo the object's last prompt, slice edit or removal; the anchor slices it has now."""
        return [int(i) for i in self._call("POST", f"/objects/{object_id}/undo")["anchors"]]

    def propagate(
        self,
        object_id: int,
        options: PropagationOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> PropagationResult:
        """Propagate on the server, polling its job; as :meth:`Session.propagate`."""
        status = self.start_propagation(object_id, options)
        cancel_sent, reported = False, None
        while not status.finished:
            time.sleep(self.poll_seconds)
            if cancel is not None and not cancel_sent and cancel():
                status, cancel_sent = self.cancel_job(status.job_id), True
            else:
                status = self.job_status(status.job_id)
            where = (status.done, status.total, status.index)
            if progress is not None and status.state == "running" and status.index >= 0 and where != reported:
                reported = where
                progress(*where)
        if status.state == "cancelled":
            raise PropagationCancelled(status.message or "Propagation cancelled; the segmentation was not changed.")
        if status.state == "failed":
            raise self.connection.error(status.error, status.message or "the propagation failed")
        if progress is not None:
            progress(status.total, status.total, -1)
        return status.result

    # --- the job behind propagate, for clients that must not block (poll from a timer) ---------

    def start_propagation(self, object_id: int, options: PropagationOptions | None = None) -> JobStatus:
        """Start a propagation job on the server; poll it with :meth:`job_status` (at least once per lease)."""
        body = {"options": protocol.options_to_json(options)}
        return JobStatus.from_json(self._call("POST", f"/objects/{object_id}/propagate", body))

    def job_status(self, job_id: str) -> JobStatus:
        return JobStatus.from_json(self._call("GET", f"/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> JobStatus:
        return JobStatus.from_json(self._call("POST", f"/jobs/{job_id}/cancel"))

    def close(self) -> None:
        """Close the session on the server (a server that is gone has nothing left to free)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call("DELETE")
        except ServerError as exc:
            log.warning("closing remote session %s: %s", self.session_id, exc)

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
