"""The wire format of ``sam3d serve``, shared by the server and the client (numpy + stdlib only).

- A **volume** travels once as one line of JSON (``dtype``, ``shape`` (k, j, i), ``ijk_to_ras``,
  ``modality``), a newline, and the zlib-compressed raw array (C order, little-endian). Its key is
  the sha256 of the uncompressed content: that header line, the newline and the raw bytes.
- A **mask** is ``{"shape": [...], "bits": base64(zlib(numpy.packbits(mask in C order)))}``.
- **Prompts, options, previews and results** are JSON objects named after the library's
  dataclasses (:class:`SlicePrompt`, :class:`PropagationOptions`, :class:`Preview`,
  :class:`PropagationResult`).

Malformed input raises :class:`InputError` / :class:`PromptError` with a message saying what
is wrong; the server answers 400 with that message, and 413 for :class:`TooLarge`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.prompts import Box, Point, SlicePrompt
from ..data.volume import Volume
from ..engines.session import Preview, PropagationOptions, PropagationResult, SliceMask, StopRule
from ..errors import InputError, PromptError

PROTOCOL_VERSION = 1
MAX_JSON_BYTES = 16 * 1024**2
"""Largest JSON request body the server reads (prompts and slice masks are far smaller)."""
JOB_STATES = ("queued", "running", "done", "cancelled", "failed")


class TooLarge(InputError):
    """A request or upload is larger than the server accepts (HTTP 413)."""


# --- volumes ---------------------------------------------------------------------------------

def _raw_array(volume: Volume) -> np.ndarray:
    array = np.ascontiguousarray(volume.array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def volume_header(volume: Volume) -> bytes:
    """The canonical one-line JSON header of ``volume``."""
    array = _raw_array(volume)
    header = {
        "dtype": array.dtype.str,
        "shape": [int(s) for s in array.shape],
        "ijk_to_ras": np.asarray(volume.ijk_to_ras, dtype=float).tolist(),
        "modality": volume.modality,
    }
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def volume_sha256(volume: Volume) -> str:
    """The volume's key: sha256 of its header line, a newline and its raw bytes."""
    digest = hashlib.sha256(volume_header(volume) + b"\n")
    digest.update(_raw_array(volume).tobytes())
    return digest.hexdigest()


def encode_volume(volume: Volume) -> bytes:
    """The upload body of ``volume``."""
    return volume_header(volume) + b"\n" + zlib.compress(_raw_array(volume).tobytes(), 1)


