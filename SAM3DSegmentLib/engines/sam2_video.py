"""SAM 2 memory propagation on a volume (SAM 2.1, MedSAM2): the volume is a video.

:class:`Sam2Session` drives the official ``SAM2Base`` methods (``forward_image``,
``track_step``, ``_encode_new_memory``) in its own loop, computing what
``SAM2VideoPredictor`` computes for one object, with these differences:

* frames are in-memory tensors made lazily (:mod:`sam2_frames`), and a slice is encoded only
  when a preview or a propagation reaches it; image features live in a byte-bounded
  :class:`~SAM3DSegmentLib.engines.feature_cache.FeatureCache` shared by every object of the session;
* each run (:class:`~SAM3DSegmentLib.engines.anchors.Run`) is tracked from its start anchor with a fresh
  memory bank holding only the conditioning frames of that run (its start anchor and the anchor
  it heads to), so the forward pass never leaks into the backward one and a run's result
  depends only on its own anchors; this is what makes "recompute only the changed runs" exact;
* a stop rule ends a run when SAM 2 judges the object absent for ``patience`` slices.

Like the official video predictor, prompted slices are decoded without memory, their masks are
encoded into memory binarised, propagated memories are stored in bfloat16, and output masks are
the low-resolution logits resized bilinearly to the slice and thresholded at 0.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..data.intensity import WindowSpec
from ..data.orientation import model_view
from ..data.prompts import SlicePrompt, box_xyxy, points_xy
from ..data.volume import Volume, get_slice
from ..errors import CheckpointError, DependencyError, ModelOutOfMemoryError
from ..models.devices import autocast_context, select_device
from ..models.registry import ModelSpec
from ..models.sam2_frames import Sam2Frames
from .anchors import Run
from .feature_cache import FeatureCache
from .session import PropagationOptions, RunsOutput, Session, SliceMask, StopTracker

log = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET_BYTES = 2 * 1024**3


@dataclass
class _AnchorOutput:
    """SAM 2's output on one prompted slice of one object, for the prompt it was computed from."""

    prompt: SlicePrompt
    out: dict[str, Any]  # pred_masks, obj_ptr, object_score_logits, maskmem_features/_pos_enc


@dataclass
class CacheStats:
    """Image-feature cache figures of a session."""

    entries: int
    used_bytes: int
    budget_bytes: int
    hits: int
    misses: int
    evictions: int
    slices_encoded: int


@dataclass
class _RunState:
    """A fresh SAM 2 memory bank for one run, in the layout ``SAM2Base.track_step`` reads."""

    cond: dict[int, dict] = field(default_factory=dict)
    non_cond: dict[int, dict] = field(default_factory=dict)

    def as_output_dict(self) -> dict:
        return {"cond_frame_outputs": self.cond, "non_cond_frame_outputs": self.non_cond}


