"""LiteMedSAM's own published 3D inference, re-implemented as a baseline for evaluation only.

Written from reading ``MedSAM_infer_npz_3D`` in ``CVPR24_LiteMedSAM_infer.py`` (LiteMedSAM
branch of bowang-lab/MedSAM), the 2D oracle of its ``inference_3D.py`` and the intensities of
its ``pre_CT_MR.py``. Nothing here is used to segment: it measures what the published pipeline
does on our cases, so that our engines can be compared with it.

What upstream does, and this module repeats:

- Intensities (:func:`upstream_intensities`): CT clipped to level 40 / width 400, MR clipped to
  the 0.5-99.5 percentiles of its non-zero voxels; both then min-max scaled to 0-255 over the
  clipped volume and truncated to uint8 (MR background, the voxels == 0, stays 0).
- Per slice (array axis 0, i.e. k): grey to 3 channels, longest side to 256 with
  ``cv2.INTER_AREA`` (sizes ``int(x + 0.5)``), min-max to [0, 1], zero padding bottom/right;
  one image-encoder forward. The box (x0, y0, x1, y1) is scaled by ``int(v * 256 / max(H, W))``;
  the single-mask output is cropped to the resized frame, resized bilinearly to (H, W) and
  thresholded at sigmoid > 0.5.
- 3D (:func:`upstream_3d_pipeline`): from the start slice up, then down; each slice's box is the
  previous slice's mask resized to 256 (``INTER_AREA``), padded, its bounding box enlarged by
  3 px and clipped to [0, 256]; when that resized mask is empty the start box is used again.
  Upstream's loops are ``range(z_middle, z_max)`` and ``range(z_middle - 1, z_min, -1)``: the
  end slices ``z_min`` and ``z_max`` are never segmented (``limits="upstream"``);
  ``limits="inclusive"`` segments them too.
- Without the z-range (``z_range=False``, protocol "B"): the same propagation until the previous
  mask vanishes (its 256 px version is empty) or the volume ends, with no fallback box; the
  slice where the mask comes out empty is encoded, the next one is not.
- The oracle (:func:`oracle_box_every_slice`): a box from the reference on every slice that has
  the target, no propagation (``inference_3D.py``).

The reference figures (``../shared/reference``) are reproduced to 4 decimals with three
choices that differ from upstream's code, all options here: the A protocol with the end slices
included (``limits="inclusive"``; upstream's exclusive limits give lower Dice), MR percentiles
over voxels != 0 (``pre_CT_MR.py`` takes voxels > 0; ``mr_voxels="positive"``), and uint8
volumes (the DeepLesion slabs) left unwindowed (``keep_uint8``). The oracle's margin-0 box is
the tight box in slice pixels scaled like the start box; its 5 px box is ``inference_3D.py``'s,
made on the nearest-neighbour 256 px reference.

A :class:`~SAM3DSegmentLib.data.orientation.SliceView` shows every slice, box and reference to
the model in that view; masks come back in array coordinates. The reference's "canonical"
orientation is :func:`~SAM3DSegmentLib.data.orientation.radiological_view` of axis 0.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..data.orientation import SliceView, radiological_view
from ..data.prompts import Box
from ..data.volume import Volume
from ..errors import InputError

log = logging.getLogger(__name__)

MODEL_SIZE = 256
PROPAGATION_BOX_SHIFT = 3  # get_bbox256's bbox_shift
CT_WINDOW_LEVEL, CT_WINDOW_WIDTH = 40.0, 400.0
MR_PERCENTILES = (0.5, 99.5)

Limits = Literal["upstream", "inclusive"]
OracleBoxFrame = Literal["model", "slice"]
MRVoxels = Literal["nonzero", "positive"]


# --- intensities -------------------------------------------------------------------------------


def upstream_intensities(
    array: np.ndarray, modality: str | None, *, keep_uint8: bool = True, mr_voxels: MRVoxels = "nonzero"
) -> np.ndarray:
    """The volume as uint8, as ``pre_CT_MR.py`` makes it (CT when ``modality`` starts with "CT", else MR).

    MR percentiles are taken over the voxels != 0 (``mr_voxels="nonzero"``, as the reference
    figures; it matters for z-scored or signed MR) or > 0 (``"positive"``, upstream's code).
    With ``keep_uint8`` a volume that is already uint8 (e.g. the DeepLesion slabs, windowed to
    0-255 before release) is returned unchanged, as the reference figures were made.
    """
    data = np.asarray(array)
    if keep_uint8 and data.dtype == np.uint8:
        return data.copy()
    if modality is not None and modality.upper().startswith("CT"):
        low = CT_WINDOW_LEVEL - CT_WINDOW_WIDTH / 2.0
        high = CT_WINDOW_LEVEL + CT_WINDOW_WIDTH / 2.0
        background = None
    else:
        sample = data[data != 0] if mr_voxels == "nonzero" else data[data > 0]
        if sample.size == 0:
            which = "!= 0" if mr_voxels == "nonzero" else "> 0"
            raise InputError(f"The MR volume has no voxel {which} to take percentiles of.")
        low, high = (float(v) for v in np.percentile(sample, MR_PERCENTILES))
        background = data == 0
    clipped = np.clip(data, low, high).astype(np.float64)
    span = float(clipped.max() - clipped.min())
    if span > 0:
        scaled = (clipped - clipped.min()) / span * 255.0
    else:  # a constant volume: upstream divides by zero; keep it black instead of NaN
        scaled = np.zeros_like(clipped)
    if background is not None:
        scaled[background] = 0.0
    return scaled.astype(np.uint8)  # truncation, as np.uint8(...)


# --- results and prompts -----------------------------------------------------------------------


@dataclass
class UpstreamResult:
    """The 3D mask (k, j, i), the slices the protocol encoded (in order) and its wall time."""

    mask: np.ndarray
    slices_encoded: int
    seconds: float
    slices: tuple[int, ...] = ()


@dataclass(frozen=True)
class StartBox:
    """Upstream's 3D box: the z-range ``[z_min, z_max]`` (inclusive label extent), the start slice
    ``z_start`` and the target's inclusive pixel bounds on it, in array slice coordinates."""

    z_min: int
    z_max: int
    z_start: int
    row0: int
    col0: int
    row1: int
    col1: int

    @property
    def box(self) -> Box:
        return Box(self.row0, self.col0, self.row1, self.col1)

    @classmethod
    def from_reference(cls, reference_kji: np.ndarray, z_start: int | None = None) -> "StartBox":
        """The box of ``reference_kji`` on ``z_start`` (default upstream's ``z_middle`` of its z-range)."""
        reference = np.asarray(reference_kji, dtype=bool)
        z_indices = np.flatnonzero(reference.any(axis=(1, 2)))
        if z_indices.size == 0:
            raise InputError("The reference mask is empty: there is no target to put a box on.")
        z_min, z_max = int(z_indices[0]), int(z_indices[-1])
        if z_start is None:
            z_start = upstream_middle(z_min, z_max)
        rows, cols = np.nonzero(reference[z_start])
        if rows.size == 0:
            raise InputError(f"The reference has no voxel on start slice {z_start}.")
        return cls(z_min, z_max, int(z_start), int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max()))