def decode_volume(blob: bytes, max_bytes: int) -> tuple[str, Volume]:
    """(sha256, Volume) of an upload body; arrays larger than ``max_bytes`` raise :class:`TooLarge`."""
    line, newline, payload = bytes(blob).partition(b"\n")
    if not newline:
        raise InputError("A volume upload is one JSON header line, a newline, then the zlib-compressed array.")
    header = parse_json(line, "volume header")
    dtype = _dtype(header.get("dtype"))
    shape = _ints(header.get("shape"), "volume shape", length=3, minimum=1)
    size = math.prod(shape) * dtype.itemsize
    if size > max_bytes:
        raise TooLarge(
            f"The volume has {size / 1024**2:.1f} MB of voxels; this server accepts at most "
            f"{max_bytes / 1024**2:.0f} MB (sam3d serve --max-volume-mb)."
        )
    matrix = header.get("ijk_to_ras")
    if not (isinstance(matrix, list) and len(matrix) == 4 and all(_numbers(row, 4) for row in matrix)):
        raise InputError("Volume header: ijk_to_ras must be a 4x4 matrix of finite numbers.")
    modality = header.get("modality")
    if modality is not None and not (isinstance(modality, str) and len(modality) <= 16):
        raise InputError("Volume header: modality must be a short string or null.")
    raw = _inflate(payload, size, "volume data")
    if len(raw) != size:
        raise InputError(
            f"The volume data holds {len(raw)} bytes after decompression, but dtype {dtype.str} and "
            f"shape {shape} need {size}."
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    volume = Volume(array, np.asarray(matrix, dtype=float), modality=modality)
    return volume_sha256(volume), volume


def _dtype(text: Any) -> np.dtype:
    try:
        dtype = np.dtype(text) if isinstance(text, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise InputError(f"Volume header: dtype must be a numeric numpy type such as '<i2' or '<f4'; got {text!r}.")
    return dtype


def _inflate(payload: bytes, limit: int, what: str) -> bytes:
    """Decompress at most ``limit`` bytes (one more tells that the data is too long)."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise InputError(f"The {what} is not valid zlib data ({exc}).") from None
    if not inflater.eof and len(raw) <= limit:
        raise InputError(f"The {what} is truncated (the zlib stream does not end).")
    return raw


# --- JSON values -----------------------------------------------------------------------------

def parse_json(body: bytes, what: str = "request body") -> dict:
    """A JSON object from ``body``, or an :class:`InputError`."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"The {what} is not valid JSON ({exc}).") from None
    if not isinstance(value, dict):
        raise InputError(f"The {what} must be a JSON object.")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(values: Any, length: int) -> bool:
    return isinstance(values, list) and len(values) == length and all(_is_number(v) for v in values)


def _ints(values: Any, what: str, length: int | None = None, minimum: int = 0) -> list[int]:
    ok = isinstance(values, list) and (length is None or len(values) == length)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values)
    if not ok:
        size = f"{length} " if length is not None else ""
        raise InputError(f"{what} must be a list of {size}integers >= {minimum}; got {values!r}.")
    return list(values)


def _int(value: Any, what: str, error: type[Exception] = InputError) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{what} must be an integer; got {value!r}.")
    return value


# --- masks -----------------------------------------------------------------------------------

def mask_to_json(mask: np.ndarray) -> dict:
    mask = np.asarray(mask, dtype=bool)
    bits = zlib.compress(np.packbits(mask.ravel()).tobytes(), 1)
    return {"shape": [int(s) for s in mask.shape], "bits": base64.b64encode(bits).decode("ascii")}


def mask_from_json(value: Any, what: str = "mask", ndim: int = 2) -> np.ndarray:
    """A boolean array from :func:`mask_to_json`'s form, or an :class:`InputError` naming ``what``."""
    if not isinstance(value, dict) or not isinstance(value.get("bits"), str):
        raise InputError(f"The {what} must be an object with 'shape' and 'bits' (base64 of zlib of packed bits).")
    shape = _ints(value.get("shape"), f"The {what}'s shape", length=ndim)
    count = math.prod(shape)
    try:
        packed = base64.b64decode(value["bits"], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"The {what}'s bits are not valid base64.") from None
    needed = (count + 7) // 8
    raw = _inflate(packed, needed, what)
    if len(raw) != needed:
        raise InputError(f"The {what} holds {len(raw)} bytes of packed bits; shape {shape} needs {needed}.")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count).reshape(shape).astype(bool)


# --- prompts and options ---------------------------------------------------------------------

def prompt_to_json(prompt: SlicePrompt) -> dict:
    return {
        "axis": int(prompt.axis),
        "index": int(prompt.index),
        "points": [[float(p.row), float(p.col), bool(p.positive)] for p in prompt.points],
        "box": None if prompt.box is None else [float(v) for v in dataclasses.astuple(prompt.box)],
        "mask": None if prompt.mask is None else mask_to_json(prompt.mask),
    }


def prompt_from_json(value: Any) -> SlicePrompt:
    """A :class:`SlicePrompt`; malformed parts raise :class:`PromptError`."""
    if not isinstance(value, dict):
        raise PromptError("The prompt must be a JSON object with axis, index, points, box and mask.")
    axis = _int(value.get("axis"), "The prompt's axis", PromptError)
    index = _int(value.get("index"), "The prompt's slice index", PromptError)
    points = []
    for point in value.get("points") or []:
        if not (isinstance(point, list) and len(point) == 3 and _numbers(point[:2], 2) and isinstance(point[2], bool)):
            raise PromptError(f"A point must be [row, col, positive] (two numbers and true/false); got {point!r}.")
        points.append(Point(float(point[0]), float(point[1]), point[2]))
    box = value.get("box")
    if box is not None:
        if not _numbers(box, 4):
            raise PromptError(f"The box must be [row0, col0, row1, col1] (four numbers); got {box!r}.")
        box = Box(*(float(v) for v in box))
    mask = value.get("mask")
    if mask is not None:
        try:
            mask = mask_from_json(mask, "prompt mask")
        except InputError as exc:
            raise PromptError(str(exc)) from None
    return SlicePrompt(axis=axis, index=index, points=tuple(points), box=box, mask=mask)


def options_to_json(options: PropagationOptions | None) -> dict:
    options = options or PropagationOptions()
    return {
        "direction": options.direction,
        "slice_range": None if options.slice_range is None else [int(v) for v in options.slice_range],
        "stop": dataclasses.asdict(options.stop),
    }


