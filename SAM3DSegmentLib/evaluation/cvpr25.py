"""The CVPR 2025 interactive 3D segmentation challenge's protocol: a box, then 5 clicks.

As ``CVPR25_iter_eval.py`` (github.com/JunMa11/CVPR-MedSegFMCompetition) runs it, per image and
for all its classes (targets) in parallel:

- step 1: each class's 2D box on its middle slice (``z_mid``: the middle of the slices holding
  the class), with the class's slice range ``z_min..z_max``. Images without boxes skip step 1
  (it scores DSC 0, NSD 0, time 0) and get clicks only;
- steps 2-6: per class, one click at the centre of the largest 3D error component (26-connected)
  of the current prediction against the reference: the voxel with the largest Euclidean distance
  to the component's boundary, in voxels (the challenge's EDT ignores the spacing), the first
  component when sizes tie, one of the equally distant voxels drawn with ``RandomState(42)``.
  Foreground if the reference has the class there (missed object), background otherwise;
- after every step: DSC and NSD (2 mm, surfel areas as in DeepMind's surface-distance code) per
  class; the image's score is the mean over its classes, and its NSD is 0 when that mean DSC is
  0.2 or less. AUCs integrate the 5 click steps only (trapezoids, unit spacing: 0..4).

Here each class is its own object in one session (the oracle: one session per class), so one
class's prompts and masks never touch another's. The challenge scores a single label map
(``segs``); we write it class by class in ascending label order (a voxel claimed by two classes
goes to the later one) and, as the challenge does, score and place clicks from that label map.
"""

from __future__ import annotations

import csv
import functools
import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from scipy import ndimage

from ..data.prompts import Box, Point, SlicePrompt
from ..data.volume import Volume, get_slice, kji_to_slice
from ..engines.session import Session
from ..errors import InputError
from .correction_rounds import EvaluationConfig, open_evaluation_session

log = logging.getLogger(__name__)

N_CLICKS = 5
STEPS = N_CLICKS + 1
CLICK_SEED = 42
"""The challenge re-seeds numpy with 42 before drawing each click among equally distant voxels."""
SECONDS_PER_CLASS = 90.0
NSD_DICE_GATE = 0.2
NSD_TOLERANCE_MM = 2.0
LARGE_ROI_VOXELS = 60_000_000
"""Above this, the challenge computes the click's distance transform at half resolution."""


# --- scoring -----------------------------------------------------------------------------------


def class_dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of one class; NaN when both masks are empty (the challenge's convention)."""
    reference, prediction = np.asarray(reference, bool), np.asarray(prediction, bool)
    total = int(reference.sum()) + int(prediction.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(reference & prediction)) / total


@functools.lru_cache(maxsize=1)
def _cube_triangles() -> tuple[np.ndarray, ...]:
    """Marching-cubes triangles (n, 3, 3) in voxel units for each of the 256 2x2x2 cube codes.

    A cube with more than 4 voxels set takes the triangles of its complement (as DeepMind's
    surfel table, which the challenge uses, does; Lorensen's tables differ on 44 such cubes)."""
    from skimage.measure import marching_cubes

    bits = (1 << np.arange(8)).reshape(2, 2, 2)
    triangles = []
    for code in range(256):
        if code in (0, 255):
            triangles.append(np.zeros((0, 3, 3)))
            continue
        drawn = 255 - code if bin(code).count("1") > 4 else code
        cube = ((drawn & bits) > 0).astype(np.float64)
        vertices, faces, _, _ = marching_cubes(cube, level=0.5, method="lorensen")
        triangles.append(vertices[faces])
    return tuple(triangles)


def _surfel_areas(spacing) -> np.ndarray:
    """Surface area in mm² of each cube code."""
    scale = np.asarray(spacing, dtype=np.float64)
    areas = np.zeros(256)
    for code, triangles in enumerate(_cube_triangles()):
        if len(triangles):
            t = triangles * scale
            areas[code] = 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1).sum()
    return areas


