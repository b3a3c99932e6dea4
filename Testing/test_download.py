"""Checkpoint downloads against a local HTTP server on 127.0.0.1 (with Range support):
progress, resume, checksum mismatch, truncation, atomic rename, network errors."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import socket
import threading

import pytest
import torch

from SAM3DSegmentLib.errors import DownloadError
from SAM3DSegmentLib.models import checkpoint_cache, download
from SAM3DSegmentLib.models.registry import get_spec

PAYLOAD = bytes(range(256)) * 1200  # 307200 bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` unless the path says otherwise.

    /truncated/...: announces the full length but sends half, then closes.
    /norange/...: ignores Range and always sends the whole file.
    """

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        name = self.path.rsplit("/", 1)[-1]
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and not self.path.startswith("/norange/"):
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/truncated/"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files = {"model.pt": PAYLOAD}
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(download, "CHUNK_BYTES", 1 << 15)


def _spec(server, prefix="", **changes):
    host, port = server.server_address
    facts = dict(
        url=f"http://{host}:{port}/{prefix}model.pt",
        filename="model.pt",
        file_size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    )
    facts.update(changes)
    return dataclasses.replace(get_spec("sam2.1_hiera_tiny"), **facts)


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM3D_CACHE_DIR", str(tmp_path / "mine"))
    assert checkpoint_cache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SAM3D_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(checkpoint_cache.sys, "platform", "linux")
    assert checkpoint_cache.cache_dir() == tmp_path / "xdg" / "sam3dsegment"


def test_download_with_progress_and_atomic_rename(server):
    spec = _spec(server)
    seen = []
    path = download.download(spec, progress=lambda done, total: seen.append((done, total)), timeout=5)
    assert path == checkpoint_cache.cache_dir() / "model.pt"
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name("model.pt.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert len(seen) > 5 and all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))
    assert checkpoint_cache.verify(spec, load=False).ok
    # A second call reuses the verified file without a request.
    count = len(server.requests)
    assert download.download(spec, timeout=5) == path
    assert len(server.requests) == count


def test_resume_sends_range_and_appends(server):
    spec = _spec(server)
    final = checkpoint_cache.cached_path(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name("model.pt.part")
    part.write_bytes(PAYLOAD[:100_000])
    seen = []
    download.download(spec, progress=lambda done, total: seen.append(done), timeout=5)
    assert server.requests[-1][1] == "bytes=100000-"
    assert seen[0] == 100_000
    assert final.read_bytes() == PAYLOAD and not part.exists()


def test_server_ignoring_range_restarts_cleanly(server):
    spec = _spec(server, prefix="norange/")
    final = checkpoint_cache.cached_path(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    final.with_name("model.pt.part").write_bytes(b"x" * 5000)
    download.download(spec, timeout=5)
    assert final.read_bytes() == PAYLOAD


def test_checksum_mismatch_deletes_partial_file(server):
    spec = _spec(server, sha256="0" * 64)
    with pytest.raises(DownloadError, match="Checksum mismatch.*deleted"):
        download.download(spec, timeout=5)
    final = checkpoint_cache.cached_path(spec)
    assert not final.exists() and not final.with_name("model.pt.part").exists()


def test_truncated_transfer_never_looks_complete_then_resumes(server):
    spec = _spec(server, prefix="truncated/")
    with pytest.raises(DownloadError, match="truncated.*again to resume"):
        download.download(spec, timeout=5)
    final = checkpoint_cache.cached_path(spec)
    part = final.with_name("model.pt.part")
    assert not final.exists()
    assert 0 < part.stat().st_size < len(PAYLOAD)
    kept = part.stat().st_size
    download.download(_spec(server), timeout=5)  # the same file from a healthy mirror: resumes
    assert server.requests[-1][1] == f"bytes={kept}-"
    assert final.read_bytes() == PAYLOAD


def test_interrupted_download_leaves_only_part_file(server):
    spec = _spec(server)

    def interrupt(done, total):
        if done > 64_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download.download(spec, progress=interrupt, timeout=5)
    final = checkpoint_cache.cached_path(spec)
    assert not final.exists() and final.with_name("model.pt.part").exists()
    assert not checkpoint_cache.verify(spec).ok


def test_wrong_size_from_server_is_deleted(server):
    spec = _spec(server, file_size=len(PAYLOAD) + 10, sha256=None)
    with pytest.raises(DownloadError, match="expected"):
        download.download(spec, timeout=5)
    final = checkpoint_cache.cached_path(spec)
    assert not final.exists() and not final.with_name("model.pt.part").exists()


def test_no_network_and_http_errors(server):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    spec = _spec(server, url=f"http://127.0.0.1:{closed_port}/model.pt")
    with pytest.raises(DownloadError, match="download the file elsewhere and pass --checkpoint FILE"):
        download.download(spec, timeout=5)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download.download(_spec(server, url=_spec(server).url.replace("model.pt", "missing.pt")), timeout=5)


def test_verify_reports_problems(tmp_path):
    spec = dataclasses.replace(get_spec("sam2.1_hiera_tiny"), file_size=None, sha256=None, filename="tiny.pt")
    assert "does not exist" in checkpoint_cache.verify(spec).problems[0]
    path = checkpoint_cache.cached_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"memory_attention.layers.0.weight": torch.zeros(3)}}, path)
    report = checkpoint_cache.verify(spec)
    assert report.ok, report.problems
    assert "loads as sam2" in report.checked
    wrong = dataclasses.replace(get_spec("sam_vit_b"), file_size=None, sha256=None, filename="tiny.pt")
    assert "SAM 2" in checkpoint_cache.verify(wrong).problems[0]
    sized = dataclasses.replace(spec, file_size=1)
    assert "expected 1" in checkpoint_cache.verify(sized).problems[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint_cache.verify(dataclasses.replace(spec, sha256=digest)).ok
    assert "sha256" in checkpoint_cache.verify(dataclasses.replace(spec, sha256="1" * 64)).problems[0]


def test_cli_download_with_progress_bar(server, monkeypatch, capsys):
    from SAM3DSegmentLib.commands.cli import main
    from SAM3DSegmentLib.models import registry

    monkeypatch.setitem(registry.REGISTRY, "sam2.1_hiera_tiny", _spec(server))
    assert main(["models", "download", "sam2.1_hiera_tiny"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(checkpoint_cache.cache_dir() / "model.pt")
    assert "100%" in captured.err
    assert main(["models", "verify", "sam2.1_hiera_tiny"]) == 1  # random bytes: not a checkpoint
    assert "cannot be read" in capsys.readouterr().err


def test_sha256_recorded_at_download_and_tampering_detected(server):
    import os

    from SAM3DSegmentLib.errors import CheckpointError
    from SAM3DSegmentLib.models.checkpoint_cache import resolve_checkpoint

    spec = _spec(server)
    path = download.download(spec, timeout=5)
    assert checkpoint_cache.recorded_sha256(path) == spec.sha256
    assert resolve_checkpoint(spec) == path
    # Same size, different bytes, later modification time: the record no longer applies.
    tampered = bytearray(PAYLOAD)
    tampered[0] ^= 0xFF
    path.write_bytes(bytes(tampered))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert checkpoint_cache.recorded_sha256(path) is None
    with pytest.raises(CheckpointError, match="failed verification.*sha256"):
        resolve_checkpoint(spec)
