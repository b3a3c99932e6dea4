"""Checkpoint downloads into the user cache: progress, HTTP Range resume, size/sha256 check, atomic rename.

The file is written as ``<name>.part`` and renamed into place only once it is complete and
verified, so an interrupted download never leaves a file that looks complete. Running the
download again resumes the ``.part`` file with an HTTP Range request.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from ..errors import DownloadError
from .checkpoint_cache import cached_path, how_to_get, record_sha256, sha256_of, verify
from .registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20

ProgressCallback = Callable[[int, "int | None"], None]
"""Called as ``progress(bytes_done, bytes_total_or_None)`` while downloading."""


def download(
    spec: ModelSpec | str,
    progress: ProgressCallback | None = None,
    *,
    force: bool = False,
    timeout: float = 30.0,
) -> Path:
    """Download the checkpoint of ``spec`` into the cache and return its path.

    An existing verified file is reused unless ``force``. Raises DownloadError on network
    failure (the partial file is kept for resuming), a truncated transfer, or a size/sha256
    mismatch (the bad partial file is deleted).
    """
    spec = get_spec(spec)
    final = cached_path(spec)
    if final.is_file() and not force:
        if verify(spec, final, load=False).ok:
            log.info("%s is already in the cache: %s", spec.name, final)
            return final
        log.warning("Cached %s failed verification; downloading again.", final)
    if not spec.direct_download:
        raise DownloadError(f"'{spec.name}' has no direct download. {how_to_get(spec)}")
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    if force and part.exists():
        part.unlink()
    _fetch_to_part(spec, part, progress, timeout)
    digest = _check_part(spec, part)
    os.replace(part, final)
    if digest:
        record_sha256(final, digest)
    log.info("Downloaded %s to %s", spec.name, final)
    return final


def _network_error(spec: ModelSpec, exc: BaseException) -> DownloadError:
    return DownloadError(
        f"Could not download '{spec.name}' from {spec.url}: {exc}. Check the network connection and run "
        f"`sam3d models download {spec.name}` again (it resumes), or download the file elsewhere and "
        "pass --checkpoint FILE."
    )


def _fetch_to_part(spec: ModelSpec, part: Path, progress: ProgressCallback | None, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    if spec.file_size is not None and have > spec.file_size:
        part.unlink()
        have = 0
    if spec.file_size is not None and have == spec.file_size:
        return  # a previous run got every byte; only the checks remain
    request = urllib.request.Request(spec.url, headers={"User-Agent": "sam3dsegment"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the part file may be complete
            return
        raise DownloadError(
            f"Download of '{spec.name}' from {spec.url} failed: HTTP {exc.code} {exc.reason}. "
            "Download the file elsewhere and pass --checkpoint FILE."
        ) from exc
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
        raise _network_error(spec, exc) from exc
    with response:
        if have and response.status == 206:
            mode = "ab"
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != have:
                part.unlink()
                raise DownloadError(
                    f"The server resumed '{spec.name}' at the wrong offset ({start}, expected {have}); the partial "
                    f"file was deleted. Run `sam3d models download {spec.name}` again."
                )
        else:
            mode, have = "wb", 0  # server ignored the Range request: start again
        length = response.headers.get("Content-Length")
        expected_now = int(length) if length is not None else None
        total = have + expected_now if expected_now is not None else spec.file_size
        done = have
        if progress:
            progress(done, total)
        try:
            with open(part, mode) as handle:
                while True:
                    block = response.read(CHUNK_BYTES)
                    if not block:
                        break
                    handle.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
        except (http.client.IncompleteRead, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
            raise _network_error(spec, exc) from exc
    if total is not None and done < total:
        raise DownloadError(
            f"Download of '{spec.name}' was truncated: got {done} of {total} bytes. Run "
            f"`sam3d models download {spec.name}` again to resume, or download the file elsewhere "
            "and pass --checkpoint FILE."
        )


def _content_range_start(header: str) -> int | None:
    """The first byte of a ``Content-Range: bytes START-END/TOTAL`` header, or None."""
    try:
        return int(header.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _check_part(spec: ModelSpec, part: Path) -> str | None:
    """Check size and sha256 of a part file the server has finished sending (a bad file is
    deleted); the verified sha256, or None when the registry has none."""
    size = part.stat().st_size
    if spec.file_size is not None and size != spec.file_size:
        part.unlink()
        raise DownloadError(
            f"Downloaded '{spec.name}' has {size} bytes, expected {spec.file_size}; the file was deleted. "
            f"Run `sam3d models download {spec.name}` again, or download it elsewhere and pass --checkpoint FILE."
        )
    if size == 0:
        part.unlink()
        raise DownloadError(f"Download of '{spec.name}' from {spec.url} gave an empty file.")
    if spec.sha256:
        actual = sha256_of(part)
        if actual != spec.sha256:
            part.unlink()
            raise DownloadError(
                f"Checksum mismatch for '{spec.name}': sha256 {actual}, expected {spec.sha256}. "
                f"The bad file was deleted; run `sam3d models download {spec.name}` again, or download "
                "it elsewhere and pass --checkpoint FILE."
            )
        return actual
    return None