def upstream_middle(z_min: int, z_max: int) -> int:
    """``z_middle = int((z_max - z_min) / 2 + z_min)``, upstream's start slice."""
    return int((z_max - z_min) / 2 + z_min)


def largest_slice(reference_kji: np.ndarray) -> int:
    """The slice (axis 0) where the reference is largest (the first of equals)."""
    return int(np.argmax(np.asarray(reference_kji, dtype=bool).sum(axis=(1, 2))))


# --- one slice ---------------------------------------------------------------------------------


def _resized_size(shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) after upstream's resize_longest_side to 256."""
    scale = MODEL_SIZE * 1.0 / max(shape)
    return int(shape[0] * scale + 0.5), int(shape[1] * scale + 0.5)


def _resize_longest(image: np.ndarray, interpolation: int | None = None) -> np.ndarray:
    import cv2

    rows, cols = _resized_size(image.shape[:2])
    return cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA if interpolation is None else interpolation)


def _pad(image: np.ndarray) -> np.ndarray:
    pad = ((0, MODEL_SIZE - image.shape[0]), (0, MODEL_SIZE - image.shape[1])) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad)


def _scaled_box(box: Box, shape: tuple[int, int]) -> np.ndarray:
    """A slice-pixel box as upstream's (x0, y0, x1, y1) in the 256 frame (resize_box_to_256)."""
    ratio = MODEL_SIZE / max(shape)
    return np.array([int(v * ratio) for v in (box.col0, box.row0, box.col1, box.row1)], dtype=np.int64)


def _mask_box256(mask_256: np.ndarray, shift: int) -> np.ndarray | None:
    """Bounding box (x0, y0, x1, y1) of a padded 256 mask, enlarged by ``shift`` and clipped to [0, 256]."""
    rows, cols = np.nonzero(mask_256)
    if rows.size == 0:
        return None
    size = mask_256.shape
    return np.array([
        max(0, int(cols.min()) - shift), max(0, int(rows.min()) - shift),
        min(size[1], int(cols.max()) + shift), min(size[0], int(rows.max()) + shift),
    ], dtype=np.int64)


