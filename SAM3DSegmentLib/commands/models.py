"""``sam3d models list | download NAME | verify NAME | path NAME``: the checkpoint cache."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "models", help="list, download and verify model checkpoints",
        description="Model checkpoints in the user cache ($SAM3D_CACHE_DIR overrides its location).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="registered models: family, size, cached or installed, prompts trained with, licence")
    download = actions.add_parser("download", help="download a checkpoint into the cache (resumes)")
    download.add_argument("name", help="model name from `sam3d models list`")
    download.add_argument("--force", action="store_true", help="download again even if a verified file is cached")
    download.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    verify = actions.add_parser("verify", help="check size, sha256 and that the file loads as its family")
    verify.add_argument("name", help="model name from `sam3d models list`")
    verify.add_argument("--checkpoint", metavar="FILE", help="verify this file instead of the cached one")
    path = actions.add_parser("path", help="print where the checkpoint is (or would be) cached")
    path.add_argument("name", help="model name from `sam3d models list`")
    parser.set_defaults(run=run)


def run(args) -> int:
    return {"list": _list, "download": _download, "verify": _verify, "path": _path}[args.action](args)


def _megabytes(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.0f} MB"


def _list(args) -> int:
    from ..models.checkpoint_cache import cache_dir, cached_path, package_file_path
    from ..models.registry import REGISTRY

    rows = [("NAME", "FAMILY", "INPUT", "SIZE", "CACHED", "TRAINED WITH", "LICENCE")]
    for spec in REGISTRY.values():
        path = cached_path(spec)
        if path.is_file():
            cached = "installed" if path == package_file_path(spec) else "yes"
        elif path.with_name(path.name + ".part").is_file():
            cached = "partial"
        else:
            cached = "no" if spec.direct_download else "no (manual)"
        size = f"{spec.input_size}^3 mm" if spec.resize == "isotropic_1mm" else f"{spec.input_size} px"
        rows.append((spec.name, spec.family, size, _megabytes(spec.file_size), cached,
                     spec.trained_prompts, spec.licence))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"\ncache: {cache_dir()}")
    renamed = [spec for spec in REGISTRY.values() if spec.published_filename]
    if renamed:
        print(f"\n{', '.join(spec.name for spec in renamed)}: local files only (engine volumetric, tumour models). "
              f"Their authors share each as {renamed[0].published_filename} on {renamed[0].url} ; "
              "copy it into the cache under the name `sam3d models path NAME` prints, or pass --checkpoint FILE "
              "--model NAME. No size or sha256 is published: `sam3d models verify NAME` checks that it loads.")
    return 0


class _ProgressBar:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last = -1

    def __call__(self, done: int, total: int | None) -> None:
        if total:
            percent = int(100 * done / total)
            if percent == self.last:
                return
            self.last = percent
            bar = "#" * (percent // 4)
            sys.stderr.write(f"\r{self.label} [{bar:<25}] {percent:3d}% {done / 1e6:.0f}/{total / 1e6:.0f} MB")
        else:
            sys.stderr.write(f"\r{self.label} {done / 1e6:.0f} MB")
        sys.stderr.flush()

    def close(self) -> None:
        if self.last >= 0:
            sys.stderr.write("\n")


def _download(args) -> int:
    from ..models.download import download
    from ..models.registry import get_spec

    spec = get_spec(args.name)
    bar = None if args.no_progress else _ProgressBar(spec.name)
    try:
        path = download(spec, progress=bar, force=args.force)
    finally:
        if bar is not None:
            bar.close()
    print(path)
    return 0


def _verify(args) -> int:
    from ..models.checkpoint_cache import verify
    from ..models.registry import get_spec

    spec = get_spec(args.name)
    report = verify(spec, args.checkpoint)
    if report.ok:
        checked = ", ".join(report.checked) or "present"
        unverified = "" if spec.sha256 else " (no published sha256 for this model)"
        print(f"{spec.name}: OK ({checked}){unverified}: {report.path}")
        return 0
    print(f"{spec.name}: FAILED: {report.path}", file=sys.stderr)
    for problem in report.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


def _path(args) -> int:
    from ..models.checkpoint_cache import cached_path
    from ..models.registry import get_spec

    spec = get_spec(args.name)
    path = cached_path(spec)
    print(path)
    if not path.is_file():
        from ..models.checkpoint_cache import how_to_get

        print(f"(not here yet. {how_to_get(spec)})", file=sys.stderr)
        return 1
    return 0
