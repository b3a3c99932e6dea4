"""SAM, MedSAM and LiteMedSAM as a :class:`~SAM3DSegmentLib.engines.slicewise.SlicePredictor` on one volume.

The volume is windowed to uint8 once. A slice's model input is the grey slice as RGB, or the
Slide-SAM 3-slice window (slices k-1, k, k+1 as R, G, B; edges replicated), shown in the
radiological view its training data had (:mod:`~SAM3DSegmentLib.data.orientation`); prompts go
into that view and masks come back out of it. Each checkpoint's own preprocessing comes from
its :class:`~SAM3DSegmentLib.models.registry.ModelSpec`:

- SAM ("longest_side" + "imagenet"): ``ResizeLongestSide`` to the input size, ImageNet mean/std,
  zero padding, exactly as ``segment_anything.SamPredictor``; masks upscaled by
  ``Sam.postprocess_masks``'s steps.
- MedSAM ("square" + "minmax"): bicubic resize to a square, per-image min-max to [0, 1], no
  mean/std; prompts scaled to the square; masks upscaled directly from 256 px, as MedSAM's own
  inference does.
- LiteMedSAM ("longest_side_area" + "minmax", box corners floored): longest side to 256 with
  OpenCV's area interpolation, min-max of the resized image, zero padding bottom/right; masks
  cropped to the resized frame and upscaled bilinearly, as ``CVPR24_LiteMedSAM_infer.py`` does.

Slices are encoded lazily (only those a prompt or propagation reaches), each at most once while
its embedding stays in the :class:`~SAM3DSegmentLib.engines.feature_cache.FeatureCache` (held to a byte
budget); a click on an encoded slice runs the prompt encoder and mask decoder only.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from typing import Literal

import numpy as np

from ..data.intensity import WindowSpec, window_volume
from ..data.orientation import model_view
from ..data.prompts import Box, SlicePrompt, box_xyxy, points_xy
from ..data.volume import Volume, get_slice
from ..errors import (
    CheckpointError,
    DependencyError,
    InputError,
    ModelOutOfMemoryError,
    PromptError,
)
from ..models.devices import autocast_context, select_device, use_bfloat16
from ..models.registry import ModelSpec, get_spec
from .box_prompts import (
    ClickStart,
    Correction,
    as_box_prompt,
    bounding_box,
    box_around_clicks,
    check_strategies,
    padded_box,
    updated_box,
)
from .click_edits import added_around_clicks, missed_clicks
from .feature_cache import FeatureCache
from .session import SliceMask
from .slicewise import SlicewiseOptions, SlicewiseSession

log = logging.getLogger(__name__)

WindowMode = Literal["single", "three_slice"]
Orientation = Literal["radiological", "array"]
BEST_BOX_REGION_MARGIN = 0.2
BEST_BOX_SIZES_MM = (50.0, 80.0)
"""``best_box`` candidates, in order: the weight-free region's box grown by 20 %, and squares of
50 and 80 mm."""
CANDIDATE_TOLERANCE = 0.05
"""Among candidate prompts the first whose predicted IoU is within this of the best wins: a bigger
box must score clearly better to replace a smaller one (keeps a clicked lesion from becoming
the organ around it; measured in docs/click_strategies.md)."""
DEFAULT_CACHE_BUDGET = 1024**3
"""1 GiB: 256 SAM embeddings (256 x 64 x 64 float32 = 4 MiB each)."""
MASK_PROMPT_LOGIT = 10.0
"""A user's mask given as SAM's dense mask input: +10 inside, -10 outside (low-res logits)."""
STABILITY_OFFSET = 1.0
"""Logit offset of SAM's stability score (as in SamAutomaticMaskGenerator)."""


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency of the SAM engine
        raise DependencyError("PyTorch is needed for SAM models: install torch (in Slicer: the PyTorch extension).") from exc
    return torch


