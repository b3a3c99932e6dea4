"""The volumetric engine: 3DSAM-adapter (:mod:`..models.sam3d_adapter`) behind the session interface.

Inference follows the authors' ``test.py`` and their dataset code for the test split:

1. the volume is resampled to 1 mm voxels (trilinear, ``F.interpolate`` with the spacing ratio as
   scale factor), clipped to the checkpoint's HU range and normalised with its dataset mean / std
   (:data:`DATASET_INTENSITY`), and given as 3 identical channels;
2. one crop of ``crop_size``^3 (128) 1-mm voxels is centred on the middle of the clicks' bounding
   box (zero-padded outside the volume); the clicks, relative to the crop, are the prompt;
3. the class-1 softmax of the crop is written into an empty 1-mm probability map, which is
   resampled trilinearly to the volume's grid and thresholded at 0.5.

The authors' promptable inference uses that single crop; their sliding window (``test_auto.py``,
256^3, Gaussian blending) belongs to the prompt-free variant and is not used here.

Clicks: every include click of the object (on any slice) is a prompt point; more clicks rerun the
model with all of them (the authors' ``--num_prompts``). The model has no exclude click nor box;
they are refused with advice. A slice mask (``set_slice_mask``) replaces that slice of the result.
``propagate`` is one 3D inference (the whole volume at once, not slice runs): progress is reported
per step, cancel is checked between steps, and a cancelled call leaves the previous result.

A fine-tuned adapter (``sam3d finetune --engine volumetric``) is loaded on top of the base
checkpoint by ``open_volumetric_session(..., adapter=FILE)``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prompts import SlicePrompt
from ..data.volume import Volume, get_slice, slice_to_kji
from ..errors import InputError, PromptError, PropagationCancelled
from ..models.sam3d_adapter import (
    DATASET_INTENSITY,
    DatasetIntensity,
    Sam3DAdapter,
    Sam3DAdapterConfig,
    load_authors_file,
)
from .anchors import Run
from .session import (
    CancelCheck,
    ProgressCallback,
    PropagationOptions,
    PropagationResult,
    RunsOutput,
    Session,
    SliceMask,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumetricOptions:
    """``dataset`` picks the intensity handling of the checkpoint (kits, lits, pancreas, colon)."""

    dataset: str = "kits"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_INTENSITY:
            raise InputError(
                f"Unknown 3DSAM-adapter dataset {self.dataset!r}; choose one of {', '.join(DATASET_INTENSITY)}."
            )

    @property
    def intensity(self) -> DatasetIntensity:
        return DATASET_INTENSITY[self.dataset]


@dataclass
class CropPlan:
    """Where the crop lies in the 1-mm grid: start (may be negative) and size, per (d, h, w)."""

    start: tuple[int, int, int]
    size: int
    clicks: np.ndarray = field(repr=False)  # (N, 3) (d, h, w) relative to start


@dataclass
class Inference:
    """One run of the model for an object: its clicks (1-mm grid), the probability on the
    volume's grid, and the slices the crop covered."""

    clicks: tuple
    probability: np.ndarray = field(repr=False)
    slices: list[int]


def resample_to_spacing(array: np.ndarray, spacing_dhw, target=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """The authors' resampling: trilinear with scale factor spacing / target (float32 tensor)."""
    scale = tuple(float(s) / float(t) for s, t in zip(spacing_dhw, target))
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float32))[None, None]
    return F.interpolate(tensor, scale_factor=scale, mode="trilinear")[0, 0]


def normalise(resampled: torch.Tensor, intensity: DatasetIntensity) -> torch.Tensor:
    """Clip to the dataset's HU range, then (x - mean) / std."""
    return (resampled.clamp(intensity.low, intensity.high) - intensity.mean) / intensity.std


def plan_crop(clicks_dhw: np.ndarray, size: int) -> CropPlan:
    """The crop centred on the middle of the clicks' bounding box, as in the authors' test.py."""
    clicks_dhw = np.asarray(clicks_dhw, dtype=np.int64).reshape(-1, 3)
    centre = (clicks_dhw.max(axis=0) + clicks_dhw.min(axis=0)) // 2
    start = centre - size // 2
    return CropPlan(tuple(int(s) for s in start), size, clicks_dhw - start)


def cut_crop(image: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """``image`` (D, H, W) -> (S, S, S), zero outside the image."""
    out = image.new_zeros((plan.size,) * 3)
    src, dst = [], []
    for start, n in zip(plan.start, image.shape):
        lo, hi = max(start, 0), min(start + plan.size, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - start, lo - start + max(0, hi - lo)))
    out[tuple(dst)] = image[tuple(src)]
    return out


def paste_crop(target: torch.Tensor, values: torch.Tensor, plan: CropPlan) -> None:
    """Add the part of ``values`` (S, S, S) that lies inside ``target`` (D, H, W)."""
    src, dst = [], []
    for start, n in zip(plan.start, target.shape):
        lo, hi = max(start, 0), min(start + plan.size, n)
        dst.append(slice(lo, max(lo, hi)))
        src.append(slice(lo - start, lo - start + max(0, hi - lo)))
    target[tuple(dst)] += values[tuple(src)]


