"""The pipelines peers use, written with the official APIs, for benchmarks only (never a feature).

- :func:`sam2_jpeg_video_pipeline`: every slice written as a JPEG frame, the official
  ``SAM2VideoPredictor`` (``init_state`` on the folder, a prompt on one frame, then
  ``propagate_in_video`` forward and, on the same state, in reverse), over every slice with no
  stop rule.
- :func:`sam_box_chaining_pipeline`: the official ``SamPredictor`` on every slice, outward from
  the prompted slice in both directions, each slice prompted with the bounding box of its
  neighbour's mask (the previous box is kept when a mask comes out empty).

Both take the same windowed uint8 volume (k, j, i) that our engines see, so that only the
pipeline differs. Each returns the 3D mask, the wall time and the image-encoder runs.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.prompts import Box, SlicePrompt, box_xyxy, points_xy
from ..data.volume import get_slice


@dataclass
class BaselineResult:
    mask: np.ndarray
    seconds: float
    slices_encoded: int
    name: str


def write_jpeg_frames(image_uint8: np.ndarray, axis: int, folder: Path, quality: int = 95) -> int:
    """Slices along ``axis`` as ``<index>.jpg`` greyscale-as-RGB frames; returns the count."""
    from PIL import Image

    n = image_uint8.shape[axis]
    for index in range(n):
        grey = np.ascontiguousarray(get_slice(image_uint8, axis, index))
        Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(folder / f"{index:05d}.jpg", quality=quality)
    return n


class _CountingForward:
    """Counts calls of a model's ``forward_image`` (instrumentation; restored by ``close``)."""

    def __init__(self, model):
        self.model, self.count = model, 0
        self._original = model.forward_image

        def counted(*args, **kwargs):
            self.count += 1
            return self._original(*args, **kwargs)

        model.forward_image = counted

    def close(self) -> None:
        del self.model.forward_image  # back to the class's method


def sam2_jpeg_video_pipeline(
    video_model, image_uint8: np.ndarray, axis: int, prompt: SlicePrompt, workdir: str | Path | None = None
) -> BaselineResult:
    """JPEG frames + official ``SAM2VideoPredictor``, forward then reverse on one state."""
    import torch

    counter = _CountingForward(video_model)
    shape = image_uint8.shape
    mask = np.zeros(shape, dtype=bool)
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as folder, torch.inference_mode():
            started = time.perf_counter()
            write_jpeg_frames(image_uint8, axis, Path(folder))
            state = video_model.init_state(video_path=folder)
            kwargs = {}
            if prompt.points:
                kwargs["points"], kwargs["labels"] = points_xy(prompt.points)
            if prompt.box is not None:
                kwargs["box"] = box_xyxy(prompt.box)
            video_model.add_new_points_or_box(state, frame_idx=prompt.index, obj_id=1, **kwargs)
            for reverse in (False, True):
                for frame, _, logits in video_model.propagate_in_video(state, start_frame_idx=prompt.index,
                                                                        reverse=reverse):
                    get_slice(mask, axis, frame)[...] = (logits[0, 0] > 0).cpu().numpy()
            seconds = time.perf_counter() - started
            video_model.reset_state(state)
    finally:
        counter.close()
    return BaselineResult(mask, seconds, counter.count, "JPEG frames + SAM2VideoPredictor, every slice")


def sam_box_chaining_pipeline(sam_model, image_uint8: np.ndarray, axis: int, prompt: SlicePrompt) -> BaselineResult:
    """Official ``SamPredictor`` on every slice with the neighbour's box as the prompt."""
    import torch
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam_model)
    n = image_uint8.shape[axis]
    mask = np.zeros(image_uint8.shape, dtype=bool)
    encoded = 0

    def segment(index: int, box: Box | None, with_points: bool) -> np.ndarray:
        nonlocal encoded
        grey = np.ascontiguousarray(get_slice(image_uint8, axis, index))
        predictor.set_image(np.repeat(grey[:, :, None], 3, axis=2))
        encoded += 1
        kwargs = {"box": box_xyxy(box) if box is not None else None}
        if with_points and prompt.points:
            kwargs["point_coords"], kwargs["point_labels"] = points_xy(prompt.points)
        masks, _, _ = predictor.predict(multimask_output=False, **kwargs)
        return masks[0].astype(bool)

    started = time.perf_counter()
    with torch.inference_mode():
        first = segment(prompt.index, prompt.box, with_points=True)
        get_slice(mask, axis, prompt.index)[...] = first
        for step in (+1, -1):
            box = _box_of(first) or prompt.box
            for index in range(prompt.index + step, n if step > 0 else -1, step):
                result = segment(index, box, with_points=False)
                get_slice(mask, axis, index)[...] = result
                box = _box_of(result) or box
    return BaselineResult(mask, time.perf_counter() - started, encoded, "SamPredictor per slice, box chaining, every slice")


def _box_of(mask: np.ndarray) -> Box | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0 or rows[-1] == rows[0] or cols[-1] == cols[0]:
        return None
    return Box(float(rows[0]), float(cols[0]), float(rows[-1]), float(cols[-1]))