def _cube_codes(mask: np.ndarray) -> np.ndarray:
    """The code of every 2x2x2 cube of voxels (the grid of voxel corners, shape + 1)."""
    padded = np.pad(mask.astype(np.uint16), 1)
    shape = tuple(s - 1 for s in padded.shape)
    codes = np.zeros(shape, dtype=np.uint16)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                codes |= padded[a:a + shape[0], b:b + shape[1], c:c + shape[2]] << (a * 4 + b * 2 + c)
    return codes


def surface_dice(reference: np.ndarray, prediction: np.ndarray, spacing, tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice with surfel areas (the challenge's metric); NaN when both are empty,
    0 when exactly one is."""
    reference, prediction = np.asarray(reference, bool), np.asarray(prediction, bool)
    has_ref, has_pred = bool(reference.any()), bool(prediction.any())
    if not has_ref and not has_pred:
        return float("nan")
    if not has_ref or not has_pred:
        return 0.0
    union = reference | prediction
    box = tuple(slice(int(np.flatnonzero(union.any(axis=tuple(o for o in range(3) if o != a)))[0]),
                      int(np.flatnonzero(union.any(axis=tuple(o for o in range(3) if o != a)))[-1]) + 1)
                for a in range(3))
    areas = _surfel_areas(spacing)
    code_ref, code_pred = _cube_codes(reference[box]), _cube_codes(prediction[box])
    border_ref = (code_ref != 0) & (code_ref != 255)
    border_pred = (code_pred != 0) & (code_pred != 255)
    to_pred = ndimage.distance_transform_edt(~border_pred, sampling=spacing)[border_ref]
    to_ref = ndimage.distance_transform_edt(~border_ref, sampling=spacing)[border_pred]
    area_ref, area_pred = areas[code_ref[border_ref]], areas[code_pred[border_pred]]
    close = area_ref[to_pred <= tolerance_mm].sum() + area_pred[to_ref <= tolerance_mm].sum()
    return float(close / (area_ref.sum() + area_pred.sum()))


def interaction_auc(values: list[float]) -> float:
    """Area under the score curve of the last 5 steps (the clicks), unit spacing, trapezoids."""
    clicks = np.asarray(values[-N_CLICKS:], dtype=np.float64)
    return float(((clicks[1:] + clicks[:-1]) / 2).sum())


@dataclass(frozen=True)
class StepScores:
    """Per-class and whole-image scores after one step."""

    dice: list[float]
    nsd: list[float]
    image_dice: float
    image_nsd: float


def score_step(references: list[np.ndarray], predictions: list[np.ndarray], spacing,
               tolerance_mm: float = NSD_TOLERANCE_MM) -> StepScores:
    """DSC and NSD per class, and the image's mean over classes (NSD 0 unless its DSC > 0.2).

    A class's own NSD is likewise 0 when its own DSC is 0.2 or less."""
    dices = [class_dice(r, p) for r, p in zip(references, predictions)]
    image_dice = float(np.mean(dices)) if dices else float("nan")
    raw = [surface_dice(r, p, spacing, tolerance_mm) if (d > NSD_DICE_GATE or image_dice > NSD_DICE_GATE) else 0.0
           for r, p, d in zip(references, predictions, dices)]
    image_nsd = float(np.mean(raw)) if image_dice > NSD_DICE_GATE else 0.0
    nsds = [n if d > NSD_DICE_GATE else 0.0 for n, d in zip(raw, dices)]
    return StepScores(dices, nsds, image_dice, image_nsd)


# --- the simulated user --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChallengeBox:
    """A class's box as the challenge stores it: slice range and the 2D box (x = column, y = row,
    inclusive) on the middle slice, along the propagation axis."""

    z_min: int
    z_max: int
    z_mid: int
    x_min: int
    y_min: int
    x_max: int
    y_max: int

    @classmethod
    def from_dict(cls, entry: dict) -> "ChallengeBox":
        names = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")
        return cls(*(int(entry[n]) for n in names))

    def to_dict(self) -> dict:
        return {"z_min": self.z_min, "z_max": self.z_max, "z_mid": self.z_mid, "z_mid_x_min": self.x_min,
                "z_mid_y_min": self.y_min, "z_mid_x_max": self.x_max, "z_mid_y_max": self.y_max}


def challenge_box(reference: np.ndarray, axis: int, rng: np.random.RandomState) -> ChallengeBox:
    """The box the challenge's ``get_boxes.py`` makes: middle slice, box grown by 0-5 px x size/256."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(reference.any(axis=other))
    middle = int(present[len(present) // 2])
    rows, cols = np.nonzero(get_slice(reference, axis, middle))
    height, width = get_slice(reference, axis, middle).shape
    shift = int(rng.randint(0, 6))
    dx, dy = int(shift * width / 256), int(shift * height / 256)
    return ChallengeBox(int(present[0]), int(present[-1]), middle,
                        max(0, int(cols.min()) - dx), max(0, int(rows.min()) - dy),
                        min(width - 1, int(cols.max()) + dx), min(height - 1, int(rows.max()) + dy))


def box_prompt(box: ChallengeBox, axis: int, shape: tuple[int, int, int]) -> SlicePrompt:
    """The box as a prompt on its middle slice (a one-pixel-thin box is widened by one pixel)."""
    rows, cols = [s for a, s in enumerate(shape) if a != axis]
    row0, row1, col0, col1 = box.y_min, box.y_max, box.x_min, box.x_max
    if row1 - row0 < 1:
        row0, row1 = (row0 - 1, row1) if row1 + 1 >= rows else (row0, row1 + 1)
    if col1 - col0 < 1:
        col0, col1 = (col0 - 1, col1) if col1 + 1 >= cols else (col0, col1 + 1)
    return SlicePrompt(axis=axis, index=box.z_mid, box=Box(row0, col0, row1, col1))


@dataclass(frozen=True)
class ChallengeClick:
    """One simulated click: voxel (k, j, i), include or exclude, size of its error component."""

    kji: tuple[int, int, int]
    positive: bool
    component_voxels: int

    @property
    def kind(self) -> str:
        return "fg" if self.positive else "bg"


def component_distance(component: np.ndarray) -> np.ndarray:
    """Distance in voxels to the component's boundary, computed on its padded bounding box as
    the challenge does (2x downsampled above 60 M voxels)."""
    coords = np.argwhere(component)
    low, high = coords.min(axis=0), coords.max(axis=0) + 1
    size = high - low
    pad = np.maximum((size * 0.25).astype(int), 1)
    crop = np.zeros(size + 2 * pad, dtype=np.uint8)
    inner = tuple(slice(p, p + s) for p, s in zip(pad, size))
    crop[inner] = component[tuple(slice(lo, hi) for lo, hi in zip(low, high))]
    if crop.size > LARGE_ROI_VOXELS:
        from skimage.measure import block_reduce

        reduced = ndimage.distance_transform_edt(block_reduce(crop, (2, 2, 2), func=np.max))
        distance = reduced.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    else:
        distance = ndimage.distance_transform_edt(crop)
    full = np.zeros(component.shape, dtype=distance.dtype)
    full[tuple(slice(lo, hi) for lo, hi in zip(low, high))] = distance[inner]
    return full


def error_click(prediction: np.ndarray, reference: np.ndarray, seed: int = CLICK_SEED) -> ChallengeClick | None:
    """The challenge's click for one class, or None when the prediction is perfect."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    error = prediction != reference
    if not error.any():
        return None
    labels, _ = ndimage.label(error, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    distance = component_distance(largest) * largest
    if not distance.any():
        distance = largest.astype(np.float64)
    candidates = np.argwhere(distance == distance.max())
    chosen = candidates[np.random.RandomState(seed).choice(len(candidates))]
    kji = tuple(int(v) for v in chosen)
    return ChallengeClick(kji, bool(reference[kji]), int(sizes.max()))


def click_prompt(click: ChallengeClick, axis: int) -> SlicePrompt:
    """The click as a point on its own slice along the propagation axis."""
    index, row, col = kji_to_slice(axis, click.kji)
    return SlicePrompt(axis=axis, index=int(index), points=(Point(float(row), float(col), click.positive),))


# --- images and the protocol ---------------------------------------------------------------------


@dataclass
class ChallengeTarget:
    """One class of an image: its name, the label value written in ``segs``, its reference, its box."""

    name: str
    value: int
    reference: np.ndarray = field(repr=False)
    box: ChallengeBox | None = None


@dataclass
class ChallengeImage:
    """One image with all its classes."""

    name: str
    dataset: str
    modality: str
    volume: Volume = field(repr=False)
    targets: list[ChallengeTarget]


@dataclass
class Cvpr25Row:
    """One class (or ``target == "all"``: the image's multi-class score) through the 6 steps."""

    dataset: str
    case: str
    modality: str
    engine: str
    model: str
    target: str
    label: int
    has_box: bool
    dsc: list[float]
    nsd: list[float]
    seconds: list[float]
    clicks: list[str]
    slices_encoded: int = 0
    classes: int = 1

    @property
    def dsc_auc(self) -> float:
        return interaction_auc(self.dsc)

    @property
    def nsd_auc(self) -> float:
        return interaction_auc(self.nsd)

    @property
    def seconds_total(self) -> float:
        return float(sum(self.seconds))

    @property
    def budget_s(self) -> float:
        return SECONDS_PER_CLASS * self.classes

    @property
    def over_budget(self) -> bool:
        return self.seconds_total > self.budget_s


@dataclass
class ImageResult:
    """Rows of one image (classes, then the image) and the label map after every step."""

    rows: list[Cvpr25Row]
    all_segs: list[np.ndarray] = field(repr=False)


SessionOpener = Callable[[EvaluationConfig, ChallengeImage], list[Session]]


def open_image_sessions(config: EvaluationConfig, image: ChallengeImage) -> list[Session]:
    """One session per class for the oracle (it answers from one reference); otherwise one
    session shared by all classes (each its own object), so slices are encoded once."""
    if config.engine == "oracle":
        return [open_evaluation_session(config, image.volume, t.reference) for t in image.targets]
    shared = open_evaluation_session(config, image.volume, np.zeros(image.volume.shape, bool))
    return [shared] * len(image.targets)


def label_map(masks: list[np.ndarray], values: list[int], shape) -> np.ndarray:
    """The classes written in ascending label order (a later class wins an overlap)."""
    segs = np.zeros(shape, dtype=np.uint8)
    for value, mask in sorted(zip(values, masks), key=lambda item: item[0]):
        segs[mask] = value
    return segs


def _overlap(references: list[np.ndarray]) -> bool:
    total = np.zeros(references[0].shape, dtype=np.uint8)
    for reference in references:
        total += reference
    return bool((total > 1).any())


def evaluate_image(
    config: EvaluationConfig,
    image: ChallengeImage,
    open_sessions: SessionOpener = open_image_sessions,
    use_z_range: bool = True,
    engine_label: str | None = None,
) -> ImageResult:
    """Run the box + 5 clicks protocol on every class of ``image``.

    ``use_z_range``: propagation is limited to each box's slice range (its z-range along the
    propagation axis); classes without a box propagate freely.
    """
    volume, targets, axis = image.volume, image.targets, config.axis
    if not targets:
        raise InputError(f"Image {image.name} has no class to evaluate.")
    values = [t.value for t in targets]
    references = [np.asarray(t.reference, bool) for t in targets]
    nested = _overlap(references)
    if nested:
        log.warning("%s: classes overlap in the reference; each is scored and clicked from its own mask", image.name)
    spacing = volume.spacing_kji
    masks = [np.zeros(volume.shape, bool) for _ in targets]
    options = [replace(config.propagation, slice_range=(t.box.z_min, t.box.z_max))
               if (t.box is not None and use_z_range) else config.propagation for t in targets]
    sessions = open_sessions(config, image)
    for session in sessions:  # a click joins its slice's current mask, for every engine (the weight-free
        session.refines_propagated_slices = True  # one would otherwise restart from the lone click)
    engine = engine_label or getattr(sessions[0], "engine_name", config.engine)
    if config.engine == "oracle":
        engine = "oracle"
    rows = [Cvpr25Row(image.dataset, image.name, image.modality, engine, config.model or "", t.name, t.value,
                      t.box is not None, [], [], [], []) for t in targets]
    whole = Cvpr25Row(image.dataset, image.name, image.modality, engine, config.model or "", "all", 0,
                      any(t.box is not None for t in targets), [], [], [], [], classes=len(targets))
    all_segs: list[np.ndarray] = []
    segs = np.zeros(volume.shape, np.uint8)
    try:
        for step in range(STEPS):
            if step == 0 and not whole.has_box:  # the challenge: no box, no first prediction
                for row in rows + [whole]:
                    row.dsc.append(0.0)
                    row.nsd.append(0.0)
                    row.seconds.append(0.0)
                    row.clicks.append("none")
                continue
            for n, (target, session) in enumerate(zip(targets, sessions)):
                if step == 0:
                    prompt, note = (box_prompt(target.box, axis, volume.shape), "box") if target.box else (None, "none")
                else:
                    current = masks[n] if nested else segs == target.value
                    click = error_click(current, references[n])
                    prompt = click_prompt(click, axis) if click else None
                    note = click.kind if click else "-"
                    if click:
                        log.debug("%s / %s step %d: %s click at kji %s (component %d voxels)", image.name,
                                  target.name, step + 1, click.kind, click.kji, click.component_voxels)
                started = time.perf_counter()
                if prompt is not None:
                    session.add_prompt(n + 1, prompt)
                    masks[n] = session.propagate(n + 1, options[n]).mask.copy()
                rows[n].seconds.append(time.perf_counter() - started if prompt is not None else 0.0)
                rows[n].clicks.append(note)
            segs = label_map(masks, values, volume.shape)
            all_segs.append(segs)
            predictions = masks if nested else [segs == v for v in values]
            scores = score_step(references, predictions, spacing, config.nsd_tolerance_mm)
            for n, row in enumerate(rows):
                row.dsc.append(scores.dice[n])
                row.nsd.append(scores.nsd[n])
            whole.dsc.append(scores.image_dice)
            whole.nsd.append(scores.image_nsd)
            whole.seconds.append(sum(r.seconds[-1] for r in rows))
            whole.clicks.append("+".join(r.clicks[-1] for r in rows))
        encoded = sum(s.slices_encoded_total for s in {id(s): s for s in sessions}.values())
    finally:
        for session in {id(s): s for s in sessions}.values():
            session.close()
    whole.slices_encoded = encoded
    for row in rows:
        row.slices_encoded = encoded if len(rows) == 1 else 0
    result_rows = rows + ([whole] if len(rows) > 1 else [])
    for row in result_rows:
        if row.over_budget:
            log.warning("%s / %s: %.0f s over the challenge's budget of %.0f s", image.name, row.target,
                        row.seconds_total, row.budget_s)
    return ImageResult(result_rows, all_segs)


def evaluate_images(
    config: EvaluationConfig,
    images: Iterable[ChallengeImage],
    out_dir: str | Path | None = None,
    use_z_range: bool = True,
    write_segs: bool = True,
) -> list[Cvpr25Row]:
    """The protocol on every image; writes ``<case>.npz`` (segs, all_segs), ``cvpr25.csv``,
    ``cvpr25_summary.md`` and ``cvpr25_dice.png`` into ``out_dir``."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows: list[Cvpr25Row] = []
    for image in images:
        result = evaluate_image(config, image, use_z_range=use_z_range)
        rows.extend(result.rows)
        last = result.rows[-1]
        log.info("%s (%s): DSC %s  AUC %.2f  NSD final %.3f  %.1f s", image.name, last.target,
                 " ".join(f"{d:.3f}" for d in last.dsc), last.dsc_auc, last.nsd[-1], last.seconds_total)
        if out is not None:
            if write_segs:
                write_challenge_output(out / f"{image.name}.npz", result.all_segs)
            write_csv(rows, out / "cvpr25.csv")
    if not rows:
        raise InputError("Nothing was evaluated: no image had a non-empty class.")
    if out is not None:
        (out / "cvpr25_summary.md").write_text(summarise(rows), encoding="utf-8")
        save_step_plot(rows, out / "cvpr25_dice.png")
    return rows


def write_challenge_output(path: str | Path, all_segs: list[np.ndarray]) -> Path:
    """``segs`` (the last step's label map) and ``all_segs`` (every step's) as the challenge writes them."""
    path = Path(path)
    stacked = np.stack(all_segs).astype(np.uint8) if all_segs else np.zeros((0,), np.uint8)
    np.savez_compressed(path, segs=stacked[-1] if all_segs else stacked, all_segs=stacked)
    return path


# --- reports -------------------------------------------------------------------------------------

CSV_FIELDS = (
    ["dataset", "case", "modality", "engine", "model", "target", "label", "has_box"]
    + [f"dsc_{i}" for i in range(1, STEPS + 1)] + [f"nsd_{i}" for i in range(1, STEPS + 1)]
    + ["dsc_auc", "nsd_auc", "dsc_final", "nsd_final"]
    + [f"seconds_{i}" for i in range(1, STEPS + 1)]
    + ["seconds_total", "budget_s", "over_budget", "clicks", "slices_encoded"]
)


def write_csv(rows: list[Cvpr25Row], path: str | Path) -> None:
    """One line per class and per multi-class image (``target`` = all)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for r in rows:
            writer.writerow(
                [r.dataset, r.case, r.modality, r.engine, r.model, r.target, r.label, r.has_box]
                + [f"{v:.4f}" for v in r.dsc] + [f"{v:.4f}" for v in r.nsd]
                + [f"{r.dsc_auc:.4f}", f"{r.nsd_auc:.4f}", f"{r.dsc[-1]:.4f}", f"{r.nsd[-1]:.4f}"]
                + [f"{v:.2f}" for v in r.seconds]
                + [f"{r.seconds_total:.2f}", f"{r.budget_s:.0f}", r.over_budget, " ".join(r.clicks), r.slices_encoded]
            )


def read_csv(path: str | Path) -> list[Cvpr25Row]:
    """Rows written by :func:`write_csv` (to combine runs in one table or plot)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line in csv.DictReader(handle):
            rows.append(Cvpr25Row(
                line["dataset"], line["case"], line["modality"], line["engine"], line["model"], line["target"],
                int(line["label"]), line["has_box"] == "True",
                [float(line[f"dsc_{i}"]) for i in range(1, STEPS + 1)],
                [float(line[f"nsd_{i}"]) for i in range(1, STEPS + 1)],
                [float(line[f"seconds_{i}"]) for i in range(1, STEPS + 1)],
                line["clicks"].split(" "), int(line["slices_encoded"]), classes=int(float(line["budget_s"]) // SECONDS_PER_CLASS),
            ))
    return rows


def modality_group(modality: str) -> str:
    text = (modality or "").upper()
    return "CT" if text.startswith("CT") else "MR" if text.startswith("MR") else (modality or "?")


def summary_table(rows: list[Cvpr25Row]) -> str:
    """Mean per engine and modality over classes (per-class rows, not image rows)."""
    classes = [r for r in rows if r.target != "all"]
    groups: dict[tuple[str, str], list[Cvpr25Row]] = {}
    for r in classes:
        groups.setdefault((r.engine, modality_group(r.modality)), []).append(r)
        groups.setdefault((r.engine, "all"), []).append(r)
    lines = ["| engine | modality | n | DSC box | DSC final | DSC AUC | NSD box | NSD final | NSD AUC | s / step | over 90 s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (engine, modality), members in sorted(groups.items()):
        mean = lambda values: statistics.fmean(values)  # noqa: E731
        lines.append(
            f"| {engine} | {modality} | {len(members)} | {mean([r.dsc[0] for r in members]):.3f} | "
            f"{mean([r.dsc[-1] for r in members]):.3f} | {mean([r.dsc_auc for r in members]):.3f} | "
            f"{mean([r.nsd[0] for r in members]):.3f} | {mean([r.nsd[-1] for r in members]):.3f} | "
            f"{mean([r.nsd_auc for r in members]):.3f} | "
            f"{mean([s for r in members for s in r.seconds if s > 0] or [0.0]):.1f} | "
            f"{sum(r.over_budget for r in members)} |")
    return "\n".join(lines) + "\n"


def summarise(rows: list[Cvpr25Row]) -> str:
    """The Markdown summary: per engine and modality, then per class and per multi-class image."""
    lines = ["| engine | case | target | DSC 1..6 | DSC AUC | NSD final | NSD AUC | s total | clicks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.engine} | {r.case} | {r.target} | {' '.join(f'{d:.2f}' for d in r.dsc)} | "
                     f"{r.dsc_auc:.2f} | {r.nsd[-1]:.3f} | {r.nsd_auc:.2f} | {r.seconds_total:.1f}"
                     f"{' (over)' if r.over_budget else ''} | {' '.join(r.clicks)} |")
    return (
        "# CVPR 2025 protocol: box + 5 clicks\n\n"
        "Step 1 is the box (DSC 0 when the image has no box), steps 2-6 one click each; AUCs over the 5 "
        "click steps (0..4). Means over classes; `all` rows are the challenge's multi-class image score.\n\n"
        + summary_table(rows) + "\n## Per class and image\n\n" + "\n".join(lines) + "\n"
    )


def step_means(rows: list[Cvpr25Row]) -> dict[str, list[float]]:
    """Mean class DSC at each step, per engine."""
    by_engine: dict[str, list[Cvpr25Row]] = {}
    for r in rows:
        if r.target != "all":
            by_engine.setdefault(r.engine, []).append(r)
    return {e: [statistics.fmean(r.dsc[i] for r in members) for i in range(STEPS)] for e, members in by_engine.items()}


PLOT_COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def save_step_plot(rows: list[Cvpr25Row], path: str | Path, width: int = 640, height: int = 420) -> Path:
    """A PNG of mean Dice against interaction step, one line per engine (drawn with Pillow)."""
    from PIL import Image, ImageDraw

    means = step_means(rows)
    left, right, top, bottom = 60, 150, 30, 50
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom

    def at(step: int, value: float) -> tuple[float, float]:
        return left + plot_w * step / (STEPS - 1), top + plot_h * (1 - value)

    for tick in np.linspace(0, 1, 6):
        y = at(0, tick)[1]
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 32, y - 6), f"{tick:.1f}", fill=(0, 0, 0))
    for step in range(STEPS):
        x = at(step, 0)[0]
        draw.text((x - 10, top + plot_h + 6), "box" if step == 0 else f"+{step}", fill=(0, 0, 0))
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    draw.text((left, 8), "Mean Dice (whole volume) per interaction step: box, then clicks", fill=(0, 0, 0))
    draw.text((left + plot_w // 2 - 40, height - 20), "interaction step", fill=(0, 0, 0))
    for n, (engine, values) in enumerate(sorted(means.items())):
        colour = PLOT_COLOURS[n % len(PLOT_COLOURS)]
        points = [at(i, float(np.clip(v, 0, 1))) for i, v in enumerate(values)]
        draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 10 + 18 * n
        draw.line([(left + plot_w + 10, ly + 6), (left + plot_w + 30, ly + 6)], fill=colour, width=3)
        draw.text((left + plot_w + 36, ly), engine, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path