def _propagation_box(previous_mask: np.ndarray) -> np.ndarray | None:
    """get_bbox256 of the previous slice's mask resized to 256 (None when it vanishes there)."""
    resized = _resize_longest(previous_mask.astype(np.uint8))
    if not resized.any():
        return None
    return _mask_box256(_pad(resized), PROPAGATION_BOX_SHIFT)


class EmbeddingCache:
    """Slice embeddings of one image, per view, shared by several protocol runs on it.

    Only saves encoder time: each run still counts every slice it needs in ``slices_encoded``.
    """

    def __init__(self, image_uint8_kji: np.ndarray):
        self.image = image_uint8_kji
        self._store: dict[tuple[SliceView, int], object] = {}
        self.encoded = 0
        self.encode_seconds = 0.0

    def get(self, view: SliceView, z: int):
        return self._store.get((view, z))

    def put(self, view: SliceView, z: int, embedding) -> None:
        self._store[(view, z)] = embedding

    def clear(self) -> None:
        self._store.clear()


class _SliceModel:
    """The model on the slices of one uint8 image (k, j, i) seen through one view."""

    def __init__(self, model, image_uint8_kji: np.ndarray, view: SliceView | None, cache: EmbeddingCache | None):
        if cache is not None and cache.image is not image_uint8_kji:
            raise InputError("The embedding cache belongs to another image; use one cache per image.")
        image = np.asarray(image_uint8_kji)
        if image.ndim != 3:
            raise InputError(f"A 3D image (k, j, i) is needed; got shape {image.shape}.")
        if image.dtype != np.uint8:
            raise InputError(
                f"Upstream's pipeline takes uint8 intensities (see upstream_intensities); got {image.dtype}."
            )
        if view is not None and tuple(view.shape) != image.shape[1:]:
            raise InputError(f"The view is for slices of shape {view.shape}, the image's are {image.shape[1:]}.")
        self.model = model
        self.image = image
        self.view = view if view is not None else SliceView(shape=image.shape[1:])
        self.shape = self.view.view_shape
        self.cache = cache if cache is not None else EmbeddingCache(image_uint8_kji)
        self.order: list[int] = []

    def _encode(self, z: int):
        import torch

        grey = self.view.to_view(self.image[z])
        resized = _resize_longest(np.repeat(grey[:, :, None], 3, axis=2))
        low, high = resized.min(), resized.max()
        scaled = (resized - low) / np.clip(high - low, 1e-8, None)  # float64, as upstream
        tensor = torch.tensor(_pad(scaled)).float().permute(2, 0, 1).unsqueeze(0)
        device = next(self.model.parameters()).device
        return self.model.image_encoder(tensor.to(device))

    def segment(self, z: int, box256: np.ndarray) -> np.ndarray:
        """The view-frame mask of slice ``z`` for a 256-frame box (x0, y0, x1, y1)."""
        import torch

        with torch.inference_mode():
            if z not in self.order:
                self.order.append(z)
            embedding = self.cache.get(self.view, z)
            if embedding is None:
                tic = time.perf_counter()
                embedding = self._encode(z)
                self.cache.encoded += 1
                self.cache.encode_seconds += time.perf_counter() - tic
                self.cache.put(self.view, z, embedding)
            boxes = torch.as_tensor(np.asarray(box256)[None, None, :], dtype=torch.float, device=embedding.device)
            sparse, dense = self.model.prompt_encoder(points=None, boxes=boxes, masks=None)
            logits, _ = self.model.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            rows, cols = _resized_size(self.shape)
            logits = torch.nn.functional.interpolate(
                logits[..., :rows, :cols].float(), size=self.shape, mode="bilinear", align_corners=False
            )
            return (torch.sigmoid(logits)[0, 0] > 0.5).cpu().numpy()

    def result(self, view_masks: dict[int, np.ndarray], started: float) -> UpstreamResult:
        mask = np.zeros(self.image.shape, dtype=bool)
        for z, view_mask in view_masks.items():
            mask[z] = self.view.from_view(view_mask)
        return UpstreamResult(mask, len(self.order), time.perf_counter() - started, tuple(self.order))


# --- the protocols -----------------------------------------------------------------------------