class VolumetricSession(Session):
    """3DSAM-adapter on one volume: include clicks -> a 3D mask."""

    engine_name = "volumetric"
    refines_propagated_slices = False  # the model takes no mask: new clicks rerun it with all clicks

    def __init__(self, volume: Volume, model: Sam3DAdapter, axis: int = 0,
                 options: VolumetricOptions | None = None, device: str | torch.device = "cpu"):
        super().__init__(volume, axis)
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.options = options or VolumetricOptions()
        self._image: torch.Tensor | None = None  # normalised 1-mm image (D, H, W)
        self._scale = np.asarray(volume.spacing_kji, dtype=float) / np.asarray(self.options.intensity.spacing_mm)
        self._features: tuple[tuple[int, int, int], list[torch.Tensor]] | None = None
        self._results: dict[int, Inference] = {}
        self._encoded = 0

    # --- Session ------------------------------------------------------------------------------

    @property
    def slices_encoded_total(self) -> int:
        """Encoder runs (one per 3D crop) so far."""
        return self._encoded

    def _predict_anchor(self, object_id: int, prompt: SlicePrompt) -> SliceMask:
        anchors = dict(self._objects[object_id].anchors) if object_id in self._objects else {}
        anchors[prompt.index] = prompt
        probability = self._run(object_id, anchors, None, None).probability
        mask = get_slice(probability, self.axis, prompt.index) > self.options.threshold
        return SliceMask(mask=mask, score=_score(get_slice(probability, self.axis, prompt.index), mask))

    def _propagate_runs(self, object_id: int, runs: list[Run], options: PropagationOptions, tick) -> RunsOutput:
        raise NotImplementedError("VolumetricSession.propagate runs the whole 3D inference itself.")

    def propagate(
        self,
        object_id: int,
        options: PropagationOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> PropagationResult:
        """One 3D inference from all include clicks; slice masks given by the user win on their slice."""
        options = options or PropagationOptions()
        state = self._object(object_id)
        started = time.perf_counter()
        encoded_before = self._encoded
        inference = self._run(object_id, state.anchors, progress, cancel)
        probability, computed = inference.probability, inference.slices
        mask = probability > self.options.threshold
        if options.slice_range is not None:
            low, high = sorted(options.slice_range)
            keep = np.zeros(self.volume.n_slices(self.axis), dtype=bool)
            keep[max(low, 0): high + 1] = True
            shape = [1, 1, 1]
            shape[self.axis] = -1
            mask &= keep.reshape(shape)
        scores: dict[int, float] = {}
        for index in range(self.volume.n_slices(self.axis)):
            plane = get_slice(mask, self.axis, index)
            if plane.any():
                scores[index] = _score(get_slice(probability, self.axis, index), plane)
        for index, prompt in state.anchors.items():
            if prompt.is_mask_only:
                get_slice(mask, self.axis, index)[...] = state.anchor_results[index].mask
                scores[index] = 1.0
        state.mask, state.scores = mask, scores
        state.changed.clear()
        state.last_options = options
        return PropagationResult(
            object_id=object_id, axis=self.axis, mask=mask, scores=scores, slices_computed=computed,
            slices_encoded=self._encoded - encoded_before, stop_reasons={},
            seconds=time.perf_counter() - started, engine=self.engine_name,
        )

    def remove_object(self, object_id: int) -> None:
        super().remove_object(object_id)
        self._results.pop(object_id, None)

    def close(self) -> None:
        super().close()
        self._image = None
        self._features = None
        self._results.clear()

    # --- inference ----------------------------------------------------------------------------

    def clicks_kji(self, anchors: dict[int, SlicePrompt]) -> np.ndarray:
        """(N, 3) voxel (k, j, i) of the include clicks; refuses what the model cannot take."""
        points = []
        for index, prompt in sorted(anchors.items()):
            if prompt.box is not None:
                raise PromptError("3DSAM-adapter takes clicks, not boxes: click inside the object instead.")
            for point in prompt.points:
                if not point.positive:
                    raise PromptError(
                        "3DSAM-adapter has no exclude clicks (its prompt encoder takes include points only); "
                        "add include clicks, or correct a slice with a mask."
                    )
                points.append(slice_to_kji(self.axis, index, point.row, point.col))
        return np.asarray(points, dtype=float).reshape(-1, 3)

    def to_resampled(self, kji: np.ndarray) -> np.ndarray:
        """Voxel (k, j, i) -> the nearest voxel of the 1-mm grid (d, h, w)."""
        image = self._prepared_image()
        grid = np.rint((np.asarray(kji, dtype=float) + 0.5) * self._scale - 0.5).astype(np.int64)
        return np.clip(grid, 0, np.asarray(image.shape) - 1)

    def _prepared_image(self) -> torch.Tensor:
        if self._image is None:
            resampled = resample_to_spacing(self.volume.array, self.volume.spacing_kji, self.options.intensity.spacing_mm)
            self._image = normalise(resampled, self.options.intensity)
            log.info("3DSAM-adapter: volume %s resampled to 1 mm: %s", self.volume.shape, tuple(self._image.shape))
        return self._image

    def _run(self, object_id: int, anchors: dict[int, SlicePrompt], progress: ProgressCallback | None,
             cancel: CancelCheck | None) -> Inference:
        clicks = self.clicks_kji(anchors)
        if len(clicks) == 0:
            raise PromptError("3DSAM-adapter needs at least one include click on the object.")
        total = 4

        def step(done: int, index: int) -> None:
            if cancel is not None and cancel():
                raise PropagationCancelled("Propagation cancelled; the segmentation was not changed.")
            if progress is not None:
                progress(done, total, index)

        centre_slice = int(np.rint(clicks[:, self.axis].mean()))
        step(0, centre_slice)
        grid_clicks = self.to_resampled(clicks)
        key = tuple(map(tuple, grid_clicks.tolist()))
        cached = self._results.get(object_id)
        if cached is not None and cached.clicks == key:
            if progress is not None:
                progress(total, total, -1)
            return cached
        image = self._prepared_image()
        plan = plan_crop(grid_clicks, self.model.cfg.crop_size)
        crop = cut_crop(image, plan).to(self.device)
        step(1, centre_slice)
        with torch.inference_mode():
            if self._features is None or self._features[0] != plan.start:
                self._features = (plan.start, self.model.encode(crop.expand(3, -1, -1, -1)))
                self._encoded += 1
            step(2, centre_slice)
            points = torch.as_tensor(plan.clicks, dtype=torch.float32, device=self.device)
            logits = self.model.decode(crop.expand(3, -1, -1, -1), self._features[1], points)
            foreground = torch.softmax(logits.float(), dim=1)[0, 1].cpu()
        step(3, centre_slice)
        resampled = torch.zeros(image.shape)
        paste_crop(resampled, foreground, plan)
        probability = F.interpolate(resampled[None, None], size=self.volume.shape, mode="trilinear")[0, 0].numpy()
        computed = self._crop_slices(plan, image.shape[self.axis])
        if progress is not None:
            progress(total, total, -1)
        result = Inference(key, probability, computed)
        self._results[object_id] = result
        return result

    def _crop_slices(self, plan: CropPlan, n_resampled: int) -> list[int]:
        lo = max(plan.start[self.axis], 0)
        hi = min(plan.start[self.axis] + plan.size, n_resampled)
        n = self.volume.n_slices(self.axis)
        first = int(np.floor(lo / self._scale[self.axis]))
        last = int(np.ceil(hi / self._scale[self.axis]))
        return list(range(max(first, 0), min(last, n)))


def _score(probability: np.ndarray, mask: np.ndarray) -> float:
    """Mean foreground probability under the mask (0 for an empty mask)."""
    return float(probability[mask].mean()) if mask.any() else 0.0


def open_volumetric_session(volume: Volume, model: Sam3DAdapter | str | Path, axis: int = 0,
                            dataset: str | None = None, device: str = "cpu", *,
                            adapter: str | Path | None = None, base_sha256: str | None = None,
                            config: Sam3DAdapterConfig | None = None) -> VolumetricSession:
    """A session of the volumetric engine; ``model`` is a loaded model or the path of one of the
    authors' checkpoints (``dataset`` must then be the one it was trained on; default kits).

    ``adapter`` is a file from ``sam3d finetune --engine volumetric``, loaded on top of the base
    weights (a loaded ``model`` is changed in place). It must have been trained on this very
    checkpoint: with a loaded model give ``base_sha256``, the sha256 of the file it was loaded
    from. Its dataset is the default ``dataset``. ``config`` sizes a model read from a path
    (default: the released size).
    """
    if adapter is not None:
        if isinstance(model, Sam3DAdapter) and not base_sha256:
            raise InputError(
                "An adapter goes on top of the checkpoint it was trained on: give the checkpoint's path as "
                "the model, or base_sha256= (the sha256 of the file the model was loaded from)."
            )
        if not isinstance(model, Sam3DAdapter) and not base_sha256:
            from ..models.checkpoint_cache import recorded_sha256, sha256_of

            path = Path(model).expanduser()
            if path.is_file():
                base_sha256 = recorded_sha256(path) or sha256_of(path)
    if not isinstance(model, Sam3DAdapter):
        model = load_authors_file(model, config)
    if adapter is not None:
        from ..models.adapters import apply_sam3d_adapter

        metadata = apply_sam3d_adapter(model, adapter, str(base_sha256))
        trained_with = metadata.get("dataset")
        if dataset is not None and trained_with is not None and dataset != trained_with:
            raise InputError(
                f"Adapter {adapter} was trained with the {trained_with} intensity handling; "
                f"open the session with dataset={trained_with!r} (or leave dataset out)."
            )
        dataset = dataset or trained_with
        log.info("3DSAM-adapter: adapter %s loaded (validation Dice %s).", adapter, metadata.get("validation_dice"))
    options = VolumetricOptions(dataset=dataset or VolumetricOptions.dataset)
    return VolumetricSession(volume, model, axis=axis, options=options, device=device)
