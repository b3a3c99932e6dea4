"""Training slices: frozen-encoder embeddings, labels in the model's low-res frame, label boxes.

Every slice holding the target becomes one :class:`TrainingSlice`. Its embedding is the image
encoder's output for the exact model input the sliding-window engine gives that slice
(:meth:`~SAM3DSegmentLib.engines.sam_slice_predictor.SamSlicePredictor.encode_slice`: windowing,
radiological view, resizing, normalisation, padding), computed once and kept in memory, or read
from an on-disk cache keyed by the volume's windowed voxels and the base checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.intensity import WindowSpec
from ..data.volume import Volume, get_slice
from ..engines.sam_slice_predictor import SamSlicePredictor
from ..errors import InputError
from ..models.registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
"""progress(done, total, what)."""


@dataclass
class TrainingSlice:
    """One slice with the target: what the decoder sees and what it should answer."""

    case: str
    index: int
    embedding: object
    """(C, h, w) float32 CPU tensor: the frozen image encoder's output."""
    target: object
    """(1, L, L) float32 CPU tensor of 0/1: the label in the decoder's low-res frame (padded input frame)."""
    box: np.ndarray
    """(x0, y0, x1, y1): the label's tight box in the model's input frame (before padding)."""
    frame: tuple[int, int]
    """(rows, cols) of the slice inside the input frame; the rest is padding."""


def label_in_frame(mask_view: np.ndarray, resized: tuple[int, int], input_size: int, low_res: int) -> np.ndarray:
    """A view-frame boolean mask as the decoder's (low_res, low_res) target: resized (nearest) into
    the input frame, zero padding bottom/right, then to the low-res size."""
    import cv2

    frame = np.zeros((input_size, input_size), dtype=np.uint8)
    frame[: resized[0], : resized[1]] = cv2.resize(
        mask_view.astype(np.uint8), (resized[1], resized[0]), interpolation=cv2.INTER_NEAREST
    )
    if low_res != input_size:
        frame = cv2.resize(frame, (low_res, low_res), interpolation=cv2.INTER_NEAREST)
    return frame.astype(bool)


def tight_box(mask_view: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) of a view-frame mask (inclusive pixels, as the simulated user's box) in the input frame."""
    rows, cols = np.flatnonzero(mask_view.any(axis=1)), np.flatnonzero(mask_view.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64) * np.tile(scale, 2)


def prepare_slices(
    model,
    spec: ModelSpec | str,
    volume: Volume,
    reference: np.ndarray,
    *,
    name: str = "",
    axis: int = 0,
    device=None,
    window: WindowSpec | None = None,
    cache_dir: str | Path | None = None,
    base_sha256: str = "",
    progress: Progress | None = None,
) -> list[TrainingSlice]:
    """The training slices of one (volume, target mask) pair along ``axis``.

    ``cache_dir`` keeps the embeddings on disk (one file per volume, target slices and base
    checkpoint), so a resumed or repeated fine-tuning does not encode again.
    """
    import torch

    spec = get_spec(spec)
    reference = np.asarray(reference, dtype=bool)
    if reference.shape != volume.array.shape:
        raise InputError(f"Label of {name or 'the volume'} has shape {reference.shape}, the image {volume.array.shape}.")
    indices = [i for i in range(reference.shape[axis]) if get_slice(reference, axis, i).any()]
    if not indices:
        raise InputError(f"The target is empty in {name or 'the volume'}: nothing to train on.")
    predictor = SamSlicePredictor(volume, axis, model, spec, device, window)
    cache_file = None
    cached: dict[int, object] = {}
    if cache_dir is not None:
        digest = hashlib.sha256(predictor.image.tobytes())
        digest.update(f"{axis}:{indices}:{base_sha256}:{spec.name}".encode())
        cache_file = Path(cache_dir) / f"{name or 'volume'}_{digest.hexdigest()[:16]}.pt"
        if cache_file.is_file():
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            log.info("Embeddings of %s read from %s", name, cache_file)
    low_res = 4 * int(model.prompt_encoder.image_embedding_size[0])
    slices = []
    for done, index in enumerate(indices):
        if index not in cached:
            cached[index] = predictor.encode_slice(index)[0].float().cpu()
        view_shape = predictor.view.view_shape
        mask_view = predictor.view.to_view(get_slice(reference, axis, index))
        resized = predictor.resized_size(view_shape)
        target = label_in_frame(mask_view, resized, predictor.input_size, low_res)
        slices.append(TrainingSlice(
            name, index, cached[index], torch.as_tensor(target, dtype=torch.float32)[None],
            tight_box(mask_view, predictor.prompt_scale(view_shape)), tuple(int(v) for v in resized),
        ))
        if progress is not None:
            progress(done + 1, len(indices), f"encoding {name} slice {index}")
    if cache_file is not None and not cache_file.is_file():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cached, cache_file)
    predictor.close()
    return slices
