"""Which click strategies to use for LiteMedSAM (a box-trained model), measured on ../shared/data.

2D experiments on every target (axis 0, as the evaluation) and a 3D check, on the real
LiteMedSAM weights; all strategies on one slice share one image-encoder run (the predictor
caches it). Results and the chosen defaults: docs/click_strategies.md.

1. Start: the simulated user's initial click (``SimulatedUser("click", 0.0, user_seed(0, case,
   target))``) on the target's largest slice, given to the model by each start strategy of
   :mod:`SAM3DSegmentLib.engines.box_prompts` (point, region_box at several margins,
   region_box+points, mm_box at several sizes, best_box), against boxes from the reference
   (tight, + 5 px, + 10 %: the ceiling). "2 clicks": the user's next click on that slice by the simulated user's correction
   rule (centre of the largest error region of that strategy's own 1-click mask; include if
   missed, exclude if false positive; the slice is an anchor so no extra include click) added
   to the first, the same strategy again.
2. Correction: on up to 5 slices spread over the target's extent, the slice's current mask is
   LiteMedSAM's prediction from the box projected from the reference's neighbour slice (the
   neighbour towards the largest slice; ``project_prompt`` with default ``SlicewiseOptions``:
   box + 3 px + 5 %), i.e. one propagation step from a perfect neighbour. The simulated user's
   correction click on that slice (``SimulatedUser.correction``, corrections="click": an exclude
   click on a slice that is not an anchor comes with an include click at the reference's
   interior-most pixel) and the slice's mask go to each correction strategy (points+mask,
   region_box, box_update) and to local variants (``mask_box+points``: the mask's box with the
   clicks; ``box_update+points``; ``region_box+points``). Slices whose mask is already exact
   are skipped.
3. Correction on propagated masks (``--propagated``, CPU-heavy: every slice of the target is
   encoded): the simulated user's box start (``SimulatedUser("box", 0.0, seed)``) is propagated by
   a ``SlicewiseSession`` with default options, as ``sam3d eval --prompt box`` does (its 3D Dice is
   recorded), and the masks to correct are the propagated slices: the simulated user's worst
   slice (round 1 of the evaluation) and up to 4 more slices with an error, spread over the
   extent. Where the propagation left a slice of the target empty the click is a start, not a
   correction (the session gives no mask): the start strategies are measured there instead.
4. ``--eval3d "START|CORRECTION;..."``: instead of the above, the 3D evaluation
   (``evaluate_target``: the simulated user's click, or its box for START "box", default
   SlicewiseOptions and PropagationOptions, ``--rounds`` corrections) with each start variant
   of this script (including the local ``select ...`` rules) and library correction variant;
   the variants of a case share the slice embeddings.
5. ``--demo``: best_box's candidates on the demo lesion's click slice (``sam3d demo``'s sample),
   with their predicted IoU and Dice, and what ``best_box`` and the tolerant variants pick.

Local variants: ``select ...`` runs the decoder on each candidate box and keeps the mask the
model scores best (predicted IoU) among those that honour the clicks (include inside, exclude
outside); ``mm_box X cut`` is the mm_box cut back by exclude clicks (``updated_box``).

Slice Dice against the reference (an empty prediction scores 0). Writes ``start.csv``,
``correction.csv`` and ``summary.md`` into ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/litemedsam_click_strategies.py \
        --data ../shared/data --out /tmp/click_strategies [--cases a,b] [--propagated]
    ... --eval3d "box|box_update;region_box m0.05|box_update;select adaptive|region_box m0.1" \
        --rounds 1 --out /tmp/eval3d   # 3D
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from SAM3DSegmentLib.data.prompts import SlicePrompt
from SAM3DSegmentLib.data.volume import get_slice
from SAM3DSegmentLib.engines.box_prompts import as_box_prompt, bounding_box, updated_box
from SAM3DSegmentLib.engines.sam_slice_predictor import SamSlicePredictor
from SAM3DSegmentLib.engines.session import PropagationOptions
from SAM3DSegmentLib.engines.slicewise import (
    SlicewiseOptions,
    SlicewiseSession,
    project_prompt,
)
from SAM3DSegmentLib.evaluation.correction_rounds import user_seed
from SAM3DSegmentLib.evaluation.datasets import (
    case_targets,
    load_case,
    open_dataset,
    select_cases,
    target_mask,
)
from SAM3DSegmentLib.evaluation.metrics import dice as dice3d
from SAM3DSegmentLib.evaluation.simulated_user import SimulatedUser, slice_areas

log = logging.getLogger("click_strategies")
AXIS = 0

# name -> (click_start, click_box_mm, region_margin_fraction)
START_VARIANTS: dict[str, tuple[str, float, float]] = {
    "point": ("point", 30.0, 0.05),
    "region_box m0": ("region_box", 30.0, 0.0),
    "region_box m0.05": ("region_box", 30.0, 0.05),
    "region_box m0.1": ("region_box", 30.0, 0.1),
    "region_box m0.2": ("region_box", 30.0, 0.2),
    "region_box+points m0.05": ("region_box+points", 30.0, 0.05),
    "region_box+points m0.1": ("region_box+points", 30.0, 0.1),
    "mm_box 20": ("mm_box", 20.0, 0.05),
    "mm_box 30": ("mm_box", 30.0, 0.05),
    "mm_box 50": ("mm_box", 50.0, 0.05),
    "mm_box 80": ("mm_box", 80.0, 0.05),
    "best_box": ("best_box", 50.0, 0.1),  # the library's: region box +20 %, 50 and 80 mm, IoU picks
}
# name -> correction strategy of the predictor, or a local variant (None)
CORRECTION_VARIANTS: dict[str, tuple[str | None, float]] = {
    "points+mask": ("points+mask", 0.05),
    "region_box m0.05": ("region_box", 0.05),
    "region_box m0.1": ("region_box", 0.1),
    "region_box m0.2": ("region_box", 0.2),
    "box_update": ("box_update", 0.05),
    "box_update m0.1": (None, 0.1),
    "mask_box+points": (None, 0.05),
    "box_update+points": (None, 0.05),
    "region_box+points m0.05": (None, 0.05),
    "select rb0.1/box_update": (None, 0.1),
    "select rb0.1/box_update/points+mask": (None, 0.1),
    "drop FP component, else rb0.1": (None, 0.1),
    "select rb0.1/rb0.2/bu/bu m0.1": (None, 0.1),
}
# local start variants: the candidates' masks, the one the model scores best (predicted IoU),
# among those that honour the clicks (include inside, exclude outside) when there are any
SELECT_STARTS: dict[str, tuple[str, ...]] = {
    "select rb0.1/rb0.2/mm30/50/80": ("region_box m0.1", "region_box m0.2", "mm_box 30", "mm_box 50", "mm_box 80"),
    "select rb0.2/mm50/mm80": ("region_box m0.2", "mm_box 50", "mm_box 80"),
    "select rb0.1/rb0.2": ("region_box m0.1", "region_box m0.2"),
    "select rb0.1/rb0.2/mm50c/mm80c": ("region_box m0.1", "region_box m0.2", "mm_box 50 cut", "mm_box 80 cut"),
    "select rb0.2/mm50c/mm80c": ("region_box m0.2", "mm_box 50 cut", "mm_box 80 cut"),
    # one click: rb0.1/rb0.2/mm50c/mm80c; more clicks: rb0.1/rb0.2 only (with the click filter,
    # a second click near the border makes the pick prefer over-segmenting big boxes). Measured:
    # no better than the library's best_box, which has no click filter.
    "select adaptive": ("region_box m0.1", "region_box m0.2", "mm_box 50 cut", "mm_box 80 cut"),
}
# best_box with a tolerance: the first candidate (region box +20 %, then 50 mm, then 80 mm) whose
# predicted IoU is within delta of the best, so that a bigger box must score clearly better to
# win (the demo's liver lesion: region box IoU 0.855, Dice 0.945; 50 mm IoU 0.883, Dice 0.497)
TOLERANT_STARTS = {"best_box d0.02": 0.02, "best_box d0.05": 0.05}
TOLERANT_CANDIDATES = ("region_box m0.2", "mm_box 50", "mm_box 80")
# "mm_box X cut": the mm_box, then cut back to leave out exclude clicks (updated_box), so that
# it honours a second, exclude click as the region boxes do
CUT_STARTS = {"mm_box 50 cut": "mm_box 50", "mm_box 80 cut": "mm_box 80"}
# local correction variants chosen the same way
SELECT_CORRECTIONS: dict[str, tuple[str, ...]] = {
    "select rb0.1/box_update": ("region_box m0.1", "box_update"),
    "select rb0.1/box_update/points+mask": ("region_box m0.1", "box_update", "points+mask"),
    "select rb0.1/rb0.2/bu/bu m0.1": ("region_box m0.1", "region_box m0.2", "box_update", "box_update m0.1"),
}
CORRECTION_SLICES = 5
START_ONLY = False  # --start-only: skip the neighbour-box corrections
PROPAGATED_EMPTY_STARTS = ("point", "region_box m0.05", "region_box m0.1", "mm_box 20", "mm_box 30")


def dice2d(prediction: np.ndarray, reference: np.ndarray) -> float:
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(prediction & reference)) / total


def CEILINGS(ref: np.ndarray, extent) -> dict:
    """Boxes from the reference: tight, + 5 px (upstream's inference_3D.py), + 10 % per side."""
    return {"tight box (ceiling)": bounding_box(ref), "tight box +5 px": bounding_box(ref, (5.0, 5.0)),
            "tight box +10 %": bounding_box(ref, (0.1 * extent[0], 0.1 * extent[1]))}


def set_start(predictor: SamSlicePredictor, variant: str) -> None:
    start, box_mm, margin = START_VARIANTS[variant]
    predictor.click_start, predictor.click_box_mm, predictor.region_margin_fraction = start, box_mm, margin


def honours(mask: np.ndarray, prompt: SlicePrompt) -> bool:
    """Whether ``mask`` has every include click inside and every exclude click outside."""
    return all(bool(mask[int(p.row), int(p.col)]) == p.positive for p in prompt.points)


def select(results: dict, prompt: SlicePrompt):
    """The result the model scores best, among those honouring the clicks when any does."""
    good = {n: r for n, r in results.items() if honours(r.mask, prompt)} or results
    return max(good.values(), key=lambda r: -1.0 if r.score is None else r.score)


def start_mask(predictor: SamSlicePredictor, variant: str, index: int, prompt: SlicePrompt):
    """The SliceMask that start ``variant`` gives for the clicks in ``prompt``."""
    if variant in SELECT_STARTS:
        candidates = SELECT_STARTS[variant]
        if variant == "select adaptive" and len(prompt.points) > 1:
            candidates = candidates[:2]
        return select({n: start_mask(predictor, n, index, prompt) for n in candidates}, prompt)
    if variant in TOLERANT_STARTS:
        results = [start_mask(predictor, n, index, prompt) for n in TOLERANT_CANDIDATES]
        best = max(r.score for r in results)
        return next(r for r in results if r.score >= best - TOLERANT_STARTS[variant])
    if variant in CUT_STARTS:
        set_start(predictor, CUT_STARTS[variant])
        box = predictor.model_prompts(index, prompt)[0].box
        shape = get_slice(predictor.image, predictor.axis, index).shape
        return predictor.predict(index, as_box_prompt(prompt, box and updated_box(box, prompt, shape), keep_points=False))
    set_start(predictor, variant)
    return predictor.predict(index, prompt)


def next_click(prediction: np.ndarray, reference: np.ndarray, spacing, anchor: bool):
    """The simulated user's correction on one slice (prediction, reference 2D), or None."""
    user = SimulatedUser("click", 0.0, 0)
    anchors = (0,) if anchor else ()
    return user.correction(prediction[None], reference[None], 0, anchors=anchors,
                           spacing_kji=(1.0, *spacing))


def correction_mask(predictor: SamSlicePredictor, variant: str, index: int, prompt: SlicePrompt) -> np.ndarray:
    """The mask that correction ``variant`` gives for ``prompt`` (clicks + the slice's mask)."""
    if variant in SELECT_CORRECTIONS:
        results = {}
        for name in SELECT_CORRECTIONS[variant]:
            strategy, margin = CORRECTION_VARIANTS[name]
            if strategy is None:
                results[name] = predictor.predict(index, local_correction_prompt(predictor, name, index, prompt))
                continue
            predictor.region_margin_fraction, predictor.correction = margin, strategy
            results[name] = predictor.predict(index, prompt)
        return select(results, prompt).mask
    if variant == "drop FP component, else rb0.1":
        current = np.asarray(prompt.mask, dtype=bool)
        labels, _ = ndimage.label(current)
        excluded = {int(labels[int(p.row), int(p.col)]) for p in prompt.points if not p.positive} - {0}
        included = {int(labels[int(p.row), int(p.col)]) for p in prompt.points if p.positive}
        if excluded and not excluded & included:
            return current & ~np.isin(labels, list(excluded))
        variant = "region_box m0.1"
    strategy, margin = CORRECTION_VARIANTS[variant]
    predictor.region_margin_fraction = margin
    if strategy is not None:
        predictor.correction = strategy
        return predictor.predict(index, prompt).mask
    return predictor.predict(index, local_correction_prompt(predictor, variant, index, prompt)).mask


def local_correction_prompt(predictor, variant: str, index: int, prompt: SlicePrompt) -> SlicePrompt:
    """The box prompt of a local correction variant (not in box_prompts)."""
    shape = prompt.mask.shape
    mask = np.asarray(prompt.mask, dtype=bool)
    current = bounding_box(mask)
    if variant == "box_update m0.1":  # the mask's box + 10 % per side, grown / cut by the clicks
        extent = (current.row1 - current.row0 + 1, current.col1 - current.col0 + 1)
        wide = bounding_box(mask, (0.1 * extent[0], 0.1 * extent[1]))
        return as_box_prompt(prompt, updated_box(wide, prompt, shape), keep_points=False)
    if variant == "mask_box+points":
        box = current
    elif variant == "box_update+points":
        box = current and updated_box(current, prompt, shape)
    else:  # region_box+points: the region_box correction's box, with the clicks
        predictor.correction, predictor.region_margin_fraction = "region_box", 0.05
        box = predictor.model_prompts(index, prompt)[0].box
    return as_box_prompt(prompt, box, keep_points=True)


def spread_slices(areas: np.ndarray, largest: int, n: int) -> list[int]:
    """Up to ``n`` slices with the target, spread over its extent (the largest slice excluded)."""
    present = [int(i) for i in np.flatnonzero(areas) if i != largest]
    if len(present) <= n:
        return present
    picks = np.linspace(0, len(present) - 1, n).round().astype(int)
    return sorted({present[p] for p in picks})


def run_target(predictor, case, target, reference, spacing_rc, start_rows, correction_rows) -> None:
    areas = slice_areas(reference, AXIS)
    user = SimulatedUser("click", 0.0, user_seed(0, case.name, target))
    first = user.initial_prompt(reference, AXIS, predictor.volume.spacing_kji)
    index = first.index
    ref = get_slice(reference, AXIS, index)
    base = {"case": case.name, "target": target, "slice": index, "area": int(ref.sum())}
    started = time.perf_counter()
    tight = bounding_box(ref)
    extent = (tight.row1 - tight.row0 + 1, tight.col1 - tight.col0 + 1)
    for name, box in CEILINGS(ref, extent).items():
        result = predictor.predict(index, SlicePrompt(AXIS, index, box=box))
        start_rows.append({**base, "strategy": name, "clicks": 1, "dice": dice2d(result.mask, ref),
                           "score": result.score, "box": str(box)})
        if name == "tight box (ceiling)":
            encoded = time.perf_counter() - started
    for variant in [*START_VARIANTS, *SELECT_STARTS, *TOLERANT_STARTS]:
        one = start_mask(predictor, variant, index, first)
        start_rows.append({**base, "strategy": variant, "clicks": 1, "dice": dice2d(one.mask, ref), "score": one.score,
                           "honours": honours(one.mask, first),
                           "box": "" if variant in SELECT_STARTS or variant in TOLERANT_STARTS else str(predictor.model_prompts(index, first)[0].box)})
        extra = next_click(one.mask, ref, spacing_rc, anchor=True)
        if extra is None:
            two_dice, kind = dice2d(one.mask, ref), "none"
        else:
            second = replace(first, points=first.points + extra.prompt.points)
            two_dice, kind = dice2d(start_mask(predictor, variant, index, second).mask, ref), extra.kind
        start_rows.append({**base, "strategy": variant, "clicks": 2, "dice": two_dice, "second": kind})
    log.info("%s / %s start: slice %d, encoder %.1f s, all %.1f s", case.name, target, index, encoded,
             time.perf_counter() - started)

    options = SlicewiseOptions()
    for k in spread_slices(areas, index, CORRECTION_SLICES) if not START_ONLY else ():
        neighbour = k + 1 if k < index else k - 1
        ref_k = get_slice(reference, AXIS, k)
        projected = project_prompt(get_slice(reference, AXIS, neighbour), AXIS, k, options)
        if projected.box is None:  # the neighbour is empty (a gap in the target): use the slice's own box
            projected = SlicePrompt(AXIS, k, box=bounding_box(ref_k))
        current = predictor.predict(k, projected).mask
        row = {"source": "neighbour box", "case": case.name, "target": target, "slice": k, "neighbour": neighbour}
        correction_rows.append(correct_slice(predictor, k, current, ref_k, spacing_rc, row))
    log.info("%s / %s done, %.1f s", case.name, target, time.perf_counter() - started)


def correct_slice(predictor, k: int, current: np.ndarray, ref_k: np.ndarray, spacing_rc, row: dict) -> dict:
    """``row`` with the slice Dice before and after each correction variant (or why none)."""
    row = {**row, "area": int(ref_k.sum()), "before": dice2d(current, ref_k)}
    click = next_click(current, ref_k, spacing_rc, anchor=False)
    if click is None:
        return {**row, "kind": "none"}
    prompt = replace(click.prompt, axis=AXIS, index=k)
    row.update(kind=click.kind, clicks=click.clicks)
    if not current.any():  # no mask on the slice: the session passes the clicks alone, a start
        row["kind"] = "empty mask"
        for variant in PROPAGATED_EMPTY_STARTS:
            set_start(predictor, variant)
            row[variant] = dice2d(predictor.predict(k, prompt).mask, ref_k)
        return row
    prompt = replace(prompt, mask=current.copy())
    for variant in CORRECTION_VARIANTS:
        row[variant] = dice2d(correction_mask(predictor, variant, k, prompt), ref_k)
    return row


def run_propagated(predictor, case, target, reference, spacing_rc, correction_rows, box3d_rows) -> None:
    """Box start, propagation, then the corrections on up to 5 propagated slices with an error."""
    started = time.perf_counter()
    user = SimulatedUser("box", 0.0, user_seed(0, case.name, target))
    session = SlicewiseSession(predictor.volume, AXIS, predictor, SlicewiseOptions())
    first = user.initial_prompt(reference, AXIS, predictor.volume.spacing_kji)
    session.add_prompt(1, first)
    mask = session.propagate(1, PropagationOptions()).mask
    box3d_rows.append({"case": case.name, "target": target, "dice3d_box_start": dice3d(mask, reference)})
    worst = user.correction(mask, reference, AXIS, anchors=session.anchors(1).keys(),
                            spacing_kji=predictor.volume.spacing_kji)
    areas = slice_areas(reference, AXIS)
    wrong = slice_areas(mask ^ reference, AXIS) * (areas > 0)
    wrong[first.index] = 0
    chosen = [] if worst is None else [worst.prompt.index]
    for k in spread_slices(wrong, first.index, CORRECTION_SLICES):
        if len(chosen) < CORRECTION_SLICES and k not in chosen:
            chosen.append(k)
    for k in chosen:
        ref_k, current = get_slice(reference, AXIS, k), get_slice(mask, AXIS, k)
        row = {"source": "propagated", "case": case.name, "target": target, "slice": k,
               "neighbour": first.index, "worst": k == (worst.prompt.index if worst else None)}
        correction_rows.append(correct_slice(predictor, k, current, ref_k, spacing_rc, row))
    session.close()
    log.info("%s / %s propagated: 3D Dice %.3f, %d slices, %.1f s", case.name, target,
             box3d_rows[-1]["dice3d_box_start"], len(chosen), time.perf_counter() - started)


def summary(start_rows: list[dict], correction_rows: list[dict], box3d_rows: list[dict] = ()) -> str:
    order = [r["case"] for r in start_rows + correction_rows]
    targets = sorted({(r["case"], r["target"]) for r in start_rows + correction_rows}, key=lambda t: order.index(t[0]))
    lines = [] if not start_rows else ["## Start: slice Dice on the largest slice (mean, median, min; n targets)", "",
             "| strategy | 1 click mean | median | min | 2 clicks mean | median | min |", "|---|---|---|---|---|---|---|"]
    names = ["tight box (ceiling)", "tight box +5 px", "tight box +10 %", *START_VARIANTS, *SELECT_STARTS, *TOLERANT_STARTS]
    for name in names if start_rows else ():
        cells = []
        for clicks in (1, 2):
            values = [r["dice"] for r in start_rows if r["strategy"] == name and r["clicks"] == clicks]
            cells += [f"{statistics.fmean(values):.3f}", f"{statistics.median(values):.3f}",
                      f"{min(values):.3f}"] if values else ["-", "-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [] if not start_rows else ["", "### Per target, 1 click", "", "| case | target | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for case, target in targets if start_rows else ():
        got = {r["strategy"]: r["dice"] for r in start_rows if (r["case"], r["target"]) == (case, target) and r["clicks"] == 1}
        lines.append(f"| {case} | {target} | " + " | ".join(f"{got.get(n, float('nan')):.3f}" for n in names) + " |")
    lines += [] if not start_rows else ["", "### Per target, 2 clicks", "", "| case | target | " + " | ".join(names[3:]) + " |",
              "|---|---|" + "---|" * (len(names) - 3)]
    for case, target in targets if start_rows else ():
        got = {r["strategy"]: r["dice"] for r in start_rows if (r["case"], r["target"]) == (case, target) and r["clicks"] == 2}
        lines.append(f"| {case} | {target} | " + " | ".join(f"{got.get(n, float('nan')):.3f}" for n in names[3:]) + " |")

    for source in ("neighbour box", "propagated"):
        rows = [r for r in correction_rows if r["source"] == source]
        if rows:
            lines += correction_summary(source, rows, targets)
    if box3d_rows:
        values = [r["dice3d_box_start"] for r in box3d_rows]
        lines += ["", f"3D Dice of the box start propagated (the masks corrected above): mean {statistics.fmean(values):.3f}, "
                  f"median {statistics.median(values):.3f} ({len(values)} targets)"]
    return "\n".join(lines) + "\n"


def correction_summary(source: str, correction_rows: list[dict], targets) -> list[str]:
    lines: list[str] = []
    corrected = [r for r in correction_rows if r.get("kind") in ("false_negative", "false_positive")]
    lines += ["", f"## Correction ({source} masks): slice Dice before and after one correction ({len(corrected)} slices, "
              f"{sum(r.get('kind') == 'none' for r in correction_rows)} exact, skipped)", ""]
    if corrected:
        before = [r["before"] for r in corrected]
        lines += [f"Before: mean {statistics.fmean(before):.3f}, median {statistics.median(before):.3f}. "
                  f"Clicks: {sum(r['kind'] == 'false_negative' for r in corrected)} include, "
                  f"{sum(r['kind'] == 'false_positive' for r in corrected)} exclude (+ an include).", "",
                  "| strategy | after mean | median | mean change | worse (< -0.01) | better (> +0.01) | "
                  "mean change, include | mean change, exclude |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in CORRECTION_VARIANTS:
            after = [r[name] for r in corrected]
            change = [r[name] - r["before"] for r in corrected]
            by_kind = []
            for kind in ("false_negative", "false_positive"):
                values = [r[name] - r["before"] for r in corrected if r["kind"] == kind]
                by_kind.append(f"{statistics.fmean(values):+.3f}" if values else "-")
            lines.append(f"| {name} | {statistics.fmean(after):.3f} | {statistics.median(after):.3f} | "
                         f"{statistics.fmean(change):+.3f} | {sum(c < -0.01 for c in change)} | "
                         f"{sum(c > 0.01 for c in change)} | {by_kind[0]} | {by_kind[1]} |")
        lines += ["", "### Per target (mean over its corrected slices)", "",
                  "| case | target | slices | before | " + " | ".join(CORRECTION_VARIANTS) + " |",
                  "|---|---|---|---|" + "---|" * len(CORRECTION_VARIANTS)]
        for case, target in targets:
            mine = [r for r in corrected if (r["case"], r["target"]) == (case, target)]
            if not mine:
                continue
            cells = [f"{statistics.fmean(r[n] for r in mine):.3f}" for n in CORRECTION_VARIANTS]
            lines.append(f"| {case} | {target} | {len(mine)} | {statistics.fmean(r['before'] for r in mine):.3f} | "
                         + " | ".join(cells) + " |")
    empty = [r for r in correction_rows if r.get("kind") == "empty mask"]
    if empty:
        lines += ["", f"Slices the propagation left empty ({len(empty)}): one include click, a start; Dice "
                  "(mean, median): " + ", ".join(
                      f"{n} {statistics.fmean(r[n] for r in empty):.3f} / {statistics.median(r[n] for r in empty):.3f}"
                      for n in PROPAGATED_EMPTY_STARTS)]
    return lines


class StrategyPredictor(SamSlicePredictor):
    """The predictor with a start variant of this script (e.g. a select rule) for the user's
    clicks on a slice without a mask, for ``--eval3d``; everything else as the library does."""

    start_variant = "region_box m0.05"
    correction_variant = "box_update"
    _inner = False

    def predict(self, index, prompt, previous=None):
        if self._inner or previous is not None or prompt.box is not None or not prompt.points:
            return super().predict(index, prompt, previous)
        if prompt.mask is not None:  # a correction: a strategy of the library, at its margin
            self.correction, self.region_margin_fraction = CORRECTION_VARIANTS[self.correction_variant]
            return super().predict(index, prompt, previous)
        self._inner = True
        try:
            return start_mask(self, self.start_variant, index, prompt)
        finally:
            self._inner = False


def shared_cache_class():
    from SAM3DSegmentLib.engines.feature_cache import FeatureCache

    class SharedCache(FeatureCache):
        """A cache that a session's close() does not empty (the variants of a case share it)."""

        def clear(self) -> None:
            pass

    return SharedCache


def eval3d(args, model, cases, out: Path) -> None:
    """``sam3d eval --engine slicewise --model litemedsam --prompt click --rounds N`` with each
    variant of ``args.eval3d`` (";"-separated "START|CORRECTION": a start variant, or "box" for
    ``--prompt box``, and a library correction variant, default box_update). The variants of
    one case share the slice embeddings."""
    from SAM3DSegmentLib.evaluation.correction_rounds import (
        EvaluationConfig,
        evaluate_target,
        summary_table,
    )
    from SAM3DSegmentLib.evaluation.correction_rounds import write_csv as write_rows

    SharedCache = shared_cache_class()
    variants = [v.strip() for v in args.eval3d.split(";") if v.strip()]
    rows: dict[str, list] = {v: [] for v in variants}
    started = time.perf_counter()
    for case in cases:
        volume, label = load_case(case)
        cache = SharedCache(4 * 1024**3)
        for target in case_targets(case, label):
            reference = target_mask(case, label, target)
            if not reference.any():
                continue
            for variant in variants:
                start, _, correction = variant.partition("|")
                config = EvaluationConfig(engine="slicewise", model="litemedsam", rounds=args.rounds,
                                          prompt="box" if start == "box" else "click")

                def factory(config, volume, reference, start=start, correction=correction or "box_update"):
                    predictor = StrategyPredictor(volume, AXIS, model, "litemedsam", args.device)
                    # with a box start, clicks on a slice the propagation left empty use the library's default
                    predictor.start_variant = "region_box m0.05" if start == "box" else start
                    predictor.correction_variant, predictor.cache = correction, cache
                    return SlicewiseSession(volume, AXIS, predictor, SlicewiseOptions())

                target_rows, _ = evaluate_target(config, case, volume, reference, target, session_factory=factory)
                rows[variant].extend(target_rows)
                log.info("%s / %s / %s: 3D Dice %s (%.0f s so far)", case.name, target, variant,
                         " ".join(f"{r.dice:.3f}" for r in target_rows), time.perf_counter() - started)
        for variant in variants:
            write_rows(rows[variant], out / f"results_{variant.replace('/', '-').replace(' ', '_')}.csv")
    text = ""
    for variant in variants:
        text += f"## 3D, start: {variant}\n\n" + summary_table(rows[variant]) + "\n"
    per_target = {}
    for variant in variants:
        for r in rows[variant]:
            per_target.setdefault((r.case, r.target, r.round), {})[variant] = r.dice
    text += "## Per target (3D Dice)\n\n| case | target | round | " + " | ".join(variants) + " |\n|---|---|---|" + "---|" * len(variants) + "\n"
    for (case, target, round_index), got in per_target.items():
        text += f"| {case} | {target} | {round_index} | " + " | ".join(f"{got.get(v, float('nan')):.3f}" for v in variants) + " |\n"
    text += f"\nWall time {time.perf_counter() - started:.0f} s (slices_encoded is not meaningful: the variants share a cache).\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text)


def demo_check(model, device: str) -> None:
    """``--demo``: best_box's candidates on the demo lesion's click slice (the sample volume):
    each candidate's predicted IoU and Dice, and what each tolerance picks."""
    from SAM3DSegmentLib.data.prompts import prompt_from_voxels
    from SAM3DSegmentLib.data.sample_volume import make_sample

    sample = make_sample()
    predictor = SamSlicePredictor(sample.volume, AXIS, model, "litemedsam", device)
    prompt = prompt_from_voxels(AXIS, positive_kji=[sample.click_kji])
    ref = get_slice(sample.truth, AXIS, prompt.index)
    results = []
    for name in TOLERANT_CANDIDATES:
        result = start_mask(predictor, name, prompt.index, prompt)
        results.append((name, result.score, dice2d(result.mask, ref)))
        print(f"{name}: predicted IoU {result.score:.3f}, Dice {results[-1][2]:.3f}")
    for variant in ("best_box", *TOLERANT_STARTS):
        print(f"{variant}: Dice {dice2d(start_mask(predictor, variant, prompt.index, prompt).mask, ref):.3f}")


def write_csv(rows: list[dict], path: Path) -> None:
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="/tmp/click_strategies")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--propagated", action="store_true",
                        help="also correct masks propagated from a box start (encodes every target slice)")
    parser.add_argument("--skip-start", action="store_true", help="only the propagated corrections")
    parser.add_argument("--start-only", action="store_true", help="only the start experiment")
    parser.add_argument("--eval3d", metavar="START_VARIANT",
                        help="instead: the 3D evaluation (click start with this variant, default options)")
    parser.add_argument("--rounds", type=int, default=0, help="correction rounds of --eval3d")
    parser.add_argument("--demo", action="store_true", help="instead: best_box's candidates on the demo lesion")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(1)
    from SAM3DSegmentLib.models.builders import build_model
    from SAM3DSegmentLib.models.checkpoint_cache import resolve_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("litemedsam", resolve_checkpoint("litemedsam"), args.device)
    if args.demo:
        return demo_check(model, args.device)
    cases = select_cases(open_dataset(args.data), [c for c in args.cases.split(",") if c])
    if args.eval3d:
        return eval3d(args, model, cases, out)
    global START_ONLY
    START_ONLY = args.start_only
    start_rows: list[dict] = []
    correction_rows: list[dict] = []
    box3d_rows: list[dict] = []
    started = time.perf_counter()
    for case in cases:
        volume, label = load_case(case)
        predictor = SamSlicePredictor(volume, AXIS, model, "litemedsam", args.device)
        spacing_rc = tuple(float(s) for s in np.delete(volume.spacing_kji, AXIS))
        for target in case_targets(case, label):
            reference = target_mask(case, label, target)
            if not reference.any():
                continue
            if not args.skip_start:
                run_target(predictor, case, target, reference, spacing_rc, start_rows, correction_rows)
            if args.propagated:
                run_propagated(predictor, case, target, reference, spacing_rc, correction_rows, box3d_rows)
        predictor.close()
        write_csv(start_rows, out / "start.csv")
        write_csv(correction_rows, out / "correction.csv")
        if box3d_rows:
            write_csv(box3d_rows, out / "box_start_3d.csv")
        (out / "summary.md").write_text(summary(start_rows, correction_rows, box3d_rows), encoding="utf-8")
    text = summary(start_rows, correction_rows, box3d_rows)
    text += f"\nWall time {time.perf_counter() - started:.0f} s.\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
