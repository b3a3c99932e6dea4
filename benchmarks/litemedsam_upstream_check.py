"""Check our re-implementation of LiteMedSAM's published 3D pipeline against the reference figures.

For every target of ``cases.json`` (or those asked for) runs, with the real LiteMedSAM weights on
the CPU, the protocols of ``../shared/reference/README.md`` through
:mod:`SAM3DSegmentLib.evaluation.upstream_litemedsam`:

- A: start box on ``z_mid`` (upstream's ``int((z_max - z_min) / 2 + z_min)`` of the label's
  z-range), z-range given; run with the end slices included (``limits="inclusive"``, which is what
  reproduces the reference) and, from the same embeddings, with upstream's exclusive loop limits
  (``A_excl``) and from the largest slice (``A_maxarea``);
- B: same start, no z-range, until the mask vanishes;
- oracle: tight box on every slice with the target (margin 0), and ``_s5`` (inference_3D.py's 5 px).

Prints per target our Dice / NSD at 2 mm (whole volume) next to the reference CSV's and the
difference, then the means. Slice embeddings are shared between protocols and targets of a case
(one encoder forward per slice and view), so times are encoder totals, not upstream's ``sec_A``.

    .venv/bin/python benchmarks/litemedsam_upstream_check.py [--cases a,b] [--targets t1,t2]
        [--orientation canonical|raw|both] [--canonical-view radiological|radiological+flip_cols|...]
        [--protocols A,B,oracle,oracle5] [--out results.csv]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from SAM3DSegmentLib.data.orientation import SliceView, radiological_view
from SAM3DSegmentLib.evaluation.datasets import (
    case_targets,
    load_case,
    open_dataset,
    select_cases,
    target_mask,
)
from SAM3DSegmentLib.evaluation.metrics import evaluate_masks
from SAM3DSegmentLib.evaluation.upstream_litemedsam import (
    EmbeddingCache,
    StartBox,
    largest_slice,
    oracle_box_every_slice,
    upstream_3d_pipeline,
    upstream_intensities,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CANONICAL_VIEWS = ("radiological", "radiological+flip_cols", "radiological+flip_rows", "radiological+transpose")
PROTOCOLS = ("A", "B", "oracle", "oracle5")
# (our column, reference CSV column) pairs per protocol
COLUMNS = {
    "A": [("dice_A", "dice_A"), ("nsd_A", "nsd_A"), ("dice_A_excl", None),
          ("dice_A_maxarea", "dice_A_maxarea"), ("nsd_A_maxarea", "nsd_A_maxarea")],
    "B": [("dice_B", "dice_B"), ("nsd_B", "nsd_B"), ("slices_B", "slices_B")],
    "oracle": [("dice_oracle", "dice_oracle"), ("nsd_oracle", "nsd_oracle")],
    "oracle5": [("dice_oracle_s5", "dice_oracle_s5"), ("nsd_oracle_s5", "nsd_oracle_s5")],
}


def canonical_view(ijk_to_ras: np.ndarray, shape: tuple[int, int], which: str) -> SliceView:
    """The radiological view of axis 0, optionally with one more flip/transpose (the candidates)."""
    view = radiological_view(ijk_to_ras, 0, shape)
    if which == "radiological+flip_cols":
        view = replace(view, flip_cols=not view.flip_cols)
    elif which == "radiological+flip_rows":
        view = replace(view, flip_rows=not view.flip_rows)
    elif which == "radiological+transpose":
        view = replace(view, transpose=not view.transpose)
    return view


def read_reference(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    if not path.is_file():
        print(f"warning: reference CSV {path} not found; printing our figures only", file=sys.stderr)
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        return {(r["case"], r["target"], r["orientation"]): r for r in csv.DictReader(handle)}


def as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def run_target(model, image, gt, spacing, view, cache, protocols) -> dict[str, float]:
    """Our figures for one target in one view."""
    out: dict[str, float] = {}
    start = StartBox.from_reference(gt)
    out.update(z_min=start.z_min, z_max=start.z_max, z_mid=start.z_start, z_maxarea=largest_slice(gt),
               gt_slices=int(gt.any(axis=(1, 2)).sum()))

    def score(prefix: str, result) -> None:
        metrics = evaluate_masks(result.mask, gt, spacing)
        out[f"dice_{prefix}"], out[f"nsd_{prefix}"] = metrics.dice, metrics.nsd
        out[f"slices_{prefix}"] = result.slices_encoded

    if "A" in protocols:
        tic = time.perf_counter()
        score("A", upstream_3d_pipeline(model, image, start, view=view, limits="inclusive", cache=cache))
        out["sec_A"] = time.perf_counter() - tic
        score("A_excl", upstream_3d_pipeline(model, image, start, view=view, limits="upstream", cache=cache))
        maxarea = StartBox.from_reference(gt, z_start=int(out["z_maxarea"]))
        score("A_maxarea", upstream_3d_pipeline(model, image, maxarea, view=view, limits="inclusive", cache=cache))
    if "B" in protocols:
        score("B", upstream_3d_pipeline(model, image, start, z_range=False, view=view, cache=cache))
    if "oracle" in protocols:
        score("oracle", oracle_box_every_slice(model, image, gt, margin_px=0, view=view, cache=cache))
    if "oracle5" in protocols:
        score("oracle_s5", oracle_box_every_slice(model, image, gt, margin_px=5, view=view, cache=cache))
    return out


def cell(name: str, ours: float, theirs: float) -> str:
    """'name ours/reference/difference' (integers for slice counts, '-' where missing)."""
    integer = name.startswith("slices")

    def fmt(value: float, signed: bool = False) -> str:
        if math.isnan(value):
            return "-"
        if integer:
            return f"{int(round(value)):+d}" if signed else f"{int(round(value))}"
        if signed and abs(value) < 5e-5:
            value = 0.0  # no "-0.0000"
        return f"{value:+.4f}" if signed else f"{value:.4f}"

    return f"{name} {fmt(ours)}/{fmt(theirs)}/{fmt(ours - theirs, signed=True)}"


GEOMETRY = ("z_min", "z_max", "z_mid", "z_maxarea", "gt_slices")


def print_row(row: dict, columns, note: str = "") -> None:
    """One target's line: every protocol's cell, and a flag when the z geometry differs from the reference."""
    cells = [cell(mine, float(row.get(mine, math.nan)), float(row.get(f"ref_{mine}", math.nan)))
             for mine, _ in columns]
    geometry = [k for k in GEOMETRY
                if not math.isnan(float(row.get(f"ref_{k}", math.nan)))
                and int(float(row[k])) != int(float(row[f"ref_{k}"]))]
    flag = f"  GEOMETRY DIFFERS: {geometry}" if geometry else ""
    print(f"{row['case']:28s} {row['target']:16s} {row['orientation']:9s} " + " | ".join(cells) + flag + note,
          flush=True)


def write_rows(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    """Rows of a previous --out CSV, numbers as floats."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    text = ("case", "target", "orientation", "view")
    return [{k: (v if k in text else as_float(v)) for k, v in r.items()} for r in rows]