class Sam2Session(Session):
    """SAM 2 video-memory propagation over the slices of one volume along one axis."""

    engine_name = "sam2"

    def __init__(
        self,
        volume: Volume,
        axis: int,
        model,
        spec: ModelSpec,
        window: WindowSpec = WindowSpec(),
        device=None,
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
        fill_hole_area: int | None = None,
        offload_features_to_cpu: bool = False,
        orientation: str = "radiological",
    ):
        """``model`` is a sam2 ``SAM2Base`` (ideally built as a video predictor, e.g.
        ``builders.build_model(spec, path, video=True)``); it is moved to ``device``
        (None / "auto": CUDA, then MPS, then CPU). ``fill_hole_area`` defaults to the model's own
        setting (8 px for the official video predictor; it needs sam2's compiled extension).
        ``offload_features_to_cpu`` keeps cached image features in CPU memory (GPU memory saved,
        a copy per use paid). ``orientation`` "radiological" shows SAM 2 each slice in the
        radiological view (:mod:`~SAM3DSegmentLib.data.orientation`), "array" the raw slice."""
        super().__init__(volume, axis)
        _check_model(model, spec)
        import torch

        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        view = model_view(orientation, volume.ijk_to_ras, axis, get_slice(volume.array, axis, 0).shape)
        self.frames = Sam2Frames(volume, axis, spec, window, view)
        self.cache = FeatureCache(cache_budget_bytes)
        self.offload_features_to_cpu = offload_features_to_cpu
        self.fill_hole_area = int(getattr(model, "fill_hole_area", 0) if fill_hole_area is None else fill_hole_area)
        self._slices_encoded = 0
        self._pos_enc: list | None = None  # identical for every frame of one size: held once
        self._maskmem_pos_enc: list | None = None
        self._anchor_outputs: dict[tuple[int, int], _AnchorOutput] = {}

    # --- figures for benchmarks ---------------------------------------------------------------

    @property
    def slices_encoded_total(self) -> int:
        return self._slices_encoded

    def cache_stats(self) -> CacheStats:
        c = self.cache
        return CacheStats(len(c), c.used_bytes, c.budget_bytes, c.hits, c.misses, c.evictions,
                          self._slices_encoded)

    def encode_slice(self, index: int) -> None:
        """Make sure slice ``index`` is encoded and cached (prefetch)."""
        self._backbone_fpn(index)

    def time_encoder_forward(self, index: int) -> float:
        """Seconds of one bare image-encoder forward on slice ``index`` (not cached, not counted)."""
        image = self.frames.tensor(index).to(self.device)
        with self._model_context():
            _synchronise(self.device)
            started = time.perf_counter()
            self.model.forward_image(image)
            _synchronise(self.device)
        return time.perf_counter() - started

    # --- Session interface --------------------------------------------------------------------

    def _predict_anchor(self, object_id: int, prompt: SlicePrompt) -> SliceMask:
        """Decoder only on an encoded slice, without memory (SAM 2's initial conditioning frame).

        A prompt with a mask and clicks (e.g. clicks on a propagated slice, see
        ``Session.add_prompt``) decodes the mask first and refines it with the clicks.
        """
        previous = self._anchor_outputs.get((object_id, prompt.index))
        with self._model_context():
            out = self._decode_prompt(prompt, previous)
        self._anchor_outputs[(object_id, prompt.index)] = _AnchorOutput(prompt, out)
        return self._slice_result(out)

    def _propagate_runs(
        self,
        object_id: int,
        runs: list[Run],
        options: PropagationOptions,
        tick: Callable[[int], None],
    ) -> RunsOutput:
        masks: dict[int, SliceMask] = {}
        reasons: dict[str, str] = {}
        anchors = self._objects[object_id].anchors
        anchor_results = self._objects[object_id].anchor_results
        with self._model_context():
            for run in runs:
                state = _RunState()
                for index in (run.start, run.toward):
                    if index is not None:
                        state.cond[index] = self._anchor_memory(object_id, index, anchors[index])
                tracker = StopTracker(options.stop)
                previous = anchor_results[run.start].mask
                for index in run.slices:
                    tick(index)
                    out = self._track(index, state, n_slices=self.frames.n_slices, reverse=run.step < 0)
                    state.non_cond[index] = out
                    result = self._slice_result(out)
                    reason = options.stop.absent_reason(result.mask, result.score, None, previous)
                    if reason is not None:
                        result = SliceMask(np.zeros_like(result.mask), result.score, None, result.extra)
                    masks[index] = result
                    previous = result.mask
                    if tracker.update(index, reason):
                        reasons[f"{run.start}{run.step:+d}"] = tracker.reason
                        break
        return RunsOutput(masks, reasons)

    def remove_anchor(self, object_id: int, index: int) -> None:
        super().remove_anchor(object_id, index)
        self._anchor_outputs.pop((object_id, index), None)

    def remove_object(self, object_id: int) -> None:
        super().remove_object(object_id)
        for key in [k for k in self._anchor_outputs if k[0] == object_id]:
            del self._anchor_outputs[key]

    def close(self) -> None:
        super().close()
        self._anchor_outputs.clear()
        self.cache.clear()
        self._pos_enc = self._maskmem_pos_enc = None

    # --- SAM 2 steps ----------------------------------------------------------------------------

    def _decode_prompt(self, prompt: SlicePrompt, previous: _AnchorOutput | None) -> dict:
        """SAM 2's output for clicks / box / mask on one slice (add_new_points_or_box / add_new_mask)."""
        feats, pos, sizes = self._features(prompt.index)
        n = self.frames.n_slices
        step = dict(frame_idx=prompt.index, is_init_cond_frame=True, current_vision_feats=feats,
                    current_vision_pos_embeds=pos, feat_sizes=sizes, output_dict=_RunState().as_output_dict(),
                    num_frames=n, track_in_reverse=False, run_mem_encoder=False)
        prev_logits = None
        shown = self.frames.view.prompt_to_view(prompt)  # the prompt in the frames' view
        if prompt.mask is not None:
            mask_out = self.model.track_step(point_inputs=None, mask_inputs=self._mask_input(shown.mask), **step)
            if prompt.is_mask_only:
                return self._compact(mask_out)
            prev_logits = mask_out["pred_masks"]  # then clicks refine the mask, as in the official demo
        elif previous is not None and _refines(prompt, previous.prompt):
            prev_logits = previous.out["pred_masks"].to(self.device)
        if prev_logits is not None:
            prev_logits = prev_logits.clamp(-32.0, 32.0)
        out = self.model.track_step(point_inputs=self._point_input(shown), mask_inputs=None,
                                    prev_sam_mask_logits=prev_logits, **step)
        return self._compact(out)

    def _anchor_memory(self, object_id: int, index: int, prompt: SlicePrompt) -> dict:
        """The anchor's conditioning output with its memory encoded (computed once per prompt)."""
        key = (object_id, index)
        cached = self._anchor_outputs.get(key)
        if cached is None or cached.prompt is not prompt:
            cached = _AnchorOutput(prompt, self._decode_prompt(prompt, None))
            self._anchor_outputs[key] = cached
        out = cached.out
        if out["maskmem_features"] is None:
            import torch.nn.functional as F

            feats, _, sizes = self._features(index)
            size = self.model.image_size
            high_res = F.interpolate(out["pred_masks"].to(self.device).float(), size=(size, size),
                                     mode="bilinear", align_corners=False)
            # The official video predictor encodes prompted slices' masks binarised
            # (binarize_mask_from_pts_for_mem_enc). Saturated logits give that result whether or
            # not this model was built with that flag: sigmoid(+-32) is 1 / 0 in float32.
            high_res = (high_res > 0).float() * 64.0 - 32.0
            maskmem, maskmem_pos = self.model._encode_new_memory(
                current_vision_feats=feats, feat_sizes=sizes, pred_masks_high_res=high_res,
                object_score_logits=out["object_score_logits"], is_mask_from_pts=True,
            )
            out["maskmem_features"] = maskmem.to(_bfloat16())
            out["maskmem_pos_enc"] = self._shared_maskmem_pos_enc(maskmem_pos)
        return out

    def _track(self, index: int, state: _RunState, n_slices: int, reverse: bool) -> dict:
        """One propagated slice: memory attention on the run's bank, decoder, memory encoder."""
        feats, pos, sizes = self._features(index)
        out = self.model.track_step(
            frame_idx=index, is_init_cond_frame=False, current_vision_feats=feats,
            current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None, mask_inputs=None,
            output_dict=state.as_output_dict(), num_frames=n_slices, track_in_reverse=reverse,
            run_mem_encoder=True,
        )
        return self._compact(out)

    def _compact(self, out: dict) -> dict:
        """What later steps need of a track_step output, stored as the official predictor does."""
        maskmem = out["maskmem_features"]
        pred_masks = out["pred_masks"]
        if self.fill_hole_area > 0 and _has_sam2_extension():
            from sam2.utils.misc import fill_holes_in_mask_scores

            pred_masks = fill_holes_in_mask_scores(pred_masks, self.fill_hole_area)
        return {
            "maskmem_features": None if maskmem is None else maskmem.to(_bfloat16()),
            "maskmem_pos_enc": None if maskmem is None else self._shared_maskmem_pos_enc(out["maskmem_pos_enc"]),
            "pred_masks": pred_masks,
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
        }

    def _shared_maskmem_pos_enc(self, maskmem_pos_enc: list) -> list:
        if self._maskmem_pos_enc is None:
            self._maskmem_pos_enc = [x[0:1].clone() for x in maskmem_pos_enc]
        return self._maskmem_pos_enc

    def _slice_result(self, out: dict) -> SliceMask:
        """The slice's mask at volume resolution (array frame) and SAM 2's object-score probability."""
        import torch
        import torch.nn.functional as F

        logits = F.interpolate(out["pred_masks"].float(), size=(self.frames.height, self.frames.width),
                               mode="bilinear", align_corners=False)
        mask = self.frames.view.from_view((logits[0, 0] > 0).cpu().numpy())
        object_logit = float(out["object_score_logits"].float().reshape(-1)[0])
        score = float(torch.sigmoid(torch.tensor(object_logit)))
        return SliceMask(mask=mask, score=score, extra={"object_score_logit": object_logit})

    def _point_input(self, prompt: SlicePrompt) -> dict:
        """Clicks (and a box as the two first points, labels 2 and 3) in the model's input frame
        (``prompt`` is already in the frames' view)."""
        import torch

        coords, labels = points_xy(prompt.points)
        if prompt.box is not None:
            coords = np.concatenate([box_xyxy(prompt.box).reshape(2, 2), coords])
            labels = np.concatenate([np.array([2, 3], dtype=np.int32), labels])
        points = torch.tensor(coords, dtype=torch.float32)[None]
        points = points / torch.tensor([self.frames.width, self.frames.height]) * self.model.image_size
        return {"point_coords": points.to(self.device),
                "point_labels": torch.tensor(labels, dtype=torch.int32)[None].to(self.device)}

    def _mask_input(self, mask: np.ndarray):
        """A mask prompt (in the frames' view) resized to the model's input size as ``add_new_mask`` does."""
        import torch
        import torch.nn.functional as F

        size = self.model.image_size
        tensor = torch.from_numpy(np.asarray(mask, dtype=bool))[None, None].float().to(self.device)
        if tensor.shape[-2:] != (size, size):
            tensor = F.interpolate(tensor, size=(size, size), align_corners=False, mode="bilinear",
                                   antialias=True)
            tensor = (tensor >= 0.5).float()
        return tensor

    def _features(self, index: int):
        """(vision_feats, vision_pos_embeds, feat_sizes) of slice ``index``, encoding it if needed."""
        fpn = [f.to(self.device) for f in self._backbone_fpn(index)]
        backbone_out = {"backbone_fpn": fpn, "vision_pos_enc": list(self._pos_enc)}
        _, feats, pos, sizes = self.model._prepare_backbone_features(backbone_out)
        return feats, pos, sizes

    def _backbone_fpn(self, index: int) -> list:
        fpn = self.cache.get(index)
        if fpn is None:
            with self._model_context():
                image = self.frames.tensor(index).to(self.device)
                backbone_out = self.model.forward_image(image)
            self._slices_encoded += 1
            if self._pos_enc is None:
                self._pos_enc = backbone_out["vision_pos_enc"]
            fpn = backbone_out["backbone_fpn"]
            if self.offload_features_to_cpu:
                fpn = [f.to("cpu") for f in fpn]
            self.cache.put(index, fpn)
        return fpn

    @contextlib.contextmanager
    def _model_context(self):
        """Inference mode, bfloat16 autocast on CUDA, and out-of-memory errors with advice."""
        import torch

        try:
            with torch.inference_mode(), autocast_context(self.device):
                yield
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            raise self._out_of_memory(exc) from exc
        except RuntimeError as exc:
            text = str(exc).lower()
            if "out of memory" in text or "can't allocate memory" in text:
                raise self._out_of_memory(exc) from exc
            raise

    def _out_of_memory(self, exc: BaseException) -> ModelOutOfMemoryError:
        used = self.cache.used_bytes / 1024**2
        return ModelOutOfMemoryError(
            f"The {self.device.type.upper()} device ran out of memory running {self.spec.name} "
            f"({type(exc).__name__}). The feature cache holds {used:.0f} MB of a "
            f"{self.cache.budget_bytes / 1024**2:.0f} MB budget. Try a smaller cache budget, keeping "
            "features in CPU memory (offload_features_to_cpu), running on the CPU (device 'cpu', "
            "slower but with the computer's memory), a smaller model (e.g. sam2.1_hiera_tiny or "
            "medsam2), or a slice range around the object."
        )


