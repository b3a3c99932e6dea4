"""Evaluate an engine over a dataset with a simulated user.

Per case and target: the simulated user prompts the target's largest slice (one click or a box),
the session propagates, then ``rounds`` correction clicks each followed by a propagation (only
the runs touching the corrected slice recompute). After the first propagation and after each
round we record Dice, normalised surface Dice (NSD) at a tolerance in mm and HD95 in mm, all
computed on the WHOLE volume (every slice, not only those containing the target), the image
encoder runs so far, and the wall time of the interactions (previews and propagations; metric
computation excluded).

Outputs: ``results.csv`` (one row per case, target and round), ``summary.md`` (mean, std and
median per dataset and engine, first and last round), and a PNG overlay montage per case and
target (:mod:`montage`).
"""

from __future__ import annotations

import csv
import logging
import statistics
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.volume import Volume
from ..engines.session import PropagationOptions, Session
from ..errors import InputError
from .datasets import Case, case_targets, load_case, target_mask
from .metrics import DEFAULT_NSD_TOLERANCE_MM, evaluate_masks
from .oracle import OraclePredictor
from .simulated_user import SimulatedUser, slice_areas

log = logging.getLogger(__name__)

OBJECT_ID = 1
ENGINES = ("oracle", "weightfree", "slicewise", "sam2", "auto", "litemedsam-upstream", "litemedsam-oracle-box")
BASELINES = {
    "litemedsam-upstream": "LiteMedSAM's published 3D pipeline: box on the middle slice and the z-range from the reference",
    "litemedsam-oracle-box": "LiteMedSAM with a box from the reference on every slice (the model's ceiling)",
}
"""Fixed protocols run on the same weights for comparison; they take no clicks or corrections."""


@dataclass(frozen=True)
class EvaluationConfig:
    """What to run and how the simulated user behaves."""

    engine: str = "weightfree"
    model: str | None = None
    checkpoint: str | None = None
    adapter: str | None = None
    device: str | None = None
    prompt: str = "click"
    box_jitter: float = 0.0
    corrections: str = "click"  # or "click+mask": a click on a new slice refines its current mask
    rounds: int = 0
    seed: int = 0
    axis: int = 0
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
    propagation: PropagationOptions = field(default_factory=PropagationOptions)
    engine_options: dict = field(default_factory=dict)  # e.g. SlicewiseOptions fields ("projection")


@dataclass
class EvaluationRow:
    """Metrics of one case and target after one round (0 = the first propagation)."""

    dataset: str
    case: str
    target: str
    engine: str
    model: str
    prompt: str
    round: int
    clicks: int
    dice: float
    nsd: float
    nsd_tolerance_mm: float
    hd95_mm: float
    prediction_empty: bool
    target_slices: int
    predicted_slices: int
    slices_encoded: int
    n_slices: int
    seconds: float
    correction: str = ""


def open_evaluation_session(config: EvaluationConfig, volume: Volume, reference: np.ndarray) -> Session:
    """A session of the configured engine on ``volume`` (only the oracle sees the reference)."""
    if config.engine == "oracle":
        from ..engines.slicewise import SlicewiseOptions, SlicewiseSession

        predictor = OraclePredictor(reference, config.axis)
        return SlicewiseSession(volume, config.axis, predictor, SlicewiseOptions(**config.engine_options))
    from ..engines.choice import choose_engine, open_session

    choice = choose_engine(config.engine, config.model, config.checkpoint, config.adapter)
    log.info("engine %s: %s", choice.engine, choice.reason)
    return open_session(choice, volume, config.axis, device=config.device, **config.engine_options)


def user_seed(seed: int, case: str, target: str) -> int:
    """A per-target seed, so adding a case does not change the prompts of the others."""
    return zlib.crc32(f"{seed}:{case}:{target}".encode())


