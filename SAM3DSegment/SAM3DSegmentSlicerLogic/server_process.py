"""The SAM 3D server that Slicer talks to: a local ``sam3d serve`` process, or a server's URL.

Slicer never runs model work in its own Python (Slicer keeps the interpreter lock while Qt
idles, so a worker thread there starves). On first use :class:`ServerLink` starts ``sam3d serve
--port 0`` with Slicer's own Python (``PythonSlicer``), or connects to the URL and token file set
in the module panel. Starting never blocks: :meth:`ServerLink.connection` answers ``None`` while
the server loads its model, and the caller asks again from a timer. The server's stdout goes to a
file that is read on each poll, so no pipe read can block the main thread (on any platform).
The panel's adapter file goes to the local server (``--adapter``); a remote server's adapter is its
own setting, which the panel shows from the server's info (:func:`server_adapter_text`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from SAM3DSegmentLib.errors import InputError, SAM3DError, ServerError

log = logging.getLogger(__name__)

URL_KEY, TOKEN_FILE_KEY = "SAM3D_SERVER_URL", "SAM3D_TOKEN_FILE"
START_TIMEOUT_S = 600.0
"""Longest start-up (the server loads its model before it prints its URL)."""


@dataclass(frozen=True)
class ServerSpec:
    """Which server the panel's settings ask for: a local one with this engine (and adapter), or a URL."""

    engine: str = "auto"
    model: str = ""
    checkpoint: str = ""
    device: str = "auto"
    url: str = ""
    token_file: str = ""
    adapter: str = ""

    @classmethod
    def from_settings(cls, settings) -> "ServerSpec":
        remote = settings.uses_remote_server
        return cls(
            engine=settings.engine, model=settings.model, checkpoint=settings.checkpoint, device=settings.device,
            url=settings.server_url.strip() if remote else "", token_file=settings.server_token_file.strip() if remote else "",
            adapter="" if remote else settings.adapter.strip(),
        )

    @property
    def remote(self) -> bool:
        return bool(self.url)


def slicer_python() -> str:
    """Slicer's Python launcher (``PythonSlicer`` beside the application), else this Python."""
    folder = Path(sys.executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (folder / name).is_file():
            return str(folder / name)
    return sys.executable


def serve_command(spec: ServerSpec, python: str | None = None) -> list[str]:
    """The command line of a local server for ``spec`` (a free port on loopback, a private token)."""
    command = [python or slicer_python(), "-m", "SAM3DSegmentLib.commands.cli", "serve", "--port", "0",
               "--engine", spec.engine, "--device", spec.device]
    if spec.model:
        command += ["--model", spec.model]
    if spec.checkpoint:
        command += ["--checkpoint", spec.checkpoint]
    if spec.adapter:
        command += ["--adapter", spec.adapter]
    return command


def adapter_text(info: dict) -> str:
    """What the panel says about the adapter a server reports in its info (``GET /v1/info``)."""
    adapter = info.get("adapter")
    if not adapter:
        return "none (the server's model runs with its base weights)"
    return f"{adapter.get('file')} (fine-tuned on {adapter.get('base_model')})"


def server_adapter_text(spec: ServerSpec, timeout: float = 3.0) -> str:
    """The adapter a remote server reports, asked with a short timeout (the panel asks when the
    URL or token file changes); raises the library's error when the server cannot be asked."""
    from SAM3DSegmentLib.serving.client import ServerConnection, read_token

    return adapter_text(ServerConnection(spec.url, read_token(spec.token_file), timeout=timeout).info())


def adapter_state(settings, ask=server_adapter_text) -> str:
    """The panel's line about the adapter: the local server's file, or what the remote server reports
    (``ask(spec)``; its errors become a short reason)."""
    from .messages import panel_advice

    if settings.uses_remote_server:
        spec = ServerSpec.from_settings(settings)
        if not spec.token_file:
            return "Server's adapter: unknown (choose the server's token file)."
        try:
            return f"Server's adapter: {ask(spec)}"
        except (SAM3DError, OSError) as error:
            return f"Server's adapter: unknown ({panel_advice(str(error))})"
    if not settings.adapter.strip():
        return "Adapter: none (the model's base weights)."
    path = Path(settings.adapter.strip()).expanduser()
    found = "found" if path.is_file() else "NOT FOUND"
    return f"Adapter {found}: {path} (the local server loads it on top of the model)."


def error_line(log_text: str) -> str:
    """The message of the last ``sam3d serve: error: ...`` line of a server's log ("" if none)."""
    for line in reversed(log_text.splitlines()):
        _, found, message = line.partition(": error: ")
        if found and message.strip():
            return message.strip()
    return ""


def read_ready_lines(text: str) -> tuple[str, str] | None:
    """(url, token file) once both ``KEY=VALUE`` lines are complete in ``text``, else None."""
    values = {}
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            key, _, value = line.strip().partition("=")
            values[key] = value
    if URL_KEY in values and TOKEN_FILE_KEY in values:
        return values[URL_KEY], values[TOKEN_FILE_KEY]
    return None


class LocalServer:
    """One ``sam3d serve`` child process; :meth:`poll` says when it is ready, never blocking."""

    def __init__(self, command: list[str], env: dict | None = None, cwd: str | None = None,
                 start_timeout: float = START_TIMEOUT_S):
        self.command = list(command)
        self.folder = Path(tempfile.mkdtemp(prefix="sam3d-slicer-"))
        self.stdout_path = self.folder / "stdout.txt"
        self.log_path = self.folder / "server.log"
        self.start_timeout = start_timeout
        self.started_at = time.monotonic()
        self.url: str | None = None
        self.token_file: str | None = None
        with self.stdout_path.open("wb") as stdout, self.log_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd,
                env=env if env is not None else os.environ.copy(),
            )
        log.info("Started the SAM 3D server: %s (log: %s)", " ".join(self.command), self.log_path)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def ready(self) -> bool:
        return self.url is not None

    def log_tail(self, characters: int = 1500) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-characters:].strip()
        except OSError:
            return ""

    def poll(self) -> tuple[str, str] | None:
        """(url, token file) once the server is ready, None while it starts; ServerError if it failed."""
        if self.url is not None:
            if not self.alive:
                raise self._ended("stopped")
            return self.url, self.token_file
        try:
            found = read_ready_lines(self.stdout_path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            found = None
        if found is not None:
            self.url, self.token_file = found
            log.info("SAM 3D server ready at %s", self.url)
            return found
        if not self.alive:
            raise self._ended("could not start")
        if time.monotonic() - self.started_at > self.start_timeout:
            self.stop()
            raise ServerError(
                f"The SAM 3D server did not start within {self.start_timeout:.0f} s. Its log: {self.log_path}. "
                "Press the button again to retry, or choose a smaller model in the SAM 3D module."
            )
        return None

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.05) -> tuple[str, str]:
        """Block until ready (scripts, tests and the self-test; never from Slicer's GUI)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.poll()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise ServerError(f"The SAM 3D server did not start within {timeout:g} s. Its log: {self.log_path}")
            time.sleep(interval)

    def _ended(self, what: str) -> ServerError:
        code = self.process.poll()
        tail = self.log_tail()
        cause = error_line(tail)
        if cause:  # the server said why (a setting the user can fix): say that first
            return ServerError(
                f"The SAM 3D server {what} (exit code {code}): {cause} The segment was not changed; the next "
                f"action starts it again. Its log: {self.log_path}"
            )
        return ServerError(
            f"The SAM 3D server {what} (exit code {code}). The segment was not changed; the next action starts "
            f"it again. If this repeats, open the SAM 3D module and press 'Install dependencies', or choose "
            f"another engine or model there. Last lines of its log ({self.log_path}):\n{tail}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process (SIGTERM, then kill) and remove its files."""
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.token_file and self.process.returncode not in (0, None):
            token_folder = Path(self.token_file).parent
            if token_folder.name.startswith("sam3d-serve-"):  # a killed server's private folder
                shutil.rmtree(token_folder, ignore_errors=True)
        shutil.rmtree(self.folder, ignore_errors=True)


