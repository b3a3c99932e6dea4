"""``sam3d serve``: serve segmentation sessions over HTTP to local or remote clients.

Listens on 127.0.0.1 unless ``--host`` says otherwise. Once the model is loaded it prints two
machine-readable lines on stdout, ``SAM3D_TOKEN_FILE=<path>`` and ``SAM3D_SERVER_URL=<url>``
(with ``--port 0`` the URL names the free port it bound). Without ``--token-file`` a random
token is written to a new file only the user can read. With ``--adapter`` every session of the
server's model gets the adapter; the file is checked against the model before the server binds its
port, and ``/v1/info`` names it. Clients cannot name adapter files. ``--engine volumetric`` serves
a 3DSAM-adapter model (include clicks only; a propagation is one 3D inference). See docs/server.md.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve segmentation sessions over HTTP (for Slicer, `sam3d segment --server`, remote GPUs)",
        description="Serve promptable segmentation sessions over HTTP with a bearer token. See docs/server.md.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 = all networks)")
    parser.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one (default 8765)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="file with the accepted token(s), one per line (default: a new random token in a "
                             "private file, whose path is printed)")
    parser.add_argument("--max-sessions", type=int, default=8, help="sessions open at once (default 8)")
    parser.add_argument("--max-volume-mb", type=float, default=1024.0,
                        help="largest volume accepted, in MB of voxels (default 1024)")
    parser.add_argument("--idle-timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="free a session after this long without requests (default 1800)")
    parser.add_argument("--lease", type=float, default=30.0, metavar="SECONDS",
                        help="free a session whose client stops polling its propagation for this long (default 30)")
    parser.add_argument("--cache-mb", type=float, default=2048.0,
                        help="image-feature cache budget shared by all sessions, in MB (default 2048)")
    parser.add_argument("--nninteractive-budget", type=float, default=40.0, metavar="SECONDS",
                        help="an nnInteractive client's prediction answers after at most this long of propagation, "
                             "with the slices done by then (its client waits 60 s; default 40; docs/nninteractive.md)")
    parser.add_argument("--engine", default="auto", choices=("auto", "weightfree", "slicewise", "sam2", "volumetric"),
                        help="default engine of the sessions (as for `sam3d segment`; volumetric: a 3DSAM-adapter "
                             "model with --model and --checkpoint, docs/volumetric.md)")
    parser.add_argument("--model", help="registry model name (see `sam3d models list`)")
    parser.add_argument("--checkpoint", metavar="FILE", help="local checkpoint file instead of the cache")
    parser.add_argument("--adapter", metavar="FILE",
                        help="an adapter from `sam3d finetune`, loaded on top of the model's weights for every "
                             "session of that model (checked at start; clients cannot name adapter files)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.set_defaults(run=run)


def server_tokens(token_file: str | None) -> tuple[list[str], Path, Path | None]:
    """(tokens, token file, folder to remove at exit): read ``token_file``, or make a private one."""
    from ..serving.client import read_tokens

    if token_file:
        path = Path(token_file).expanduser()
        tokens = read_tokens(path)
        if os.name == "posix" and path.stat().st_mode & 0o077:
            log.warning("token file %s can be read by other users; chmod 600 it", path)
        return tokens, path, None
    folder = Path(tempfile.mkdtemp(prefix="sam3d-serve-"))  # mode 0700
    path = folder / "token"
    token = secrets.token_urlsafe(32)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as file:
        file.write(token + "\n")
    return [token], path, folder


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: a free port)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise InputError(f"Cannot listen on {host}:{port} ({exc.strerror}); pick another --port (0: any free one).") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def stopped(signum, frame) -> None:
    """SIGTERM: leave through the ``finally`` that frees the sessions and removes the token folder."""
    raise SystemExit(0)


def run(args) -> int:
    import uvicorn

    from ..engines.choice import choose_engine
    from ..serving.app import create_app
    from ..serving.store import MB, ServerCore, ServerLimits

    for name in ("max_sessions", "max_volume_mb", "idle_timeout", "lease", "cache_mb", "nninteractive_budget"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}.")
    choice = choose_engine(args.engine, args.model, args.checkpoint, args.adapter)
    log.info("engine: %s (%s)", choice.engine, choice.reason)
    max_volume = int(args.max_volume_mb * MB)
    limits = ServerLimits(
        max_sessions=args.max_sessions, max_volume_bytes=max_volume, idle_timeout_s=args.idle_timeout,
        lease_s=args.lease, cache_bytes=int(args.cache_mb * MB), volume_budget_bytes=max(4 * max_volume, 4096 * MB),
        prediction_budget_s=args.nninteractive_budget,
    )
    core = ServerCore(choice, limits, device=None if args.device == "auto" else args.device)  # reads the adapter
    tokens, token_path, private_folder = server_tokens(args.token_file)
    app = create_app(core, tokens)
    sock = None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stopped)  # uvicorn stops on SIGTERM, then raises it again
    try:
        core.start()  # loads the model (and checks the adapter) before listening: the URL line means "ready"
        sock = bind(args.host, args.port)
        if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
            log.warning("listening beyond this machine on %s; clients need the token in %s", args.host, token_path)
        print(f"SAM3D_TOKEN_FILE={token_path}", flush=True)
        print(f"SAM3D_SERVER_URL={url_of(sock)}", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        core.stop()
        if sock is not None:
            sock.close()
        if private_folder is not None:
            shutil.rmtree(private_folder, ignore_errors=True)
    return 0