def evaluate_target(
    config: EvaluationConfig,
    case: Case,
    volume: Volume,
    reference: np.ndarray,
    target: str,
    session_factory: Callable[[EvaluationConfig, Volume, np.ndarray], Session] = open_evaluation_session,
) -> tuple[list[EvaluationRow], np.ndarray]:
    """Rows for round 0..rounds of one target, and the final predicted mask."""
    if not reference.any():
        raise InputError(f"Target {target} is empty in case {case.name}.")
    if config.engine in BASELINES:
        return _baseline_rows(config, case, volume, reference, target)
    axis, spacing = config.axis, volume.spacing_kji
    user = SimulatedUser(config.prompt, config.box_jitter, user_seed(config.seed, case.name, target),
                         config.corrections)
    session = session_factory(config, volume, reference)
    rows: list[EvaluationRow] = []
    try:
        prompt = user.initial_prompt(reference, axis, spacing)
        clicks = len(prompt.points) or 1
        started = time.perf_counter()
        session.add_prompt(OBJECT_ID, prompt)
        result = session.propagate(OBJECT_ID, config.propagation)
        seconds = time.perf_counter() - started
        rows.append(_row(config, case, target, volume, reference, result.mask, session.engine_name,
                         session.slices_encoded_total, 0, clicks, seconds, ""))
        for round_index in range(1, config.rounds + 1):
            correction = user.correction(
                result.mask, reference, axis, anchors=session.anchors(OBJECT_ID).keys(), spacing_kji=spacing
            )
            note = "no error left on the target's slices"
            if correction is not None:
                clicks += correction.clicks
                note = f"{correction.kind} on slice {correction.prompt.index} ({correction.region_pixels} px)"
                started = time.perf_counter()
                session.add_prompt(OBJECT_ID, correction.prompt)
                result = session.propagate(OBJECT_ID, config.propagation)
                seconds += time.perf_counter() - started
            rows.append(_row(config, case, target, volume, reference, result.mask, session.engine_name,
                             session.slices_encoded_total, round_index, clicks, seconds, note))
        return rows, result.mask
    finally:
        session.close()


def _baseline_rows(config: EvaluationConfig, case: Case, volume: Volume, reference: np.ndarray, target: str):
    """One row (round 0: it takes no corrections) for a fixed baseline protocol on LiteMedSAM (see ``BASELINES``)."""
    from ..models.builders import build_model
    from ..models.checkpoint_cache import resolve_checkpoint
    from .upstream_litemedsam import run_on_volume

    if config.axis != 0:
        raise InputError(f"The {config.engine} baseline runs along axis 0 only.")
    model = build_model("litemedsam", resolve_checkpoint("litemedsam", config.checkpoint), config.device or "cpu")
    protocol = "upstream" if config.engine == "litemedsam-upstream" else "oracle"
    result = run_on_volume(model, volume, reference, protocol)
    row = _row(config, case, target, volume, reference, result.mask, config.engine, result.slices_encoded,
               0, 1, result.seconds, BASELINES[config.engine])
    return [row], result.mask


def _row(config, case, target, volume, reference, mask, engine, slices_encoded, round_index, clicks, seconds, note):
    metrics = evaluate_masks(mask, reference, volume.spacing_kji, config.nsd_tolerance_mm)
    return EvaluationRow(
        dataset=case.dataset, case=case.name, target=target, engine=engine,
        model=config.model or "", prompt=config.prompt, round=round_index, clicks=clicks,
        dice=metrics.dice, nsd=metrics.nsd, nsd_tolerance_mm=metrics.nsd_tolerance_mm,
        hd95_mm=metrics.hd95_mm, prediction_empty=metrics.prediction_empty,
        target_slices=int(np.count_nonzero(slice_areas(reference, config.axis))),
        predicted_slices=int(np.count_nonzero(slice_areas(mask, config.axis))),
        slices_encoded=int(slices_encoded), n_slices=volume.n_slices(config.axis),
        seconds=round(seconds, 3), correction=note,
    )


