"""Speed and memory of our engines against the pipelines peers use, measured in one run.

Same weights (one model object shared by ours and the baseline; random initialisation unless a
checkpoint is given), same real volume, same windowed intensities, same prompt. Per repeat:

1. ours: prompt the target's largest slice (preview), propagate (first propagation);
2. ours: a correction click on an already encoded slice (preview latency, decoder only), then
   propagate again (only the runs touching that slice; embeddings are cached);
3. the baseline over every slice (:mod:`baselines`);
4. one bare image-encoder forward (median of 3), the unit cost of a propagation.

With random weights a stop rule cannot judge where the object ends, so by default
(``stop="target-range"``) our propagation runs over the target's slices plus ``patience`` on
each side with the stop rule off: what a trained model with the stop rule does when it stops
right. ``stop="rule"`` uses the engine's own stop rule instead (meaningful with real weights).
Ratios are taken within each repeat, then medians over repeats. Memory is the resident set size
(RSS, sampled from /proc every 5 ms): its peak increase during each first propagation in the
first repeat (later repeats reuse memory the allocator already holds), and the process's peak
RSS during it.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.intensity import WindowSpec, window_volume
from ..data.prompts import Point, SlicePrompt
from ..data.volume import Volume, get_slice
from ..engines.session import PropagationOptions, Session, StopRule
from ..errors import InputError
from .datasets import Case, load_case, open_dataset, select_cases, target_mask
from .simulated_user import SimulatedUser, interior_point, slice_areas, slice_spacing

log = logging.getLogger(__name__)

OBJECT_ID = 1
DEFAULT_MODELS = {"sam2": "sam2.1_hiera_tiny", "slicewise": "litemedsam"}
VOLUMETRIC_NOT_BENCHED = (
    "The volumetric engine (3DSAM-adapter) runs the authors' own one-crop pipeline, so there is no peer pipeline "
    "to time it against here; time it with `sam3d eval --engine volumetric --model 3dsam_adapter_<task>` "
    "(seconds per target in results.csv)."
)


class PeakRss:
    """Peak resident set size during a ``with`` block, sampled in a thread (Linux /proc)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def current_bytes() -> int:
        import os

        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: fall back to the lifetime peak
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self.current_bytes())

    def __enter__(self) -> "PeakRss":
        self.start_bytes = self.peak_bytes = self.current_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.current_bytes())

    @property
    def increase_mb(self) -> float:
        return (self.peak_bytes - self.start_bytes) / 2**20


@dataclass
class RepeatFigures:
    """Raw figures of one repeat."""

    first_seconds: float
    first_encoded: int
    first_slices_computed: int
    preview_encoded_seconds: float
    repropagation_seconds: float
    repropagation_encoded: int
    repropagation_slices_computed: int
    baseline_seconds: float
    baseline_encoded: int
    encoder_seconds: float
    ours_peak_mb: float
    baseline_peak_mb: float
    ours_peak_rss_mb: float
    baseline_peak_rss_mb: float
    ours_dice: float
    baseline_dice: float