def print_means(rows: list[dict], orientations: list[str], columns) -> None:
    """Means over targets per orientation: ours / reference / difference, and the largest |difference|."""
    print("\nmeans over targets (ours/reference/difference; max |difference|):")
    for orientation in orientations:
        subset = [r for r in rows if r["orientation"] == orientation]
        if not subset:
            continue
        parts = []
        for mine, theirs in columns:
            if mine.startswith("slices"):
                continue
            ours_v = np.array([float(r.get(mine, math.nan)) for r in subset])
            refs_v = np.array([float(r.get(f"ref_{mine}", math.nan)) for r in subset])
            ok = ~np.isnan(refs_v)
            if theirs is not None and ok.any():
                diffs = ours_v[ok] - refs_v[ok]
                mean_diff = 0.0 if abs(diffs.mean()) < 5e-5 else diffs.mean()  # no "-0.0000"
                parts.append(f"{mine} {ours_v[ok].mean():.4f}/{refs_v[ok].mean():.4f}/{mean_diff:+.4f}; "
                             f"max {np.abs(diffs).max():.4f}")
            elif (~np.isnan(ours_v)).any():
                parts.append(f"{mine} {np.nanmean(ours_v):.4f}")
        print(f"  {orientation} ({len(subset)} targets):\n    " + "\n    ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "data"), help="cases.json or its folder")
    parser.add_argument("--reference", default=str(SHARED / "reference" / "litemedsam_upstream_pipeline.csv"))
    parser.add_argument("--cases", default="", help="comma-separated case names (default all)")
    parser.add_argument("--targets", default="", help="comma-separated targets (default each case's own)")
    parser.add_argument("--orientation", choices=("canonical", "raw", "both"), default="canonical")
    parser.add_argument("--canonical-view", choices=CANONICAL_VIEWS, default="radiological",
                        help="which view stands for the reference's 'canonical' (candidates for checking it)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated subset of {PROTOCOLS}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the reference used 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="", help="write our figures (and the reference's) to this CSV")
    parser.add_argument("--resume", default="", help="a previous --out CSV: its rows are kept, not recomputed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from SAM3DSegmentLib.models.builders import build_model
    from SAM3DSegmentLib.models.checkpoint_cache import resolve_checkpoint

    torch.set_num_threads(args.threads)
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        parser.error(f"unknown protocols {sorted(unknown)}; choose from {PROTOCOLS}")
    orientations = ["canonical", "raw"] if args.orientation == "both" else [args.orientation]
    reference = read_reference(Path(args.reference))
    cases = select_cases(open_dataset(args.data), [c for c in args.cases.split(",") if c])
    wanted = [t for t in args.targets.split(",") if t]
    model = build_model("litemedsam", resolve_checkpoint("litemedsam"), args.device)
    columns = [pair for p in protocols for pair in COLUMNS[p]]

    print(f"canonical view = {args.canonical_view}; protocols {protocols}; {args.threads} threads; "
          "each cell: ours / reference / ours - reference")
    rows = read_rows(Path(args.resume)) if args.resume else []
    done = {(r["case"], r["target"], r["orientation"]) for r in rows}
    for row in rows:
        print_row(row, columns, note="  (resumed)")
    started = time.perf_counter()
    encoded = encode_seconds = 0.0
    for case in cases:
        if case.targets and all((case.name, t, o) in done for t in case_targets(case, np.zeros(1), wanted or None)
                                for o in orientations):
            continue
        volume, label = load_case(case)
        image = upstream_intensities(volume.array, case.modality)
        cache = EmbeddingCache(image)  # one per case: raw and canonical share slices when the views agree
        for target in case_targets(case, label, wanted or None):
            gt = target_mask(case, label, target)
            if not gt.any():
                print(f"{case.name}/{target}: empty label, skipped")
                continue
            for orientation in orientations:
                if (case.name, target, orientation) in done:
                    continue
                view = (canonical_view(volume.ijk_to_ras, volume.shape[1:], args.canonical_view)
                        if orientation == "canonical" else None)
                ours = run_target(model, image, gt, volume.spacing_kji, view, cache, protocols)
                ref = reference.get((case.name, target, orientation), {})
                row = {"case": case.name, "target": target, "orientation": orientation,
                       "view": repr(view) if view is not None else "raw", **ours}
                for mine, theirs in columns:
                    row[f"ref_{mine}"] = as_float(ref.get(theirs)) if theirs else math.nan
                for key in GEOMETRY:
                    row[f"ref_{key}"] = as_float(ref.get(key))
                rows.append(row)
                print_row(row, columns)
                if args.out:
                    write_rows(Path(args.out), rows)  # after every target: a long run can be resumed
        encoded += cache.encoded
        encode_seconds += cache.encode_seconds
        cache.clear()

    print_means(rows, orientations, columns)
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s (this run); {int(encoded)} encoder forwards, "
          f"{encode_seconds / max(encoded, 1):.2f} s each on average")
    if args.out and rows:
        write_rows(Path(args.out), rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