class ServerLink:
    """The server the Slicer logic uses: started on first use, restarted after it died.

    :meth:`connection` never blocks on a starting server: it answers ``None`` until the server is
    ready (ask again from a timer). A local server is restarted when its settings (engine, model,
    checkpoint, device, adapter file) change.
    """

    def __init__(self, python: str | None = None, env: dict | None = None, cwd: str | None = None,
                 start_timeout: float = START_TIMEOUT_S):
        self.python = python
        self.env = env
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.local: LocalServer | None = None
        self._spec: ServerSpec | None = None
        self._connection = None

    @property
    def starting(self) -> bool:
        return self.local is not None and not self.local.ready and self.local.alive

    def connection(self, spec: ServerSpec):
        """The ``ServerConnection`` for ``spec``; None while a local server starts (poll again)."""
        from SAM3DSegmentLib.serving.client import ServerConnection, read_token

        if spec != self._spec:
            self.stop()
            self._spec = spec
        if self._connection is not None:
            self.check()
            return self._connection
        if spec.remote:
            if not spec.token_file:
                raise InputError(
                    "The server needs its token: in the SAM 3D module, choose the token file the server printed "
                    "(SAM3D_TOKEN_FILE=...), or clear the server URL to run a local server."
                )
            self._connection = ServerConnection(spec.url, read_token(spec.token_file))
            return self._connection
        if self.local is None:
            self.local = LocalServer(serve_command(spec, self.python), self.env, self.cwd, self.start_timeout)
        try:
            found = self.local.poll()
        except ServerError:
            self.forget()
            raise
        if found is None:
            return None
        url, token_file = found
        self._connection = ServerConnection(url, read_token(token_file))
        return self._connection

    def wait_connection(self, spec: ServerSpec, timeout: float = 120.0):
        """Block until the connection is ready (scripts, tests, self-test)."""
        deadline = time.monotonic() + timeout
        while True:
            connection = self.connection(spec)
            if connection is not None:
                return connection
            if time.monotonic() > deadline:
                raise ServerError(f"The SAM 3D server did not start within {timeout:g} s.")
            time.sleep(0.05)

    def check(self) -> None:
        """Raise ServerError when the local server has died (a remote one is checked by its requests)."""
        if self.local is not None and self.local.ready:
            try:
                self.local.poll()
            except ServerError:
                self.forget()
                raise

    def forget(self) -> None:
        """After a failure: drop the connection and stop the local process; the next use restarts it."""
        self._connection = None
        if self.local is not None:
            self.local.stop()
            self.local = None

    def stop(self) -> None:
        self.forget()
        self._spec = None


_SHARED: ServerLink | None = None


def shared_server_link() -> ServerLink:
    """The one ServerLink of this Slicer session (effect, module panel and self-test share it);
    its local server is stopped when Slicer exits."""
    global _SHARED
    if _SHARED is None:
        import atexit

        _SHARED = ServerLink()
        atexit.register(_SHARED.stop)
    return _SHARED
