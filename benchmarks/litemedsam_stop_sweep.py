"""Tune the stop rule for LiteMedSAM's box-chaining propagation on ../shared/data.

Three modes:

``trace``  (model, slow): per target, the simulated user's box on the target's largest slice
    (``SimulatedUser("box", 0.0, user_seed(0, case, target))``), one LiteMedSAM session per case
    (axis 0, default options; the targets of a case share the slice embeddings), propagated in
    both directions with a permissive rule (area >= 1 px, no other test, endless patience) but
    bounded to the target's z-extent plus ``--beyond`` (12) slices past each end. Saves per
    visited slice: index, reference area, mask area, predicted IoU (score), stability, overlap
    (Dice with the previous non-empty mask: the engine's prompt source), likeness (against the
    anchor mask's ``IntensityRange``, as the engine computes it), 2D Dice and intersection with
    the reference, and the masks; one ``<case>__<target>.npz`` per target and ``traces.csv``.

``sweep``  (offline, no model): replays candidate stop rules on the traces. Each run is walked
    outwards from the anchor; a slice is absent when the rule says so (left empty); the run stops
    after ``patience`` absent slices in a row. The replay is exact up to the first absent slice:
    after it the real engine prompts the next slice from the last PRESENT mask, the trace from
    the previous mask. Rules that never stop are capped at the trace's range (+12 slices), so
    their Dice is optimistic. Prints the best outcomes, the single-test rules, the pre-sweep default,
    a leave-one-case-out estimate and the best rule per target next to upstream's dice_A / dice_B.

``verify`` (model, slow): the real engine end to end with the rule given by the flags (no slice
    range, no simulation), on all targets; per-target and mean Dice, NSD, HD95, slices.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/litemedsam_stop_sweep.py trace [--out /tmp/stop_traces]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/litemedsam_stop_sweep.py sweep [--out /tmp/stop_traces]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/litemedsam_stop_sweep.py verify --min-area 10 \\
        --min-score 0.5 --min-likeness 0.5 --patience 2 [--csv verify.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SAM3DSegmentLib.data.volume import get_slice  # noqa: E402
from SAM3DSegmentLib.engines.session import IntensityRange, PropagationOptions, StopRule  # noqa: E402
from SAM3DSegmentLib.evaluation.correction_rounds import user_seed  # noqa: E402
from SAM3DSegmentLib.evaluation.datasets import (  # noqa: E402
    case_targets,
    load_case,
    open_dataset,
    select_cases,
    target_mask,
)
from SAM3DSegmentLib.evaluation.metrics import evaluate_masks  # noqa: E402
from SAM3DSegmentLib.evaluation.simulated_user import SimulatedUser, slice_areas  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_UPSTREAM = ROOT.parent / "shared" / "reference" / "litemedsam_upstream_pipeline.csv"
PERMISSIVE = StopRule(min_area=1, min_score=None, min_stability=None, min_overlap=None,
                      min_likeness=None, patience=10**6)
PRE_SWEEP_DEFAULT = StopRule(min_area=10, min_score=0.5, min_stability=None, min_overlap=None,
                             min_likeness=0.5, patience=2)
"""The library's default before this sweep (the baseline every table compares with)."""
AXIS = 0
SAME_IMAGE = {"ct_upper_abdomen_totalseg": "ct_abdomen_totalseg"}
"""Cases that are crops of another case's image (ct_upper_abdomen_totalseg is slices 82-111 of
ct_abdomen_totalseg, voxel for voxel): one fold in the leave-one-case-out estimate."""