def _out_of_memory(exc: BaseException, device) -> ModelOutOfMemoryError:
    return ModelOutOfMemoryError(
        f"The {device} device ran out of memory running SAM ({str(exc).splitlines()[0][:120]}). "
        "Try a smaller embedding cache budget, a smaller model (e.g. sam_vit_b instead of "
        "vit_l/vit_h), closing other sessions, or --device cpu."
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    torch = _torch()
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


class SamSlicePredictor:
    """SAM / MedSAM / LiteMedSAM on the slices of one volume along ``axis``.

    ``image`` is a :class:`Volume` (windowed here with ``window``) or an already windowed uint8
    array (k, j, i). ``model`` is a segment-anything ``Sam`` or a ``MedSAMLite`` (it is moved to
    ``device``). ``orientation`` "radiological" shows the model each slice in the radiological
    view (from the Volume's IJK-to-RAS, or ``ijk_to_ras`` for an array); "array" shows the raw
    array slice. ``precision`` "auto" runs bfloat16 on CUDA, and on a CPU with native bf16 for
    models whose registry entry allows it (LiteMedSAM); "float32" is exact (parity tests).
    ``slices_encoded`` counts image-encoder runs; ``cache`` holds the embeddings.
    """

    def __init__(
        self,
        image: Volume | np.ndarray,
        axis: int,
        model,
        spec: ModelSpec | str,
        device=None,
        window: WindowSpec | None = None,
        window_mode: WindowMode = "single",
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET,
        multimask_single_click: bool = True,
        orientation: Orientation = "radiological",
        ijk_to_ras: np.ndarray | None = None,
        precision: str = "auto",
        click_start: ClickStart | None = None,
        correction: Correction | None = None,
        click_box_mm: float = 50.0,
        region_margin_fraction: float = 0.1,
    ):
        torch = _torch()
        self.spec = get_spec(spec)
        if self.spec.family not in ("sam", "litemedsam"):
            raise CheckpointError(
                f"Model '{self.spec.name}' is a SAM 2 model; use the sam2 engine for it, "
                "or pick a SAM / MedSAM / LiteMedSAM model for the slicewise engine."
            )
        if window_mode not in ("single", "three_slice"):
            raise InputError(f"window_mode must be 'single' or 'three_slice'; got {window_mode!r}.")
        if axis not in (0, 1, 2):
            raise InputError(f"Slice axis must be 0, 1 or 2 (array axes k, j, i); got {axis!r}.")
        self.image = self._windowed(image, window)
        self.volume = image if isinstance(image, Volume) else Volume(self.image, np.eye(4) if ijk_to_ras is None else ijk_to_ras)
        self.axis = axis
        slice_shape = get_slice(self.image, axis, 0).shape
        if isinstance(image, Volume):
            ijk_to_ras = image.ijk_to_ras
        self.view = model_view(orientation, ijk_to_ras, axis, slice_shape)
        self.window_mode = window_mode
        self.multimask_single_click = multimask_single_click
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.model = model.to(self.device).eval()
        self.bfloat16 = use_bfloat16(self.device, precision, self.spec.cpu_bfloat16)
        self.input_size = int(self.model.image_encoder.img_size)
        if self.input_size != self.spec.input_size:
            raise CheckpointError(
                f"Model '{self.spec.name}' expects {self.spec.input_size} px inputs, but the model given "
                f"has a {self.input_size} px image encoder. Pass the matching model or registry entry."
            )
        defaults = default_strategies(self.spec)
        self.click_start = click_start or defaults[0]
        self.correction = correction or defaults[1]
        check_strategies(self.click_start, self.correction)
        self.click_box_mm = click_box_mm
        self.region_margin_fraction = region_margin_fraction
        self._region_model = None
        self.cache = FeatureCache(cache_budget_bytes)
        self.slices_encoded = 0
        self.name = self.spec.name

    @staticmethod
    def _windowed(image: Volume | np.ndarray, window: WindowSpec | None) -> np.ndarray:
        if isinstance(image, Volume):
            return window_volume(image.array, window or WindowSpec(), image.modality)
        array = np.asarray(image)
        if array.ndim != 3 or array.dtype != np.uint8:
            raise InputError(
                f"Give a Volume, or a windowed uint8 array (k, j, i); got {array.dtype} with shape {array.shape}."
            )
        if window is not None:
            raise InputError("A window applies to a Volume; this array is already windowed to uint8.")
        return array

    # --- model input ---------------------------------------------------------------------------

    @property
    def n_slices(self) -> int:
        return self.image.shape[self.axis]

    def slice_rgb(self, index: int) -> np.ndarray:
        """The (rows, cols, 3) uint8 model input of slice ``index``, in the model's view, before resizing."""
        if not 0 <= index < self.n_slices:
            raise PromptError(f"Slice {index} is outside 0..{self.n_slices - 1} along this axis.")
        if self.window_mode == "single":
            grey = get_slice(self.image, self.axis, index)
            return self.view.to_view(np.repeat(grey[:, :, None], 3, axis=2))
        neighbours = [min(max(i, 0), self.n_slices - 1) for i in (index - 1, index, index + 1)]
        return self.view.to_view(np.stack([get_slice(self.image, self.axis, i) for i in neighbours], axis=2))

    def resized_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the slice inside the model's input frame (before padding)."""
        if self.spec.resize == "square":
            return self.input_size, self.input_size
        from segment_anything.utils.transforms import ResizeLongestSide

        return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], self.input_size)

    def prompt_scale(self, original_size: tuple[int, int]) -> np.ndarray:
        """(x, y) factors taking slice pixels to the model's input frame."""
        if self.spec.resize == "longest_side_area":  # LiteMedSAM: one ratio for both axes
            return np.full(2, self.input_size / max(original_size))
        resized = self.resized_size(original_size)
        return np.array([resized[1] / original_size[1], resized[0] / original_size[0]], dtype=np.float64)

    def preprocess(self, rgb: np.ndarray):
        """The (1, 3, S, S) float tensor the image encoder takes, as the checkpoint expects."""
        torch = _torch()
        size = self.resized_size(rgb.shape[:2])
        if self.spec.resize == "longest_side":
            from segment_anything.utils.transforms import ResizeLongestSide

            resized = ResizeLongestSide(self.input_size).apply_image(rgb)
        elif self.spec.resize == "longest_side_area":
            import cv2

            resized = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        else:
            from skimage.transform import resize

            resized = resize(rgb, size, order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
        if self.spec.normalisation == "imagenet":
            x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None].float()
            return self.model.preprocess(x)  # mean/std and zero padding, as SamPredictor
        low, high = float(resized.min()), float(resized.max())
        scaled = (resized - low) / max(high - low, 1e-8)  # float64, as MedSAM's and LiteMedSAM's inference
        x = torch.as_tensor(scaled, dtype=torch.float32, device=self.device).permute(2, 0, 1)[None]
        pad_rows, pad_cols = self.input_size - size[0], self.input_size - size[1]
        return torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows)).contiguous()

    # --- encoder ---------------------------------------------------------------------------

    def encode_slice(self, index: int):
        """One bare image-encoder forward of slice ``index`` (no cache, not counted).

        Benchmarks time this as the unit cost of a propagation.
        """
        torch = _torch()
        try:
            with torch.inference_mode(), autocast_context(self.device, self.bfloat16):
                return self.model.image_encoder(self.preprocess(self.slice_rgb(index)))
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise _out_of_memory(exc, self.device) from exc
            raise

    def embedding(self, index: int):
        """Slice ``index``'s image embedding, from the cache or encoded now (and counted)."""
        features = self.cache.get(index)
        if features is None:
            features = self.encode_slice(index)
            self.slices_encoded += 1
            self.cache.put(index, features)
        return features

    def is_encoded(self, index: int) -> bool:
        return index in self.cache

    # --- decoder -----------------------------------------------------------------------------

    def predict(self, index: int, prompt: SlicePrompt, previous: SliceMask | None = None) -> SliceMask:
        """SAM's mask for ``prompt`` on slice ``index`` (encodes the slice if needed).

        One click alone gives three candidate masks and the one with the best predicted IoU is
        kept (multimask, as SAM recommends for ambiguous prompts); otherwise a single mask.
        ``prompt.mask`` becomes SAM's dense mask input: ``previous``'s low-res logits when it is
        ``previous``'s own mask, else the mask as +/-10 logits.
        """
        torch = _torch()
        if not (prompt.points or prompt.box is not None or prompt.mask is not None):
            raise PromptError("SAM needs a click, a box or a mask on the slice.")
        if previous is None and prompt.box is not None and prompt.points and box_trained(self.spec):
            # a box-trained model given clicks beside its box answers worse than to the box alone
            # (ct_spleen_msd08: one include click took the box slice from 11685 px to 7775):
            # the box's mask, then the clicks as corrections of it
            from_box = self.predict(index, replace(prompt, points=()))
            if not missed_clicks(from_box.mask, prompt):
                return from_box  # exclude clicks are the session's to cut (click_edits)
            prompt = replace(prompt, box=None, mask=from_box.mask)
        previous_logits = None
        if previous is not None and prompt.mask is previous.mask and isinstance(previous.extra, dict):
            previous_logits = previous.extra.get("low_res_logits")
        grows = previous is None and self._grows_region(prompt)
        region = None  # the weight-free region, computed once when a click needs it
        if grows:  # the box of mask and region together; clicks inside the mask need no region
            given = np.asarray(prompt.mask, dtype=bool)
            if missed_clicks(given, prompt):
                region = self.click_region(index, prompt)
                given = given | region
            candidates = [as_box_prompt(prompt, margined_box(given, self.region_margin_fraction), keep_points=False)]
        else:  # the user's own prompt (not a propagation step) may become several candidate boxes
            candidates = self.model_prompts(index, prompt) if previous is None else [prompt]
        try:
            features = self.embedding(index)
            with torch.inference_mode(), autocast_context(self.device, self.bfloat16):
                results = [self._decode(features, self.view.prompt_to_view(c), previous_logits, self.view.view_shape)
                           for c in candidates]
            best = max(r.score for r in results)  # the model's own predicted IoU picks
            result = next(r for r in results if r.score >= best - CANDIDATE_TOLERANCE)
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise _out_of_memory(exc, self.device) from exc
            raise
        result.mask = self.view.from_view(result.mask)
        if grows and missed_clicks(result.mask, prompt):
            # an include click the model still leaves out: add the region's part around it
            if region is None:
                region = self.click_region(index, prompt)
            result.mask = added_around_clicks(result.mask, region, prompt)
        return result

    def _grows_region(self, prompt: SlicePrompt) -> bool:
        return (self.correction == "region_grow" and prompt.mask is not None and prompt.box is None
                and any(p.positive for p in prompt.points))

    # --- the user's clicks, for box-trained models ------------------------------------------------

    def model_prompts(self, index: int, prompt: SlicePrompt) -> list[SlicePrompt]:
        """The user's prompt as the model is given it, as one or more candidates (the model's
        predicted IoU picks among several): clicks become boxes on box-trained models
        (:mod:`box_prompts`); a box is padded as the model's registry entry says; a mask without
        clicks goes as it is."""
        shape = get_slice(self.image, self.axis, index).shape
        if prompt.box is not None:
            if not self.spec.box_padding:
                return [prompt]
            # the model frame's pixels in this slice's pixels (after the radiological transpose
            # the longest side is still the one scaled to the input size)
            pad = self.spec.box_padding * max(shape) / self.input_size
            return [replace(prompt, box=padded_box(prompt.box, (pad, pad), shape))]
        if not prompt.points:
            return [prompt]
        strategy = self.click_start if prompt.mask is None else self.correction
        if strategy in ("point", "points+mask"):
            return [prompt]
        if strategy == "box_update":
            start = bounding_box(np.asarray(prompt.mask, dtype=bool))
            return [as_box_prompt(prompt, start and updated_box(start, prompt, shape), keep_points=False)]
        if strategy == "best_box":
            boxes = [self.region_box(index, prompt, BEST_BOX_REGION_MARGIN)]
            boxes += [self._mm_box(index, prompt, size) for size in BEST_BOX_SIZES_MM]
            return [as_box_prompt(prompt, box, keep_points=False) for box in boxes if box is not None] or [prompt]
        box = self.region_box(index, prompt) if strategy != "mm_box" else None
        if box is None:  # mm_box, or a region that came out empty
            box = self._mm_box(index, prompt, self.click_box_mm)
        return [as_box_prompt(prompt, box, keep_points=strategy == "region_box+points")]

    def click_region(self, index: int, prompt: SlicePrompt) -> np.ndarray:
        """The weight-free 2D region grown from the prompt's clicks (and mask) on slice ``index``."""
        return self.region_model().predict(index, prompt).mask

    def region_box(self, index: int, prompt: SlicePrompt, margin_fraction: float | None = None) -> Box | None:
        """The box of :meth:`click_region`, grown by a fraction of its size (default
        ``region_margin_fraction``); None when the region is empty."""
        fraction = self.region_margin_fraction if margin_fraction is None else margin_fraction
        return margined_box(self.click_region(index, prompt), fraction)

    def _mm_box(self, index: int, prompt: SlicePrompt, size_mm: float) -> Box | None:
        """A square of ``size_mm`` around the include clicks."""
        shape = get_slice(self.image, self.axis, index).shape
        half_px = size_mm / 2 / np.delete(self.volume.spacing_kji, self.axis)
        return box_around_clicks(prompt, shape, tuple(half_px))

    def region_model(self):
        """The weight-free 2D region grower that turns clicks into boxes (made on first use)."""
        if self._region_model is None:
            from .weightfree import RandomWalkerPredictor

            windowed = Volume(self.image, self.volume.ijk_to_ras, modality=None)
            self._region_model = RandomWalkerPredictor(windowed, self.axis, window=None)
        return self._region_model

    def _decode(self, features, prompt: SlicePrompt, previous_logits, original_size) -> SliceMask:
        """The mask for a prompt in the model's view (view-frame mask; logits kept in ``extra``).

        ``previous_logits`` (the neighbour's own low-res logits) replace ``prompt.mask`` as the
        dense mask input when given.
        """
        torch = _torch()
        from segment_anything.utils.amg import calculate_stability_score

        resized = self.resized_size(original_size)
        scale = self.prompt_scale(original_size)
        points = None
        if prompt.points:
            coords, labels = points_xy(prompt.points)
            coords = torch.as_tensor(coords * scale, dtype=torch.float, device=self.device)[None]
            points = (coords, torch.as_tensor(labels, dtype=torch.int, device=self.device)[None])
        boxes = None
        if prompt.box is not None:
            box = box_xyxy(prompt.box).reshape(2, 2) * scale
            if self.spec.box_rounding == "floor":
                box = np.floor(box)
            boxes = torch.as_tensor(box.reshape(1, 4), dtype=torch.float, device=self.device)
        mask_input = None
        if prompt.mask is not None:
            mask_input = previous_logits.to(self.device) if previous_logits is not None else self._mask_input(prompt.mask, resized)
        multimask = (
            self.multimask_single_click and len(prompt.points) == 1 and boxes is None and mask_input is None
        )
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        best = int(torch.argmax(iou[0])) if multimask else 0
        low_res = low_res[:, best: best + 1].float()
        logits = self.upscale_logits(low_res, resized, original_size)
        threshold = getattr(self.model, "mask_threshold", 0.0)
        stability = float(calculate_stability_score(logits, threshold, STABILITY_OFFSET)[0, 0])
        mask = (logits[0, 0] > threshold).cpu().numpy()
        return SliceMask(mask, float(iou[0, best]), stability, {"low_res_logits": low_res})

    def upscale_logits(self, low_res, resized: tuple[int, int], original_size: tuple[int, int]):
        """Low-res mask logits (1, 1, 256, 256) -> logits on the slice (1, 1, rows, cols)."""
        interpolate = _torch().nn.functional.interpolate
        if self.spec.resize == "square":  # MedSAM: straight from 256 px to the slice
            return interpolate(low_res, original_size, mode="bilinear", align_corners=False)
        # SAM's postprocess_masks (and LiteMedSAM's, whose 256 px input frame is the low-res frame):
        # to the input frame, crop the padding, to the slice.
        frame = interpolate(low_res, (self.input_size, self.input_size), mode="bilinear", align_corners=False)
        frame = frame[..., : resized[0], : resized[1]]
        return interpolate(frame, original_size, mode="bilinear", align_corners=False)

    def _mask_input(self, mask: np.ndarray, resized: tuple[int, int]):
        """SAM's (1, 1, S/4, S/4) dense mask input for ``mask`` in the padded input frame."""
        torch = _torch()
        as_float = torch.as_tensor(np.asarray(mask, dtype=np.float32), device=self.device)[None, None]
        frame = torch.nn.functional.interpolate(as_float, resized, mode="bilinear", align_corners=False)
        frame = torch.nn.functional.pad(frame, (0, self.input_size - resized[1], 0, self.input_size - resized[0]))
        low = self.model.prompt_encoder.mask_input_size
        small = torch.nn.functional.interpolate(frame, low, mode="bilinear", align_corners=False)
        return torch.where(small > 0.5, MASK_PROMPT_LOGIT, -MASK_PROMPT_LOGIT)

    def close(self) -> None:
        """Drop the cached embeddings."""
        self.cache.clear()