def evaluate_dataset(
    config: EvaluationConfig,
    cases: list[Case],
    targets: list[str] | None = None,
    out_dir: str | Path | None = None,
    montage: bool = True,
    session_factory: Callable[[EvaluationConfig, Volume, np.ndarray], Session] = open_evaluation_session,
) -> list[EvaluationRow]:
    """Evaluate every case and target; write the CSV, summary and montages into ``out_dir``.
    ``session_factory`` opens each target's session (e.g. on a ``sam3d serve`` server)."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows: list[EvaluationRow] = []
    for case in cases:
        volume, label = load_case(case)
        for target in case_targets(case, label, targets):
            reference = target_mask(case, label, target)
            if not reference.any():
                log.warning("%s: target %s is empty; skipped", case.name, target)
                continue
            target_rows, prediction = evaluate_target(config, case, volume, reference, target, session_factory)
            rows.extend(target_rows)
            last = target_rows[-1]
            log.info("%s / %s: Dice %.3f  NSD %.3f  HD95 %.1f mm  (%d rounds, %d slices encoded, %.1f s)",
                     case.name, target, last.dice, last.nsd, last.hd95_mm, last.round, last.slices_encoded,
                     last.seconds)
            if out is not None and montage:
                save_overlay_montage(volume, reference, prediction, config.axis, out / f"{case.name}_{target}.png")
    if not rows:
        raise InputError("Nothing was evaluated: no case had a non-empty target. Check --cases and --targets.")
    if out is not None:
        write_csv(rows, out / "results.csv")
        (out / "summary.md").write_text(summarise(rows, config), encoding="utf-8")
    return rows


def write_csv(rows: list[EvaluationRow], path: str | Path) -> None:
    names = [f.name for f in fields(EvaluationRow)]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            values = asdict(row)
            for key in ("dice", "nsd", "hd95_mm"):
                values[key] = f"{values[key]:.4f}"
            writer.writerow(values)


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f} ({statistics.median(values):.3f})"


def summary_table(rows: list[EvaluationRow], by=("dataset", "engine")) -> str:
    """Markdown table: mean ± std (median) per group, first and last round."""
    last_round = max(r.round for r in rows)
    rounds = sorted({0, last_round})
    groups: dict[tuple, list[EvaluationRow]] = {}
    for row in rows:
        groups.setdefault(tuple(getattr(row, k) for k in by), []).append(row)
    groups[tuple("all" for _ in by)] = rows
    header = "| " + " | ".join(by) + " | round | n | clicks | Dice | NSD | HD95 mm | encoded / slices |"
    lines = [header, "|" + "---|" * (len(by) + 7)]
    for key, members in groups.items():
        for round_index in rounds:
            chosen = [r for r in members if r.round == round_index]
            if not chosen:
                continue
            encoded = statistics.fmean(r.slices_encoded / max(1, r.n_slices) for r in chosen)
            lines.append(
                "| " + " | ".join(str(k) for k in key) + f" | {round_index} | {len(chosen)} | "
                f"{statistics.fmean(r.clicks for r in chosen):.1f} | {_spread([r.dice for r in chosen])} | "
                f"{_spread([r.nsd for r in chosen])} | {_spread([r.hd95_mm for r in chosen])} | {encoded:.2f} |"
            )
    return "\n".join(lines) + "\n"


def summarise(rows: list[EvaluationRow], config: EvaluationConfig) -> str:
    """The Markdown summary written beside the CSV."""
    tolerance = rows[0].nsd_tolerance_mm
    empty = sum(r.prediction_empty for r in rows if r.round == max(x.round for x in rows))
    per_target = ["| case | target | round | Dice | NSD | HD95 mm | target slices | predicted slices | encoded |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_target.append(f"| {r.case} | {r.target} | {r.round} | {r.dice:.3f} | {r.nsd:.3f} | {r.hd95_mm:.1f} | "
                          f"{r.target_slices} | {r.predicted_slices} | {r.slices_encoded} |")
    return (
        f"# Evaluation: engine(s) {', '.join(sorted({r.engine for r in rows}))}"
        + (f", model {config.model}" if config.model else "") + "\n\n"
        f"Simulated user: {config.prompt}" + (f" (jitter {config.box_jitter})" if config.prompt == "box" else "")
        + f", {config.rounds} correction round(s) ({config.corrections}), seed {config.seed}, axis {config.axis}.\n"
        f"Metrics on the whole volume: Dice, NSD at {tolerance:g} mm, HD95 in mm; cells are "
        "mean ± std (median). An empty prediction scores Dice 0, NSD 0 and HD95 = the volume diagonal; "
        f"{empty} target(s) ended empty.\n\n"
        + summary_table(rows) + "\n## Per target\n\n" + "\n".join(per_target) + "\n"
    )


def save_overlay_montage(
    volume: Volume, reference: np.ndarray, prediction: np.ndarray, axis: int, path: str | Path, n_panels: int = 8
) -> Path:
    """A PNG of up to ``n_panels`` slices spread over the target with the prediction and the
    reference overlaid (see :mod:`montage`)."""
    from .montage import save_montage

    return save_montage(path, volume, prediction, axis=axis, reference=reference, max_tiles=n_panels)


@dataclass(frozen=True)
class SweepSetting:
    """One propagation setting of a sweep: engine options (e.g. projection) and the stop rule."""

    engine_options: dict
    propagation: PropagationOptions

    @property
    def label(self) -> str:
        stop = self.propagation.stop
        options = ", ".join(f"{k}={v}" for k, v in sorted(self.engine_options.items()))
        return f"{options}; min_area={stop.min_area}, patience={stop.patience}"


def sweep_grid(
    projections: list[str], min_areas: list[int], patiences: list[int], base: PropagationOptions | None = None
) -> list[SweepSetting]:
    """Every combination of projection mode, minimum area and patience."""
    from dataclasses import replace

    base = base or PropagationOptions()
    return [
        SweepSetting({"projection": p}, replace(base, stop=replace(base.stop, min_area=a, patience=k)))
        for p in projections for a in min_areas for k in patiences
    ]


def evaluate_sweep(
    config: EvaluationConfig, cases: list[Case], settings: list[SweepSetting], targets: list[str] | None = None
) -> dict[str, list[EvaluationRow]]:
    """Rows of every setting on every case and target (each case is read once)."""
    from dataclasses import replace

    results: dict[str, list[EvaluationRow]] = {s.label: [] for s in settings}
    for case in cases:
        volume, label = load_case(case)
        for target in case_targets(case, label, targets):
            reference = target_mask(case, label, target)
            if not reference.any():
                continue
            for setting in settings:
                run_config = replace(config, engine_options={**config.engine_options, **setting.engine_options},
                                     propagation=setting.propagation)
                rows, _ = evaluate_target(run_config, case, volume, reference, target)
                results[setting.label].extend(rows)
        log.info("sweep: %s done", case.name)
    return results


def sweep_table(results: dict[str, list[EvaluationRow]], patience_of: dict[str, int] | None = None) -> str:
    """Markdown table of a sweep, best mean Dice first: the first round of every setting.

    ``encoded/(extent+2p)`` is slices encoded / (slices the target spans + 2 x patience), the
    propagation's efficiency (1.0 is ideal)."""
    lines = ["| setting | n | Dice mean ± std | Dice min | NSD mean | HD95 mean mm | encoded/(extent+2p) |",
             "|---|---|---|---|---|---|---|"]
    scored = []
    for label, rows in results.items():
        first = [r for r in rows if r.round == 0]
        if not first:
            continue
        patience = (patience_of or {}).get(label, 0)
        efficiency = statistics.fmean(
            r.slices_encoded / min(r.n_slices, r.target_slices + 2 * patience) for r in first)
        dices = [r.dice for r in first]
        std = statistics.stdev(dices) if len(dices) > 1 else 0.0
        scored.append((statistics.fmean(dices), label, len(first), std, min(dices),
                       statistics.fmean(r.nsd for r in first), statistics.fmean(r.hd95_mm for r in first), efficiency))
    scored.sort(key=lambda item: (-round(item[0], 4), item[7]))
    for mean, label, n, std, low, nsd, hd95, efficiency in scored:
        lines.append(f"| {label} | {n} | {mean:.3f} ± {std:.3f} | {low:.3f} | {nsd:.3f} | {hd95:.1f} | {efficiency:.2f} |")
    return "\n".join(lines) + "\n"