@dataclass
class BenchReport:
    """What ``sam3d bench`` prints."""

    engine: str
    model: str
    weights: str
    case: str
    target: str
    n_slices: int
    slice_shape: tuple[int, int]
    extent: int
    patience: int
    stop_mode: str
    slab: str
    baseline: str
    repeats: list[RepeatFigures] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(r, name) for r in self.repeats)

    def median_ratio(self, numerator: str, denominator: str) -> float:
        return statistics.median(getattr(r, numerator) / max(getattr(r, denominator), 1e-12) for r in self.repeats)

    def lines(self) -> list[str]:
        ideal = min(self.n_slices, self.extent + 2 * self.patience)
        m = self.median
        overhead_ours = statistics.median(
            r.first_seconds / max(r.first_encoded * r.encoder_seconds, 1e-12) for r in self.repeats)
        overhead_base = statistics.median(
            r.baseline_seconds / max(r.baseline_encoded * r.encoder_seconds, 1e-12) for r in self.repeats)
        return [
            f"engine {self.engine} ({self.model}, {self.weights}) vs baseline: {self.baseline}",
            f"case {self.case}, target {self.target}: {self.n_slices} slices of {self.slice_shape[0]} x "
            f"{self.slice_shape[1]} px{self.slab}; target spans {self.extent} slices; patience {self.patience}; "
            f"stop: {self.stop_mode}",
            f"repeats {len(self.repeats)}; medians over repeats; ratios within each repeat, then median",
            f"slices encoded, ours:      {m('first_encoded'):.0f} = {m('first_encoded') / ideal:.2f} x "
            f"(extent + 2 x patience = {ideal})",
            f"slices encoded, baseline:  {m('baseline_encoded'):.0f} = {m('baseline_encoded') / ideal:.2f} x "
            f"(extent + 2 x patience)",
            f"wall time first propagation: ours {m('first_seconds'):.2f} s, baseline {m('baseline_seconds'):.2f} s, "
            f"ratio ours/baseline {self.median_ratio('first_seconds', 'baseline_seconds'):.2f}",
            f"bare encoder forward: {m('encoder_seconds'):.3f} s/slice; overhead = wall / (encoded x encoder): "
            f"ours {overhead_ours:.2f}, baseline {overhead_base:.2f}",
            f"re-propagation after a one-slice correction: {m('repropagation_seconds'):.2f} s, "
            f"{m('repropagation_slices_computed'):.0f} slices recomputed, {m('repropagation_encoded'):.0f} encoded; "
            f"ratio to first propagation {self.median_ratio('repropagation_seconds', 'first_seconds'):.2f}",
            f"preview latency on an encoded slice (decoder only): {1000 * m('preview_encoded_seconds'):.0f} ms",
            f"peak RSS increase during the first propagation, first repeat (later repeats reuse freed "
            f"memory): ours {self.repeats[0].ours_peak_mb:.0f} MB, baseline {self.repeats[0].baseline_peak_mb:.0f} MB; "
            f"process peak RSS during it (median): ours {m('ours_peak_rss_mb'):.0f} MB, baseline "
            f"{m('baseline_peak_rss_mb'):.0f} MB (RSS sampled from /proc every 5 ms)",
            f"Dice to the reference{' (random weights: not an accuracy figure)' if self.weights == 'random init' else ''}: "
            f"ours {m('ours_dice'):.3f}, baseline {m('baseline_dice'):.3f}",
        ]