def margined_box(mask: np.ndarray, margin_fraction: float) -> Box | None:
    """The mask's box grown on each side by ``margin_fraction`` of its extent (None if empty)."""
    if not mask.any():
        return None
    extent = np.array([np.ptp(np.flatnonzero(mask.any(axis=a))) + 1 for a in (1, 0)])
    return bounding_box(mask, tuple(margin_fraction * extent))


def box_trained(spec: ModelSpec) -> bool:
    """Whether the model was trained without point prompts (LiteMedSAM, MedSAM)."""
    return "points" not in spec.trained_prompts


def default_strategies(spec: ModelSpec) -> tuple[str, str]:
    """(click start, correction) for a model: SAM's own for point-trained models, boxes otherwise
    (measured best for LiteMedSAM on the 20 shared targets, docs/litemedsam.md)."""
    if not box_trained(spec):
        return "point", "points+mask"
    return "region_box", "region_grow"


BOX_TRAINED_OPTIONS = {"exclude_clicks": "cut", "empty_slice_clicks": "neighbour_box", "tight_box": True,
                       "carry_include_clicks": True}
"""Session options a box-trained model gets unless given (measured in docs/litemedsam.md): the
click edits of :mod:`click_edits` (the model cannot take exclude clicks, nor a lone click next to
the object, and leaves a missed part out again on the next slices), and ``tight_box`` in
propagation (it fills a loose box with the tissue next to the object)."""