def _check_model(model, spec: ModelSpec) -> None:
    try:
        from sam2.modeling.sam2_base import SAM2Base
    except ImportError as exc:
        raise DependencyError(
            "The sam2 package is needed for SAM 2 / MedSAM2: SAM2_BUILD_CUDA=0 pip install sam2"
        ) from exc
    if spec.family != "sam2":
        raise CheckpointError(
            f"Model '{spec.name}' is a {spec.family} model; the SAM 2 engine needs a SAM 2 model "
            "(sam2.1_hiera_* or medsam2). Use the slice-wise engine for SAM / MedSAM."
        )
    if not isinstance(model, SAM2Base):
        raise CheckpointError(
            f"The SAM 2 engine needs a sam2 SAM2Base model, got {type(model).__name__}. Load a SAM 2 "
            "checkpoint (sam2.1_hiera_* or medsam2), or use the slice-wise engine for SAM / MedSAM."
        )
    if int(model.image_size) != int(spec.input_size):
        raise CheckpointError(
            f"The model takes {model.image_size} px input but '{spec.name}' is registered at "
            f"{spec.input_size} px; the model was built from another configuration than this checkpoint's."
        )


def _refines(prompt: SlicePrompt, earlier: SlicePrompt) -> bool:
    """True when ``prompt`` only adds clicks to ``earlier`` (then SAM 2 reuses its last logits)."""
    return (
        earlier.mask is None
        and not earlier.is_mask_only
        and prompt.box == earlier.box
        and prompt.points[: len(earlier.points)] == earlier.points
        and len(prompt.points) > len(earlier.points)
    )


def _bfloat16():
    import torch

    return torch.bfloat16


@functools.lru_cache(maxsize=1)
def _has_sam2_extension() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def _synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