def options_from_json(value: Any) -> PropagationOptions:
    if value is None:
        return PropagationOptions()
    if not isinstance(value, dict) or set(value) - {"direction", "slice_range", "stop"}:
        raise InputError("Propagation options are an object with direction, slice_range and stop.")
    direction = value.get("direction", "both")
    if direction not in ("both", "forward", "backward"):
        raise InputError(f"direction must be both, forward or backward; got {direction!r}.")
    slice_range = value.get("slice_range")
    if slice_range is not None:
        slice_range = tuple(_ints(slice_range, "slice_range", length=2))
    stop = value.get("stop") or {}
    known = {f.name for f in dataclasses.fields(StopRule)}
    if not isinstance(stop, dict) or set(stop) - known:
        raise InputError(f"The stop rule takes {', '.join(sorted(known))}; got {stop!r}.")
    for name, item in stop.items():
        if name in ("min_area", "patience"):
            _int(item, f"Stop rule {name}")
        elif item is not None and not _is_number(item):
            raise InputError(f"Stop rule {name} must be a number or null; got {item!r}.")
    return PropagationOptions(direction=direction, slice_range=slice_range, stop=StopRule(**stop))


def window_to_json(window: Any) -> dict | None:
    """A ``WindowSpec`` (any dataclass with its fields) as JSON; None for automatic."""
    return None if window is None else dataclasses.asdict(window)


def window_from_json(value: Any):
    """The ``WindowSpec`` of :func:`window_to_json`'s form (None: automatic)."""
    from ..data.intensity import WindowSpec

    if value is None:
        return None
    known = {f.name for f in dataclasses.fields(WindowSpec)}
    if not isinstance(value, dict) or set(value) - known:
        raise InputError(f"The window takes {', '.join(sorted(known))}; got {value!r}.")
    if not isinstance(value.get("mode", "auto"), str):
        raise InputError("The window's mode must be a string.")
    for name, item in value.items():
        if name != "mode" and item is not None and not _is_number(item):
            raise InputError(f"The window's {name} must be a number or null.")
    return WindowSpec(**value)


# --- results ---------------------------------------------------------------------------------

def preview_to_json(preview: Preview) -> dict:
    return {"axis": preview.axis, "index": preview.index, "mask": mask_to_json(preview.mask),
            "score": _float_or_none(preview.score), "seconds": float(preview.seconds)}


def preview_from_json(value: dict) -> Preview:
    return Preview(int(value["axis"]), int(value["index"]), mask_from_json(value["mask"], "preview mask"),
                   value.get("score"), float(value["seconds"]))


def slice_mask_to_json(result: SliceMask) -> dict:
    return {"mask": mask_to_json(result.mask), "score": _float_or_none(result.score),
            "stability": _float_or_none(result.stability)}


def slice_mask_from_json(value: dict) -> SliceMask:
    return SliceMask(mask_from_json(value["mask"], "anchor mask"), value.get("score"), value.get("stability"))


def result_to_json(result: PropagationResult) -> dict:
    return {
        "object_id": result.object_id,
        "axis": result.axis,
        "mask": mask_to_json(result.mask),
        "scores": {str(k): float(v) for k, v in result.scores.items()},
        "slices_computed": [int(i) for i in result.slices_computed],
        "slices_encoded": int(result.slices_encoded),
        "stop_reasons": dict(result.stop_reasons),
        "seconds": float(result.seconds),
        "engine": result.engine,
    }


def result_from_json(value: dict) -> PropagationResult:
    return PropagationResult(
        object_id=int(value["object_id"]),
        axis=int(value["axis"]),
        mask=mask_from_json(value["mask"], "result mask", ndim=3),
        scores={int(k): float(v) for k, v in value["scores"].items()},
        slices_computed=[int(i) for i in value["slices_computed"]],
        slices_encoded=int(value["slices_encoded"]),
        stop_reasons=dict(value["stop_reasons"]),
        seconds=float(value["seconds"]),
        engine=str(value["engine"]),
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass
class JobStatus:
    """A propagation job as the client sees it; ``result`` once ``state`` is "done"."""

    job_id: str
    object_id: int
    state: str
    done: int = 0
    total: int = 0
    index: int = -1
    error: str | None = None
    message: str | None = None
    result: PropagationResult | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")

    def to_json(self) -> dict:
        value = dataclasses.asdict(dataclasses.replace(self, result=None))
        value["result"] = None if self.result is None else result_to_json(self.result)
        return value

    @classmethod
    def from_json(cls, value: dict) -> "JobStatus":
        result = value.get("result")
        fields = {k: v for k, v in value.items() if k != "result"}
        return cls(**fields, result=None if result is None else result_from_json(result))