def open_sam_session(
    volume: Volume,
    axis: int = 0,
    model=None,
    spec: ModelSpec | str = "sam_vit_b",
    *,
    checkpoint_path=None,
    device=None,
    window: WindowSpec | None = None,
    window_mode: WindowMode = "single",
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET,
    orientation: Orientation = "radiological",
    precision: str = "auto",
    click_start: ClickStart | None = None,
    correction: Correction | None = None,
    options: SlicewiseOptions | None = None,
    **option_fields,
) -> SlicewiseSession:
    """A sliding-window session with SAM / MedSAM / LiteMedSAM on ``volume``.

    Give a built ``model``, or leave it None to build ``spec`` from ``checkpoint_path``
    (None there means random initialisation: tests and speed benchmarks only). Propagation
    options are ``options`` or ``SlicewiseOptions`` fields given by name.
    """
    spec = get_spec(spec)
    known = {f.name for f in fields(SlicewiseOptions)}
    unknown = set(option_fields) - known
    if unknown:
        raise InputError(
            f"Unknown option(s) for the slicewise engine: {', '.join(sorted(unknown))}. Known: {', '.join(sorted(known))}."
        )
    if options is not None and option_fields:
        raise InputError("Give either options=SlicewiseOptions(...) or option fields by name, not both.")
    if options is None and box_trained(spec):
        option_fields = {**BOX_TRAINED_OPTIONS, **option_fields}
    options = options or SlicewiseOptions(**option_fields)
    torch_device = select_device(device)
    if model is None:
        from ..models.builders import build_model

        if checkpoint_path is None:
            log.warning("No checkpoint for '%s': the model is randomly initialised (tests/benchmarks only).", spec.name)
        model = build_model(spec, checkpoint_path, torch_device)
    predictor = SamSlicePredictor(
        volume, axis, model, spec, torch_device, window, window_mode, cache_budget_bytes,
        orientation=orientation, precision=precision, click_start=click_start, correction=correction,
    )
    return SlicewiseSession(volume, axis, predictor, options)