def upstream_3d_pipeline(
    model,
    image_uint8_kji: np.ndarray,
    box_kji_range: StartBox | tuple[int, int, int, int, int, int, int],
    *,
    z_range: bool = True,
    view: SliceView | None = None,
    limits: Limits = "upstream",
    cache: EmbeddingCache | None = None,
) -> UpstreamResult:
    """``MedSAM_infer_npz_3D`` on array axis 0 from ``box_kji_range`` = (z_min, z_max, z_start,
    row0, col0, row1, col1) or a :class:`StartBox`.

    ``z_range=True`` ("A"): up over ``range(z_start, z_max)`` then down over
    ``range(z_start - 1, z_min, -1)`` (``limits="upstream"``, upstream's code) or to ``z_max`` /
    ``z_min`` included (``limits="inclusive"``), falling back to the start box when the previous
    mask is empty. ``z_range=False`` ("B"): z_min/z_max are ignored; each direction goes on until
    the previous mask vanishes or the volume ends, with no fallback. ``cache`` shares slice
    embeddings between runs on the same image.
    """
    start = box_kji_range if isinstance(box_kji_range, StartBox) else StartBox(*(int(v) for v in box_kji_range))
    runner = _SliceModel(model, image_uint8_kji, view, cache)
    n_slices = runner.image.shape[0]
    if not 0 <= start.z_start < n_slices:
        raise InputError(f"Start slice {start.z_start} is outside the volume's {n_slices} slices.")
    started = time.perf_counter()
    start_box = _scaled_box(runner.view.box_to_view(start.box), runner.shape)
    masks: dict[int, np.ndarray] = {}
    if z_range:
        extra = 1 if limits == "inclusive" else 0
        up = range(start.z_start, min(start.z_max + extra, n_slices))
        down = range(start.z_start - 1, max(start.z_min - extra, -1), -1)
    else:
        up, down = range(start.z_start, n_slices), range(start.z_start - 1, -1, -1)
    for direction, slices in ((+1, up), (-1, down)):
        for z in slices:
            if z == start.z_start:
                box = start_box
            else:
                previous = masks.get(z - direction)
                box = None if previous is None else _propagation_box(previous)
                if box is None:
                    if not z_range:
                        break  # B: the mask vanished, this direction ends
                    box = start_box
            masks[z] = runner.segment(z, box)
    log.debug("upstream 3D (%s): %d slices encoded", "A" if z_range else "B", len(runner.order))
    return runner.result(masks, started)


def oracle_box_every_slice(
    model,
    image_uint8_kji: np.ndarray,
    reference_kji: np.ndarray,
    *,
    margin_px: int = 0,
    view: SliceView | None = None,
    box_frame: OracleBoxFrame | None = None,
    cache: EmbeddingCache | None = None,
) -> UpstreamResult:
    """A box from ``reference_kji`` on every slice that has the target, no propagation.

    ``box_frame="slice"``: the tight box in slice pixels, enlarged by ``margin_px`` pixels (clipped
    to the slice), scaled as the 3D pipeline's start box. ``box_frame="model"`` (``inference_3D.py``):
    the reference slice resized to the 256 frame with nearest neighbour, its bounding box enlarged
    by ``margin_px`` there (5 upstream) and clipped to [0, 256]; a slice whose resized reference is
    empty is skipped. The default, as the reference figures: "slice" for ``margin_px == 0``,
    "model" otherwise.
    ``cache`` shares slice embeddings between runs.
    """
    import cv2

    if box_frame is None:
        box_frame = "slice" if margin_px == 0 else "model"
    reference = np.asarray(reference_kji, dtype=bool)
    runner = _SliceModel(model, image_uint8_kji, view, cache)
    if reference.shape != runner.image.shape:
        raise InputError(f"Reference shape {reference.shape} differs from the image's {runner.image.shape}.")
    started = time.perf_counter()
    masks: dict[int, np.ndarray] = {}
    for z in np.flatnonzero(reference.any(axis=(1, 2))):
        target = runner.view.to_view(reference[z]).astype(np.uint8)
        if box_frame == "model":
            box = _mask_box256(_pad(_resize_longest(target, cv2.INTER_NEAREST)), margin_px)
        else:
            rows, cols = np.nonzero(target)
            tight = Box(max(rows.min() - margin_px, 0), max(cols.min() - margin_px, 0),
                        min(rows.max() + margin_px, target.shape[0]), min(cols.max() + margin_px, target.shape[1]))
            box = _scaled_box(tight, runner.shape)
        if box is not None:
            masks[int(z)] = runner.segment(int(z), box)
    return runner.result(masks, started)


def run_on_volume(model, volume: Volume, reference_kji: np.ndarray, protocol: str = "upstream") -> UpstreamResult:
    """A baseline on a :class:`Volume` along array axis 0, as the reference figures were made:
    upstream's intensities, the radiological view, and ``protocol`` "upstream" (the 3D pipeline
    with the reference's z-range and middle-slice box, end slices included) or "oracle" (a box
    from the reference on every slice)."""
    if protocol not in ("upstream", "oracle"):
        raise InputError(f"protocol must be 'upstream' or 'oracle'; got {protocol!r}.")
    image = upstream_intensities(volume.array, volume.modality)
    view = radiological_view(volume.ijk_to_ras, 0, volume.shape[1:])
    if protocol == "oracle":
        return oracle_box_every_slice(model, image, reference_kji, view=view)
    return upstream_3d_pipeline(model, image, StartBox.from_reference(reference_kji), view=view, limits="inclusive")