def load_bench_case(data: str | Path, case_name: str, target: str, max_slices: int | None, axis: int = 0):
    """Volume and target mask of one case, optionally cut to a slab of ``max_slices`` slices
    centred on the target (stated in the report)."""
    case: Case = select_cases(open_dataset(data), [case_name])[0]
    volume, label = load_case(case)
    reference = target_mask(case, label, target)
    if not reference.any():
        raise InputError(f"Target {target} is empty in case {case_name}.")
    slab = ""
    if max_slices is not None and max_slices < volume.n_slices(axis):
        present = np.flatnonzero(slice_areas(reference, axis))
        centre = (present[0] + present[-1]) // 2
        lo = int(np.clip(centre - max_slices // 2, 0, volume.n_slices(axis) - max_slices))
        keep = [slice(None)] * 3
        keep[axis] = slice(lo, lo + max_slices)
        shift = np.eye(4)
        shift[2 - axis, 3] = lo  # ijk_to_ras takes (i, j, k): array axis a is ijk index 2 - a
        volume = Volume(np.ascontiguousarray(volume.array[tuple(keep)]), volume.ijk_to_ras @ shift,
                        volume.name, volume.modality)
        reference = np.ascontiguousarray(reference[tuple(keep)])
        slab = f" (slab {lo}..{lo + max_slices - 1} of {label.shape[axis]}, --max-slices {max_slices})"
    return case, volume, reference, slab


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def correction_prompt(reference: np.ndarray, axis: int, anchor: int, lo: int, hi: int, spacing) -> SlicePrompt:
    """An include click on the slice halfway from the anchor to the far end of the computed
    range (an already encoded slice), at the reference's interior-most point there."""
    far = hi if hi - anchor >= anchor - lo else lo
    index = anchor + (far - anchor) // 2
    if index == anchor:
        index = far
    plane = get_slice(reference, axis, index)
    if plane.any():
        row, col = interior_point(plane, slice_spacing(spacing, axis))
    else:
        row, col = plane.shape[0] // 2, plane.shape[1] // 2
    return SlicePrompt(axis, index, points=(Point(row, col, True),))


def run_benchmark(
    engine: str,
    data: str | Path,
    case_name: str,
    target: str,
    repeats: int = 3,
    model_name: str | None = None,
    checkpoint: str | None = None,
    device: str | None = "cpu",
    max_slices: int | None = None,
    stop_mode: str | None = None,
    patience: int | None = None,
    axis: int = 0,
) -> BenchReport:
    """Load the case, build the model through the official builder, and measure (see
    :func:`benchmark_engine`). ``stop_mode`` None: the stop rule with real weights, the target's
    range with random ones."""
    if engine == "volumetric":
        raise InputError(VOLUMETRIC_NOT_BENCHED)
    if engine not in DEFAULT_MODELS:
        raise InputError(f"Benchmark engine must be 'sam2' or 'slicewise'; got {engine!r}.")
    from ..models.builders import build_model
    from ..models.registry import get_spec

    spec = get_spec(model_name or DEFAULT_MODELS[engine])
    if spec.family == "sam3d_adapter":
        raise InputError(f"Model {spec.name} is a 3DSAM-adapter model. {VOLUMETRIC_NOT_BENCHED}")
    if (spec.family == "sam2") != (engine == "sam2"):
        raise InputError(f"Model {spec.name} is a {spec.family} model; it does not fit the {engine} engine.")
    case, volume, reference, slab = load_bench_case(data, case_name, target, max_slices, axis)
    weights = "checkpoint" if checkpoint else "random init"
    if spec.family == "litemedsam" and checkpoint is None:  # its real weights are installed: use them
        from ..models.checkpoint_cache import resolve_checkpoint

        checkpoint, weights = str(resolve_checkpoint(spec)), "real weights (installed)"
    log.info("building %s (%s)", spec.name, "checkpoint " + checkpoint if checkpoint else "random initialisation")
    model = build_model(spec, checkpoint, device, video=engine == "sam2")
    if stop_mode is None:
        stop_mode = "target-range" if weights == "random init" else "rule"
    return benchmark_engine(
        engine, model, spec, volume, reference, case_name=case.name, target=target, slab=slab,
        weights=weights, repeats=repeats, device=device,
        stop_mode=stop_mode, patience=patience, axis=axis,
    )


def benchmark_engine(
    engine: str,
    model,
    spec,
    volume: Volume,
    reference: np.ndarray,
    case_name: str = "",
    target: str = "",
    slab: str = "",
    weights: str = "random init",
    repeats: int = 3,
    device: str | None = "cpu",
    stop_mode: str = "target-range",
    patience: int | None = None,
    axis: int = 0,
) -> BenchReport:
    """Measure ``engine`` ("sam2" with a ``SAM2VideoPredictor``, or "slicewise" with a SAM
    ``Sam``) against its baseline on one volume and target mask; see the module docstring."""
    if engine not in DEFAULT_MODELS:
        raise InputError(f"Benchmark engine must be 'sam2' or 'slicewise'; got {engine!r}.")
    if stop_mode not in ("target-range", "rule"):
        raise InputError(f"Stop mode must be 'target-range' or 'rule'; got {stop_mode!r}.")
    if repeats < 1:
        raise InputError("Give at least one repeat.")
    if not reference.any():
        raise InputError("The target mask is empty; nothing to benchmark.")
    if patience is None:  # the stop rule's own with real weights; 2 slices around the target otherwise
        patience = StopRule().patience if stop_mode == "rule" else 2
    present = np.flatnonzero(slice_areas(reference, axis))
    n = volume.n_slices(axis)
    lo, hi = max(0, int(present[0]) - patience), min(n - 1, int(present[-1]) + patience)
    if stop_mode == "target-range":
        options = PropagationOptions(slice_range=(lo, hi), stop=StopRule(min_area=0, min_score=None,
                                                                         patience=patience))
    else:
        options = PropagationOptions(stop=StopRule(patience=patience))
    user = SimulatedUser("click" if engine == "sam2" else "box")
    prompt = user.initial_prompt(reference, axis, volume.spacing_kji)
    image_uint8 = window_volume(volume.array, WindowSpec(), volume.modality)
    from .baselines import sam2_jpeg_video_pipeline, sam_box_chaining_pipeline
    from .upstream_litemedsam import run_on_volume

    report = BenchReport(
        engine=engine, model=spec.name, weights=weights, case=case_name, target=target, n_slices=n, slice_shape=tuple(get_slice(reference, axis, 0).shape),
        extent=int(present[-1] - present[0] + 1), patience=patience,
        stop_mode=("target slices +/- patience, stop rule off (random weights)" if stop_mode == "target-range"
                   else "the engine's stop rule"),
        slab=slab,
        baseline=_baseline_name(engine, spec),
    )

    def open_ours() -> Session:
        if engine == "sam2":
            from ..engines.sam2_video import Sam2Session

            return Sam2Session(volume, axis, model, spec, device=device)
        from ..engines.sam_slice_predictor import open_sam_session

        return open_sam_session(volume, axis, model=model, spec=spec, device=device)

    def run_ours() -> dict:
        session = open_ours()
        try:
            with PeakRss() as memory:
                started = time.perf_counter()
                session.add_prompt(OBJECT_ID, prompt)
                first = session.propagate(OBJECT_ID, options)
                first_seconds = time.perf_counter() - started
            first_encoded = session.slices_encoded_total
            computed = first.slices_computed or [prompt.index]
            c_lo, c_hi = min(computed + [prompt.index]), max(computed + [prompt.index])
            fix = correction_prompt(reference, axis, prompt.index, c_lo, c_hi, volume.spacing_kji)
            encoded_before = session.slices_encoded_total
            preview = session.add_prompt(OBJECT_ID, fix)
            if session.slices_encoded_total != encoded_before:
                log.warning("the correction slice %d was not cached; preview includes an encoder run", fix.index)
            started = time.perf_counter()
            again = session.propagate(OBJECT_ID, options)
            repro_seconds = time.perf_counter() - started
            if engine == "sam2":
                encoder = statistics.median(session.time_encoder_forward(prompt.index) for _ in range(3))
            else:
                encoder = statistics.median(_timed(session.predictor.encode_slice, prompt.index) for _ in range(3))
            return dict(first_seconds=first_seconds, first_encoded=first_encoded,
                        first_slices_computed=len(first.slices_computed), preview_encoded_seconds=preview.seconds,
                        repropagation_seconds=repro_seconds, repropagation_encoded=again.slices_encoded,
                        repropagation_slices_computed=len(again.slices_computed), encoder_seconds=encoder,
                        ours_peak_mb=memory.increase_mb, ours_peak_rss_mb=memory.peak_bytes / 2**20,
                        ours_dice=_dice(first.mask, reference))
        finally:
            session.close()

    def run_baseline() -> dict:
        with PeakRss() as memory:
            if engine == "sam2":
                result = sam2_jpeg_video_pipeline(model, image_uint8, axis, prompt)
            elif spec.family == "litemedsam":
                if axis != 0:
                    raise InputError("LiteMedSAM's published 3D pipeline runs along array axis 0 only.")
                result = run_on_volume(model, volume, reference, "upstream")
            else:
                result = sam_box_chaining_pipeline(model, image_uint8, axis, prompt)
        return dict(baseline_seconds=result.seconds, baseline_encoded=result.slices_encoded,
                    baseline_peak_mb=memory.increase_mb, baseline_peak_rss_mb=memory.peak_bytes / 2**20,
                    baseline_dice=_dice(result.mask, reference))

    for index in range(repeats):
        order = (run_ours, run_baseline) if index % 2 == 0 else (run_baseline, run_ours)
        figures: dict = {}
        for step in order:
            figures.update(step())
        report.repeats.append(RepeatFigures(**figures))
        log.info("repeat %d/%d done", index + 1, repeats)
    return report


def _baseline_name(engine: str, spec) -> str:
    if engine == "sam2":
        return "JPEG frames + official SAM2VideoPredictor over every slice (forward, then reverse)"
    if spec.family == "litemedsam":
        return ("LiteMedSAM's published 3D pipeline, given the z-range and the box on its middle slice "
                "from the reference (our engine is given neither)")
    return "official SamPredictor per slice with box chaining over every slice"


def _timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started