GRID = {
    "min_area": (1, 10, 50),
    "min_score": (None, 0.5, 0.6, 0.7, 0.8),
    "min_stability": (None, 0.6, 0.8, 0.9),
    "min_overlap": (None, 0.3, 0.5, 0.7),
    "min_likeness": (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    "patience": (1, 2, 3),
}


# --- shared helpers ------------------------------------------------------------------------------

def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def _model():
    from SAM3DSegmentLib.models.builders import build_model
    from SAM3DSegmentLib.models.checkpoint_cache import resolve_checkpoint

    return build_model("litemedsam", resolve_checkpoint("litemedsam"), "cpu")


def _targets(args):
    """(case, volume, label, [(target, reference)]) per selected case, loaded lazily."""
    cases = select_cases(open_dataset(args.data), args.cases)
    for case in cases:
        volume, label = load_case(case)
        chosen = []
        for target in case_targets(case, label, args.targets):
            reference = target_mask(case, label, target)
            if reference.any():
                chosen.append((target, reference))
        if chosen:
            yield case, volume, label, chosen


def _z_extent(reference: np.ndarray) -> tuple[int, int]:
    present = np.flatnonzero(slice_areas(reference, AXIS))
    return int(present[0]), int(present[-1])


def _upstream(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {
            (row["case"], row["target"]): {"A": float(row["dice_A"]), "B": float(row["dice_B"]),
                                           "nsd_A": float(row["nsd_A"]), "nsd_B": float(row["nsd_B"])}
            for row in csv.DictReader(handle) if row["orientation"] == "canonical"
        }


def _rule_text(rule: StopRule) -> str:
    def f(v):
        return "-" if v is None else f"{v:g}"
    return (f"area {rule.min_area:>2}  score {f(rule.min_score):>3}  stab {f(rule.min_stability):>3}  "
            f"overlap {f(rule.min_overlap):>3}  like {f(rule.min_likeness):>3}  pat {rule.patience}")


def _active_tests(rule: StopRule) -> int:
    return sum(v is not None for v in (rule.min_score, rule.min_stability, rule.min_overlap, rule.min_likeness))


def _dice_2d(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


class _Recorder:
    """Wraps a SlicePredictor and keeps every result it returns, in call order."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[int, bool, object]] = []

    @property
    def slices_encoded(self) -> int:
        return self.inner.slices_encoded

    def predict(self, index, prompt, previous=None):
        result = self.inner.predict(index, prompt, previous=previous)
        self.calls.append((int(index), previous is not None, result))
        return result

    def __getattr__(self, name):
        return getattr(self.inner, name)


# --- trace -------------------------------------------------------------------------------------

def _start_prompt(start: str, case: str, target: str, reference: np.ndarray, volume):
    """The simulated user's box on the largest slice, or ("middle") the tight box on the middle
    slice of the target's z-range, upstream LiteMedSAM's protocol (dice_A / dice_B)."""
    from SAM3DSegmentLib.data.prompts import SlicePrompt
    from SAM3DSegmentLib.evaluation.simulated_user import bounding_box

    if start == "largest":
        return SimulatedUser("box", 0.0, user_seed(0, case, target)).initial_prompt(reference, AXIS, volume.spacing_kji)
    z_lo, z_hi = _z_extent(reference)
    middle = (z_lo + z_hi) // 2
    return SlicePrompt(AXIS, middle, box=bounding_box(get_slice(reference, AXIS, middle)))


def trace(args) -> int:
    from SAM3DSegmentLib.engines.sam_slice_predictor import open_sam_session

    _threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _model()
    csv_rows = []
    started_all = time.perf_counter()
    encoded_all = 0
    for case, volume, _label, chosen in _targets(args):
        session = open_sam_session(volume, AXIS, model, "litemedsam", device="cpu")
        recorder = _Recorder(session.predictor)
        session.predictor = recorder
        n_slices = volume.n_slices(AXIS)
        try:
            for object_id, (target, reference) in enumerate(chosen, start=1):
                z_lo, z_hi = _z_extent(reference)
                span = (max(0, z_lo - args.beyond), min(n_slices - 1, z_hi + args.beyond))
                prompt = _start_prompt(args.start, case.name, target, reference, volume)
                recorder.calls.clear()
                encoded_before = recorder.slices_encoded
                started = time.perf_counter()
                session.add_prompt(object_id, prompt)
                result = session.propagate(object_id, PropagationOptions(slice_range=span, stop=PERMISSIVE))
                seconds = time.perf_counter() - started
                encoded = recorder.slices_encoded - encoded_before
                encoded_all += encoded
                anchor = prompt.index
                anchor_result = session.anchor_result(object_id, anchor)
                tissue = IntensityRange.of(get_slice(volume.array, AXIS, anchor), anchor_result.mask)
                rows = [(anchor, 0, anchor_result, anchor_result.mask)]
                sources = {-1: anchor_result.mask, +1: anchor_result.mask}
                for index, propagated, res in recorder.calls:
                    if not propagated:
                        continue
                    step = 1 if index > anchor else -1
                    rows.append((index, step, res, sources[step]))
                    if res.mask.any():  # the permissive rule keeps every non-empty mask as the source
                        sources[step] = res.mask
                record = {k: [] for k in ("index", "step", "ref_area", "area", "score", "stability",
                                          "overlap", "likeness", "inter", "dice2d")}
                masks = []
                for index, step, res, source in rows:
                    mask = np.asarray(res.mask, dtype=bool)
                    ref = get_slice(reference, AXIS, index)
                    area = int(mask.sum())
                    overlap = np.nan if step == 0 else _dice_2d(mask, source)
                    like = tissue.likeness(get_slice(volume.array, AXIS, index), mask) if tissue else None
                    record["index"].append(index)
                    record["step"].append(step)
                    record["ref_area"].append(int(ref.sum()))
                    record["area"].append(area)
                    record["score"].append(np.nan if res.score is None else float(res.score))
                    record["stability"].append(np.nan if res.stability is None else float(res.stability))
                    record["overlap"].append(overlap)
                    record["likeness"].append(np.nan if like is None else like)
                    record["inter"].append(int(np.count_nonzero(mask & ref)))
                    record["dice2d"].append(_dice_2d(mask, ref))
                    masks.append(mask)
                assembled = np.zeros(volume.shape, dtype=bool)
                for index, mask in zip(record["index"], masks):
                    get_slice(assembled, AXIS, index)[...] = mask
                if not np.array_equal(assembled, result.mask):
                    print(f"WARNING {case.name}/{target}: recorded masks differ from the engine's result")
                np.savez_compressed(
                    out / f"{case.name}__{target}.npz",
                    case=case.name, target=target, spacing=volume.spacing_kji, shape=np.array(volume.shape),
                    anchor=anchor, z_lo=z_lo, z_hi=z_hi, span=np.array(span), seconds=seconds,
                    slices_encoded=encoded, slices_visited=len(rows), reference=reference,
                    masks=np.stack(masks),
                    box=np.array([prompt.box.row0, prompt.box.col0, prompt.box.row1, prompt.box.col1]),
                    **{k: np.array(v) for k, v in record.items()},
                )
                full = evaluate_masks(result.mask, reference, volume.spacing_kji)
                for i in range(len(rows)):
                    csv_rows.append({"case": case.name, "target": target, "z_lo": z_lo, "z_hi": z_hi,
                                     **{k: record[k][i] for k in record}})
                print(f"{case.name}/{target}: anchor {anchor} (2D Dice {record['dice2d'][0]:.3f}, score "
                      f"{record['score'][0]:.2f}), object {z_lo}..{z_hi}, traced {span[0]}..{span[1]}, "
                      f"{len(rows)} slices, {encoded} encoded, {seconds:.1f} s; permissive Dice {full.dice:.3f}",
                      flush=True)
        finally:
            session.close()
    with open(out / "traces.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        for row in csv_rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    print(f"trace: {len(csv_rows)} slice results, {encoded_all} slices encoded, "
          f"{time.perf_counter() - started_all:.0f} s in all; written to {out}")
    return 0


# --- sweep -------------------------------------------------------------------------------------

@dataclass
class _Run:
    index: np.ndarray
    area: np.ndarray
    score: np.ndarray
    stability: np.ndarray
    overlap: np.ndarray
    likeness: np.ndarray
    inter: np.ndarray
    beyond: np.ndarray   # slices past the object's end in this run's direction (<= 0 inside)
    has_ref: np.ndarray


@dataclass
class _Trace:
    case: str
    target: str
    path: Path
    anchor: int
    anchor_area: int
    anchor_inter: int
    ref_total: int
    z_lo: int
    z_hi: int
    span: tuple[int, int]
    runs: tuple[_Run, _Run]
    anchor_dice2d: float
    seconds: float
    slices_encoded: int


def _load_traces(out: Path) -> list[_Trace]:
    traces = []
    for path in sorted(out.glob("*__*.npz")):
        z = np.load(path)
        step = z["step"]
        a = int(np.flatnonzero(step == 0)[0])
        z_lo, z_hi = int(z["z_lo"]), int(z["z_hi"])
        runs = []
        for direction in (-1, 1):
            sel = np.flatnonzero(step == direction)  # already in visiting order
            index = z["index"][sel]
            beyond = index - z_hi if direction == 1 else z_lo - index
            runs.append(_Run(index, z["area"][sel], z["score"][sel], z["stability"][sel], z["overlap"][sel],
                             z["likeness"][sel], z["inter"][sel], beyond, z["ref_area"][sel] > 0))
        traces.append(_Trace(str(z["case"]), str(z["target"]), path, int(z["anchor"]), int(z["area"][a]),
                             int(z["inter"][a]), int(z["reference"].sum()), z_lo, z_hi,
                             tuple(int(v) for v in z["span"]), tuple(runs), float(z["dice2d"][a]),
                             float(z["seconds"]), int(z["slices_encoded"])))
    return traces


def _absent(run: _Run, rule: StopRule) -> np.ndarray:
    absent = run.area < rule.min_area
    with np.errstate(invalid="ignore"):
        if rule.min_score is not None:
            absent |= run.score < rule.min_score
        if rule.min_stability is not None:
            absent |= run.stability < rule.min_stability
        if rule.min_overlap is not None:
            absent |= run.overlap < rule.min_overlap
        if rule.min_likeness is not None:
            absent |= run.likeness < rule.min_likeness  # NaN (empty mask) is caught by the area test
    return absent


def _replay(run: _Run, rule: StopRule) -> tuple[np.ndarray, int]:
    """(kept flags over the encoded slices, slices encoded) of one run under ``rule``."""
    absent = _absent(run, rule)
    patience = max(1, rule.patience)
    n = len(absent)
    encoded = n
    if n >= patience:
        in_a_row = np.convolve(absent.astype(np.int32), np.ones(patience, np.int32), "valid")
        hits = np.flatnonzero(in_a_row == patience)
        if hits.size:
            encoded = int(hits[0]) + patience
    return ~absent[:encoded], encoded


@dataclass
class _Outcome:
    dice: float
    overshoot: int      # furthest kept slice past the object's end (max over both directions)
    undershoot: int     # reference slices left empty (outside the anchor)
    encoded: int        # slices encoded, anchor included
    encoded_beyond: int
    kept: tuple         # per run, indices of kept slices (the outcome's signature)


def _simulate(t: _Trace, rule: StopRule) -> _Outcome:
    inter, area = t.anchor_inter, t.anchor_area
    overshoot, undershoot, encoded, beyond_count = 0, 0, 1, 0
    kept_sets = []
    for run in t.runs:
        kept, n = _replay(run, rule)
        inter += int(run.inter[:n][kept].sum())
        area += int(run.area[:n][kept].sum())
        beyond = run.beyond[:n][kept]
        overshoot = max(overshoot, int(beyond.max()) if beyond.size else 0)
        reached = np.zeros(len(run.index), bool)
        reached[:n] = kept
        undershoot += int(np.count_nonzero(run.has_ref & ~reached))
        encoded += n
        beyond_count += int(np.count_nonzero(run.beyond[:n] > 0))
        kept_sets.append(tuple(run.index[:n][kept].tolist()))
    dice = 2.0 * inter / (area + t.ref_total) if area + t.ref_total else 1.0
    return _Outcome(dice, overshoot, undershoot, encoded, beyond_count, tuple(kept_sets))


class _FullMetrics:
    """evaluate_masks on the assembled 3D mask, cached per (target, kept slices)."""

    def __init__(self, traces: list[_Trace]):
        self.traces = traces
        self.cache: dict = {}
        self.loaded: dict = {}

    def __call__(self, t_number: int, kept: tuple):
        key = (t_number, kept)
        if key not in self.cache:
            t = self.traces[t_number]
            if t_number not in self.loaded:
                z = np.load(t.path)
                self.loaded = {t_number: (z["reference"], z["masks"], z["index"].tolist(), z["spacing"])}
            reference, masks, index, spacing = self.loaded[t_number]
            prediction = np.zeros(reference.shape, bool)
            position = {k: i for i, k in enumerate(index)}
            for k in (t.anchor, *kept[0], *kept[1]):
                get_slice(prediction, AXIS, k)[...] = masks[position[k]]
            self.cache[key] = evaluate_masks(prediction, reference, spacing)
        return self.cache[key]


def _auc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(signal on an object slice > signal on a slice past the end), ties half (Mann-Whitney)."""
    inside, outside = inside[~np.isnan(inside)], outside[~np.isnan(outside)]
    if not inside.size or not outside.size:
        return float("nan")
    greater = (inside[:, None] > outside[None, :]).sum() + 0.5 * (inside[:, None] == outside[None, :]).sum()
    return float(greater / (inside.size * outside.size))


def _print_signals(traces: list[_Trace]) -> None:
    """How each signal separates slices with the object from the traced slices past its ends."""
    values: dict[str, tuple[list, list]] = {k: ([], []) for k in ("score", "stability", "overlap", "likeness", "area")}
    for t in traces:
        for run in t.runs:
            inside = run.beyond <= 0
            for name in values:
                v = getattr(run, name).astype(float)
                values[name][0].append(v[inside & run.has_ref])
                values[name][1].append(v[run.beyond > 0])
    print("## The signals on object slices vs on traced slices past the object's ends (permissive trace)\n")
    print("| signal | median on the object (10th pct) | median past the end (90th pct) | AUC |")
    print("|---|---|---|---|")
    for name, (inside, outside) in values.items():
        a, b = np.concatenate(inside), np.concatenate(outside)
        print(f"| {name} | {np.nanmedian(a):.2f} ({np.nanpercentile(a, 10):.2f}) | {np.nanmedian(b):.2f} "
              f"({np.nanpercentile(b, 90):.2f}) | {_auc(a, b):.2f} |")
    print(f"\n({sum(len(x) for x in map(np.concatenate, (v[0] for v in values.values())))//len(values)} object "
          f"slices, {sum(len(x) for x in map(np.concatenate, (v[1] for v in values.values())))//len(values)} slices "
          "past the ends; area in px, not comparable across targets.)\n")


def _grid_rules() -> list[StopRule]:
    keys = list(GRID)
    return [StopRule(**dict(zip(keys, values))) for values in itertools.product(*GRID.values())]


def _simplicity(rule: StopRule) -> tuple:
    """Sort key among rules with the same outcome: fewest tests, then loosest thresholds."""
    def loose(v):
        return -1.0 if v is None else v
    return (_active_tests(rule), rule.min_area != 10, loose(rule.min_score), loose(rule.min_stability),
            loose(rule.min_overlap), loose(rule.min_likeness), rule.patience)


def sweep(args) -> int:
    traces = [t for folder in args.out for t in _load_traces(Path(folder))]
    if not traces:
        print(f"No traces in {', '.join(args.out)}; run the trace mode first.")
        return 1
    if len(args.out) > 1:
        print(f"Traces from {', '.join(args.out)} pooled: {len(traces)} (target, start) pairs; "
              "every mean is over all of them.\n")
    upstream = _upstream(Path(args.upstream))
    rules = _grid_rules()
    extra = [PRE_SWEEP_DEFAULT, StopRule()] + ([_parse_rule(args.rule)] if args.rule else [])
    rules += [rule for rule in extra if rule not in rules]
    started = time.perf_counter()
    outcomes = [[_simulate(t, rule) for t in traces] for rule in rules]
    dice = np.array([[o.dice for o in row] for row in outcomes])
    print(f"# Stop-rule sweep: {len(rules)} rules x {len(traces)} targets, replayed in "
          f"{time.perf_counter() - started:.1f} s\n")
    print("Replay is exact up to a run's first absent slice; after it the real engine prompts from the last "
          "present mask, the trace from the previous one. Runs are capped at the traced range (object "
          "+12 slices each side), so rules that never stop look better than they are. Dice is "
          "full-volume (kept slices assembled; identical to evaluate_masks' Dice); NSD (2 mm) and HD95 "
          "come from evaluate_masks on the assembled masks.\n")
    _print_signals(traces)
    full = _FullMetrics(traces)

    def figures(r: int) -> dict:
        row = outcomes[r]
        ms = [full(t, o.kept) for t, o in enumerate(row)]
        for t, (m, o) in enumerate(zip(ms, row)):
            if abs(m.dice - o.dice) > 1e-9:
                print(f"WARNING: {traces[t].target}: replayed Dice {o.dice:.4f} != evaluate_masks {m.dice:.4f}")
        return {
            "mean": float(np.mean(dice[r])), "median": float(np.median(dice[r])),
            "nsd": float(np.mean([m.nsd for m in ms])), "hd95": float(np.mean([m.hd95_mm for m in ms])),
            "past": sum(o.overshoot > 2 for o in row), "short": sum(o.undershoot > 2 for o in row),
            "beyond": float(np.mean([o.encoded_beyond for o in row])),
            "encoded": float(np.mean([o.encoded for o in row])),
        }

    header = ("| # | rule | same outcome | mean Dice | median | mean NSD | mean HD95 mm | past end >2 | "
              ">2 object slices missed | encoded beyond (mean) | encoded (mean) |")
    rule_line = "|---|---|---|---|---|---|---|---|---|---|---|"

    def line(n, r, same="") -> str:
        f = figures(r)
        return (f"| {n} | `{_rule_text(rules[r])}` | {same} | {f['mean']:.3f} | {f['median']:.3f} | {f['nsd']:.3f} | "
                f"{f['hd95']:.1f} | {f['past']} | {f['short']} | {f['beyond']:.1f} | {f['encoded']:.1f} |")

    # group rules by outcome (same kept slices on every target); represent a group by its simplest rule
    groups: dict[tuple, list[int]] = {}
    for r, row in enumerate(outcomes):
        groups.setdefault(tuple(o.kept for o in row), []).append(r)
    def simplest(group: list[int]) -> int:
        return min(group, key=lambda r: _simplicity(rules[r]))

    ranked = sorted(groups.values(), key=lambda g: (-dice[g[0]].mean(), _simplicity(rules[simplest(g)])))
    print(f"## Top {args.top} distinct outcomes by mean Dice ({len(groups)} distinct outcomes; each shown "
          "with its simplest rule and the number of grid rules giving the same masks)\n")
    print(header)
    print(rule_line)
    best_reps = []
    for n, group in enumerate(ranked[: args.top], start=1):
        rep = simplest(group)
        best_reps.append(rep)
        print(line(n, rep, str(len(group))))
    default_r = rules.index(PRE_SWEEP_DEFAULT)
    rank = 1 + sum(dice[g[0]].mean() > dice[default_r].mean() + 1e-12 for g in ranked)
    print(f"\nPre-sweep default (outcome rank {rank} of {len(groups)}), and the library's default now:\n")
    print(header)
    print(rule_line)
    print(line("pre-sweep default", default_r))
    print(line("library default", rules.index(StopRule())))
    permissive_r = rules.index(StopRule(min_area=1, min_score=None, min_likeness=None, patience=1))
    print(line("area only", permissive_r))

    print("\n## Best rule with each single test (area >= 10 px; the other tests off)\n")
    print(header)
    print(rule_line)
    for name in ("min_score", "min_stability", "min_overlap", "min_likeness"):
        candidates = [r for r, rule in enumerate(rules)
                      if rule.min_area == 10 and _active_tests(rule) == 1 and getattr(rule, name) is not None]
        best = max(candidates, key=lambda r: (dice[r].mean(), [-x for x in _simplicity(rules[r])]))
        print(line(name, best))
    print("\n## Best rule with two tests (area >= 10 px)\n")
    print(header)
    print(rule_line)
    pairs = itertools.combinations(("min_score", "min_stability", "min_overlap", "min_likeness"), 2)
    for a, b in pairs:
        candidates = [r for r, rule in enumerate(rules) if rule.min_area == 10 and _active_tests(rule) == 2
                      and getattr(rule, a) is not None and getattr(rule, b) is not None]
        best = max(candidates, key=lambda r: (dice[r].mean(), [-x for x in _simplicity(rules[r])]))
        print(line(f"{a[4:]}+{b[4:]}", best))

    print("\n## Mean Dice of score x likeness (area >= 10 px, no stability or overlap test)\n")
    for patience in GRID["patience"]:
        print(f"patience {patience}:\n")
        columns = ("-" if v is None else f"{v:g}" for v in GRID["min_likeness"])
        print("| score \\ likeness | " + " | ".join(columns) + " |")
        print("|---" * (len(GRID["min_likeness"]) + 1) + "|")
        for score in GRID["min_score"]:
            cells = []
            for like in GRID["min_likeness"]:
                r = rules.index(StopRule(min_area=10, min_score=score, min_stability=None, min_overlap=None,
                                         min_likeness=like, patience=patience))
                cells.append(f"{dice[r].mean():.3f}")
            print(f"| {'-' if score is None else f'{score:g}'} | " + " | ".join(cells) + " |")
        print()

    # leave-one-case-out: choose the best rule on the other cases, score it on the held-out case
    folds = [SAME_IMAGE.get(t.case, t.case) for t in traces]
    cases = sorted(set(folds))
    print(f"\n## Leave-one-case-out ({len(cases)} folds: the best rule of a family on the other cases, ties to "
          "the simplest, scored on the held-out case's targets; ct_upper_abdomen_totalseg is a crop of "
          "ct_abdomen_totalseg's image, so the two are one fold)\n")
    families = {
        "the whole grid": range(len(rules)),
        "the default's form: area >= 10, score x likeness x patience": [
            r for r, rule in enumerate(rules)
            if rule.min_area == 10 and rule.min_stability is None and rule.min_overlap is None],
    }
    for family, members in families.items():
        members = np.array(list(members))
        held = np.zeros(len(traces))
        picks = []
        for case in cases:
            train = np.array([fold != case for fold in folds])
            scores = dice[members][:, train].mean(axis=1)
            top = members[np.flatnonzero(scores >= scores.max() - 1e-12)]
            pick = min(top, key=lambda r: _simplicity(rules[r]))
            picks.append(_rule_text(rules[pick]))
            held[~train] = dice[pick, ~train]
        print(f"- {family} ({len(members)} rules): in-sample best {dice[members].mean(axis=1).max():.3f}, "
              f"held-out {held.mean():.3f} (pre-sweep default {dice[default_r].mean():.3f}); picks: "
              + "; ".join(f"{picks.count(p)}x `{p}`" for p in sorted(set(picks), key=lambda p: -picks.count(p))))

    # per target: best rule, default, upstream
    best_r = best_reps[0] if args.rule is None else rules.index(_parse_rule(args.rule))
    which = "the given" if args.rule else "the best outcome's"
    print(f"\n## Per target: {which} rule `{_rule_text(rules[best_r])}` vs the pre-sweep default vs upstream\n")
    print("| case | target | object z | anchor | anchor 2D Dice | rule: Dice | kept z | pre-sweep default: Dice | kept z | "
          "permissive (capped) Dice | upstream A | upstream B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t_number, t in enumerate(traces):
        up = upstream.get((t.case, t.target), {})

        def zr(o: _Outcome) -> str:
            ks = [t.anchor, *o.kept[0], *o.kept[1]]
            return f"{min(ks)}..{max(ks)}"

        ob, od = outcomes[best_r][t_number], outcomes[default_r][t_number]
        cap = _simulate(t, PERMISSIVE)
        print(f"| {t.case} | {t.target} | {t.z_lo}..{t.z_hi} | {t.anchor} | {t.anchor_dice2d:.3f} | {ob.dice:.3f} | "
              f"{zr(ob)} | {od.dice:.3f} | {zr(od)} | {cap.dice:.3f} | {up.get('A', float('nan')):.3f} | "
              f"{up.get('B', float('nan')):.3f} |")
    if upstream:
        a = np.mean([upstream[(t.case, t.target)]["A"] for t in traces if (t.case, t.target) in upstream])
        b = np.mean([upstream[(t.case, t.target)]["B"] for t in traces if (t.case, t.target) in upstream])
        print(f"| mean | | | | {np.mean([t.anchor_dice2d for t in traces]):.3f} | {dice[best_r].mean():.3f} | | "
              f"{dice[default_r].mean():.3f} | | {np.mean([_simulate(t, PERMISSIVE).dice for t in traces]):.3f} | "
              f"{a:.3f} | {b:.3f} |")
    print(f"\nTrace cost: {sum(t.slices_encoded for t in traces)} slices encoded (the targets of a case share "
          f"embeddings), {sum(t.seconds for t in traces):.0f} s of propagation.")
    return 0


def _parse_rule(text: str) -> StopRule:
    fields = {}
    for part in text.split(","):
        key, value = part.split("=")
        key = key.strip().replace("-", "_")
        value = value.strip()
        if value.lower() in ("none", "-"):
            fields[key] = None
        elif key in ("min_area", "patience"):
            fields[key] = int(value)
        else:
            fields[key] = float(value)
    return StopRule(**{**dict(min_area=10, min_score=None, min_stability=None, min_overlap=None,
                                min_likeness=None, patience=2), **fields})


# --- verify ------------------------------------------------------------------------------------

def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "-") else float(text)


def verify(args) -> int:
    from SAM3DSegmentLib.engines.sam_slice_predictor import open_sam_session

    _threads()
    rule = StopRule(min_area=args.min_area, min_score=args.min_score, min_stability=args.min_stability,
                    min_overlap=args.min_overlap, min_likeness=args.min_likeness, max_shift=args.max_shift,
                    patience=args.patience)
    options = PropagationOptions(stop=rule)
    upstream = _upstream(Path(args.upstream))
    model = _model()
    shift = "-" if rule.max_shift is None else f"{rule.max_shift:g}"
    print(f"# Verify `{_rule_text(rule)}  shift {shift}` (real engine, no slice range, box on the {args.start} slice)\n")
    print("| case | target | object z | predicted z | Dice | NSD | HD95 mm | slices computed | encoded | s | "
          "upstream A | upstream B | stop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    started_all = time.perf_counter()
    for case, volume, _label, chosen in _targets(args):
        session = open_sam_session(volume, AXIS, model, "litemedsam", device="cpu")
        try:
            for object_id, (target, reference) in enumerate(chosen, start=1):
                prompt = _start_prompt(args.start, case.name, target, reference, volume)
                encoded_before = session.slices_encoded_total
                started = time.perf_counter()
                session.add_prompt(object_id, prompt)
                result = session.propagate(object_id, options)
                seconds = time.perf_counter() - started
                m = evaluate_masks(result.mask, reference, volume.spacing_kji)
                z_lo, z_hi = _z_extent(reference)
                present = result.slices_with_object
                up = upstream.get((case.name, target), {})
                row = {
                    "case": case.name, "target": target, "z_lo": z_lo, "z_hi": z_hi,
                    "pred_lo": present[0] if present else -1, "pred_hi": present[-1] if present else -1,
                    "dice": m.dice, "nsd": m.nsd, "hd95_mm": m.hd95_mm,
                    "slices_computed": len(result.slices_computed) + 1,
                    "encoded": session.slices_encoded_total - encoded_before, "seconds": seconds,
                    "upstream_A": up.get("A", float("nan")), "upstream_B": up.get("B", float("nan")),
                    "stop": "; ".join(f"{k}: {v}" for k, v in sorted(result.stop_reasons.items())),
                }
                rows.append(row)
                print(f"| {case.name} | {target} | {z_lo}..{z_hi} | {row['pred_lo']}..{row['pred_hi']} | "
                      f"{m.dice:.3f} | {m.nsd:.3f} | {m.hd95_mm:.1f} | {row['slices_computed']} | {row['encoded']} | "
                      f"{seconds:.0f} | {row['upstream_A']:.3f} | {row['upstream_B']:.3f} | {row['stop']} |",
                      flush=True)
        finally:
            session.close()
    print(f"| **mean** | | | | **{np.mean([r['dice'] for r in rows]):.3f}** | "
          f"**{np.mean([r['nsd'] for r in rows]):.3f}** | "
          f"{np.mean([r['hd95_mm'] for r in rows]):.1f} | {np.mean([r['slices_computed'] for r in rows]):.1f} | "
          f"{sum(r['encoded'] for r in rows)} | {sum(r['seconds'] for r in rows):.0f} | "
          f"{np.nanmean([r['upstream_A'] for r in rows]):.3f} | {np.nanmean([r['upstream_B'] for r in rows]):.3f} | |")
    print(f"\nmedian Dice {statistics.median(r['dice'] for r in rows):.3f}; runs past the object's end by > 2 "
          f"slices: {sum((r['pred_hi'] - r['z_hi'] > 2) or (r['z_lo'] - r['pred_lo'] > 2) for r in rows)}; "
          f"wall {time.perf_counter() - started_all:.0f} s")
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("trace", "sweep", "verify"):
        p = sub.add_parser(mode)
        if mode == "sweep":
            p.add_argument("--out", nargs="+", default=["/tmp/stop_traces"],
                           help="folder(s) of the traces (several: pooled, e.g. two start slices)")
        else:
            p.add_argument("--out", default="/tmp/stop_traces", help="folder of the traces")
        p.add_argument("--upstream", default=str(DEFAULT_UPSTREAM), help="upstream reference CSV")
        if mode != "sweep":
            p.add_argument("--data", default=str(DEFAULT_DATA))
            p.add_argument("--cases", nargs="*")
            p.add_argument("--targets", nargs="*")
        if mode == "trace":
            p.add_argument("--beyond", type=int, default=12, help="slices traced past each end of the object")
            p.add_argument("--start", choices=("largest", "middle"), default="largest",
                           help="prompted slice: the simulated user's (largest) or upstream's (middle of the z-range)")
        if mode == "sweep":
            p.add_argument("--top", type=int, default=15)
            p.add_argument("--rule",
                           help="per-target table for this rule, e.g. 'min_area=10,min_likeness=0.5,patience=2'")
        if mode == "verify":
            d = StopRule()  # the library's default
            p.add_argument("--min-area", type=int, default=d.min_area)
            p.add_argument("--min-score", type=_optional_float, default=d.min_score)
            p.add_argument("--min-stability", type=_optional_float, default=d.min_stability)
            p.add_argument("--min-overlap", type=_optional_float, default=d.min_overlap)
            p.add_argument("--min-likeness", type=_optional_float, default=d.min_likeness)
            p.add_argument("--max-shift", type=_optional_float, default=d.max_shift,
                           help="the median-shift test (interquartile ranges; not replayed by sweep)")
            p.add_argument("--patience", type=int, default=d.patience)
            p.add_argument("--csv", help="write the per-target rows here")
            p.add_argument("--start", choices=("largest", "middle"), default="largest",
                           help="prompted slice: the simulated user's (largest) or upstream's (middle of the z-range)")
    args = parser.parse_args()
    return {"trace": trace, "sweep": sweep, "verify": verify}[args.mode](args)


if __name__ == "__main__":
    raise SystemExit(main())
