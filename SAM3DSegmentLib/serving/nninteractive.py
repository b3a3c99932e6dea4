"""nnInteractive's remote protocol (its client ``nninteractive-client`` 2.6.0) on ``sam3d serve``.

SlicerNNInteractive and napari-nninteractive in their Remote mode drive these routes, mounted
under ``/nninteractive`` (the client's server URL is ``http://HOST:PORT/nninteractive``). They
use the server's token (``Authorization: Bearer``), limits and model worker: a lease holds one
of ``--max-sessions`` slots, its image is a volume of the core, its prompts go to core sessions.

Our semantics, mapped (docs/nninteractive.md):

- **One object per lease**, segmented in one plane at a time: a core session along one array
  axis. A box, lasso or scribble is drawn on one slice; its size-1 axis is the plane. A point
  carries no plane: it goes to the current plane; before any, to a size-1 axis of the image,
  else to the axis of largest spacing (``image_properties["spacing"]``; first on ties, axis 0
  without spacing): across the slices of an axial scan.
- **A prompt in another plane** opens a session along that plane, seeded with the current object
  (each of its slices along the new plane a fixed mask), then adds the prompt there.
- **Prompts.** A point is a click; a 2D box a box (exclude boxes and 3D boxes are refused); a
  lasso adds its filled region to that slice's mask (exclude: removes it) and fixes the slice;
  a scribble gives up to five clicks along the stroke; an initial segmentation resets the
  object and fixes each of its slices along the plane.
- **Predictions** propagate the object in 3D and answer with the box of the voxels that changed
  since the last answer. A propagation still running after ``prediction_budget_s`` stops and
  answers with the slices done by then (their features stay cached); the next prediction goes on.
- **Undo** is multi-level (:data:`~.store.UNDO_DEPTH` steps): the core's undo of the prompt, and
  the target buffer exactly as it was before it.
- **The volumetric engine** (3DSAM-adapter) takes include clicks only: positive points are its
  prompts; boxes, lassos, scribbles, negative points and initial segmentations answer 400 (the
  capabilities say so). Its prediction is one 3D inference, so the time budget does not cut it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..data.prompts import Box, Point, SlicePrompt, slice_shape
from ..data.volume import Volume
from ..data.volume_files import guess_modality
from ..engines.session import PropagationOptions
from ..errors import InputError, PromptError, PropagationCancelled, SAM3DError, ServerError
from . import protocol
from .bodies import read_body, read_json, upload_limit
from .nninteractive_arrays import decode_array, encode_array
from .protocol import TooLarge
from .store import UNDO_DEPTH, Refused, ServerCore

log = logging.getLogger(__name__)

PREFIX = "/nninteractive"
LEASE_HEADER = "x-lease-token"
META_HEADER = "X-Meta"
OBJECT = 1
"""The object id of a lease's segmentation in its core sessions."""
MAX_PLANES = 3
"""Sessions (planes) a lease keeps for undo; opening one more closes the oldest."""
SCRIBBLE_CLICKS = 5
RETRY_AFTER_S = 10


class LeaseGone(ServerError):
    """The lease is unknown, expired or released (HTTP 410: the client's SessionExpiredError)."""


@dataclass
class Plane:
    """A core session holding the object's prompts along ``axis``."""

    axis: int
    session_id: str
    last_index: int


@dataclass
class Step:
    """An undoable interaction: the plane it prompted and the target buffer before it."""

    plane: Plane
    opened_plane: bool
    before: bytes
    pending_before: bool


@dataclass
class Image:
    """A lease's image, its target buffer (what the client holds) and its object's planes."""

    volume_sha: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    target: np.ndarray
    planes: list[Plane] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    pending: bool = False  # prompts not predicted yet, or a prediction cut by the budget


@dataclass
class Lease:
    """One client of the protocol."""

    token: str
    owner: str
    last_seen: float
    last_active: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy: int = 0
    closed: bool = False
    image: Image | None = None
    do_autozoom: bool = False

    @property
    def slot(self) -> str:
        return "nninteractive:" + self.token


@dataclass
class Answer:
    """A prediction answer: whether something ran, the changed box and its content."""

    ran: bool
    box: list[list[int]] | None = None
    body: bytes = b""

    def response(self) -> Response:
        meta = {"ran_prediction": self.ran, "bbox": self.box, "dtype": "uint8",
                "shape": None if self.box is None else [ub - lb for lb, ub in self.box]}
        return Response(self.body, media_type="application/octet-stream",
                        headers={META_HEADER: json.dumps(meta, separators=(",", ":"))})


# --- payloads to prompts -------------------------------------------------------------------------

def default_axis(shape: tuple[int, ...], spacing: tuple[float, ...] | None) -> int:
    """The plane of a point before any other: a size-1 axis, else the largest spacing (first on ties)."""
    if 1 in shape:
        return shape.index(1)
    return 0 if spacing is None else int(np.argmax(spacing))


def plane_of(image: Image) -> int:
    """The plane of a point: the object's current plane, else the default one."""
    return image.planes[-1].axis if image.planes else default_axis(image.shape, image.spacing)


def choose_axis(candidates: list[int], image: Image) -> int:
    """Of the axes a drawn prompt may lie in: the current plane, else the default one, else the first."""
    for axis in (plane_of(image), default_axis(image.shape, image.spacing)):
        if axis in candidates:
            return axis
    return candidates[0]


def number_list(value, length: int, what: str) -> list[float]:
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(value, list) and len(value) == length and all(number(v) for v in value)):
        raise InputError(f"{what} must be a list of {length} numbers; got {value!r}.")
    return [float(v) for v in value]


def int_box(value, shape: tuple[int, int, int], what: str, clip: bool) -> list[list[int]]:
    """3 half-open ``[lb, ub)`` index ranges; clipped to the image, or checked to lie inside it."""
    if not (isinstance(value, list) and len(value) == 3):
        raise InputError(f"{what} must be 3 [lower, upper) ranges; got {value!r}.")
    box = []
    for axis, pair in enumerate(value):
        lb, ub = (round(v) for v in number_list(pair, 2, what))
        if clip:
            lb, ub = max(lb, 0), min(ub, shape[axis])
        elif lb < 0 or ub > shape[axis]:
            raise InputError(f"{what} {value} reaches outside the image of shape {list(shape)}.")
        if ub <= lb:
            raise InputError(f"{what} size is zero in at least one dimension: {value}.")
        box.append([lb, ub])
    return box


def point_prompt(payload: dict, image: Image) -> SlicePrompt:
    coordinates = number_list(payload.get("coordinates"), 3, "coordinates")
    axis = plane_of(image)
    others = [a for a in range(3) if a != axis]
    point = Point(coordinates[others[0]], coordinates[others[1]], bool(payload.get("include_interaction")))
    return SlicePrompt(axis=axis, index=int(round(coordinates[axis])), points=(point,))


def box_prompt(payload: dict, image: Image) -> SlicePrompt:
    if not payload.get("include_interaction"):
        raise PromptError("Exclude boxes are not supported here; use exclude clicks, an exclude lasso or scribble.")
    box = int_box(payload.get("bbox_coords"), image.shape, "bbox_coords", clip=True)
    flat = [axis for axis, (lb, ub) in enumerate(box) if ub - lb == 1]
    if not flat:
        raise PromptError("3D boxes are not supported (capabilities: bbox3d false); draw the box on one slice.")
    axis = choose_axis(flat, image)
    (r0, r1), (c0, c1) = (box[a] for a in range(3) if a != axis)
    return SlicePrompt(axis=axis, index=box[axis][0], box=Box(r0, c0, r1 - 1, c1 - 1))


def drawn_slice(mask: np.ndarray, where: list[list[int]] | None, image: Image) -> tuple[int, int, np.ndarray]:
    """(axis, index, full-slice boolean mask) of a lasso or scribble drawn on one slice.

    ``mask`` is the full volume (``where`` None) or the crop of the image at ``where``.
    """
    where = where or [[0, s] for s in image.shape]
    if mask.ndim != 3 or list(mask.shape) != [ub - lb for lb, ub in where]:
        raise InputError(f"The mask has shape {list(mask.shape)}; it must be the image's {list(image.shape)} "
                         f"or that of interaction_bbox {where}.")
    drawn = mask != 0
    hits = [np.flatnonzero(drawn.any(axis=tuple(o for o in range(3) if o != a))) for a in range(3)]
    if hits[0].size == 0:
        raise PromptError("The lasso or scribble is empty; draw it on a slice.")
    flat = [a for a in range(3) if hits[a].size == 1]
    if not flat:
        raise PromptError("The lasso or scribble spans several slices in every direction; draw it on one slice.")
    axis = choose_axis(flat, image)
    full = np.zeros(slice_shape(image.shape, axis), dtype=bool)
    (r0, r1), (c0, c1) = (where[a] for a in range(3) if a != axis)
    full[r0:r1, c0:c1] = np.take(drawn, hits[axis][0], axis=axis)
    return axis, where[axis][0] + int(hits[axis][0]), full


def scribble_points(drawn: np.ndarray, positive: bool) -> tuple[Point, ...]:
    """Up to :data:`SCRIBBLE_CLICKS` clicks spread along a stroke's pixels (row-major order)."""
    pixels = np.argwhere(drawn)
    picks = np.unique(np.linspace(0, len(pixels) - 1, min(SCRIBBLE_CLICKS, len(pixels))).round().astype(int))
    return tuple(Point(float(r), float(c), positive) for r, c in pixels[picks])


def image_volume(array: np.ndarray, meta: dict) -> tuple[Volume, tuple[float, float, float] | None]:
    """Our volume of a ``set_image`` body ``[1, d0, d1, d2]``; spacing (d0, d1, d2) from its properties."""
    if array.ndim != 4 or array.shape[0] != 1:
        raise InputError(f"The image must be [1, X, Y, Z] (one channel); got shape {list(array.shape)}.")
    properties = meta.get("image_properties") or {}
    if not isinstance(properties, dict):
        raise InputError("image_properties must be a JSON object.")
    spacing = None
    if properties.get("spacing") is not None:
        spacing = tuple(number_list(properties["spacing"], 3, "image_properties spacing"))
        if min(spacing) <= 0:
            raise InputError(f"image_properties spacing must be positive; got {list(spacing)}.")
    # array axes (d0, d1, d2) are our (k, j, i); the matrix takes (i, j, k), so its diagonal is reversed
    diagonal = (spacing or (1.0, 1.0, 1.0))[::-1]
    volume = Volume(array[0], np.diag([*diagonal, 1.0]), name="nnInteractive image", modality=guess_modality(array))
    return volume, spacing


def changed(target: np.ndarray, mask: np.ndarray) -> Answer:
    """Write ``mask`` into ``target``; the answer with the box of the voxels that changed."""
    difference = target != mask
    hits = [np.flatnonzero(difference.any(axis=tuple(o for o in range(3) if o != a))) for a in range(3)]
    if hits[0].size == 0:
        return Answer(True)
    box = [[int(h[0]), int(h[-1]) + 1] for h in hits]
    where = tuple(slice(lb, ub) for lb, ub in box)
    target[where] = mask[where]
    return Answer(True, box, encode_array(target[where]))


def takes_include_clicks_only(core: ServerCore) -> bool:
    """Whether the server's engine takes include clicks only (the volumetric engine, 3DSAM-adapter)."""
    return core.choice.engine == "volumetric"


def refuse_unless_clicks(core: ServerCore, what: str) -> None:
    """PromptError (400) for an interaction the server's engine cannot take, saying what to use instead."""
    if takes_include_clicks_only(core):
        raise PromptError(
            f"This server runs 3DSAM-adapter ({core.choice.spec.name}, the volumetric engine), which takes include "
            f"clicks only: {what} cannot be used. Click inside the object with positive points instead; each click "
            "reruns the 3D model with all of them."
        )


def propagate_within(session, index: int, deadline: float, worker) -> tuple[np.ndarray, bool]:
    """(3D mask, complete) of the object; past ``deadline`` only the slices done by then (worker thread).
    The volumetric engine's propagation is one 3D inference with no partial result: it runs to the end."""
    done: list[int] = []

    def progress(count: int, total: int, slice_index: int) -> None:
        if slice_index >= 0:
            done.append(slice_index)
        worker.run_waiting()  # other sessions' clicks go between this propagation's slices

    if session.engine_name == "volumetric":
        return session.propagate(OBJECT, PropagationOptions(), progress).mask, True
    try:
        return session.propagate(OBJECT, PropagationOptions(), progress, lambda: time.monotonic() > deadline).mask, True
    except PropagationCancelled:
        anchor = min(session.anchors(OBJECT), key=lambda a: abs(a - index))
        span = [*done, anchor]  # these slices' features are cached now: fast
        return session.propagate(OBJECT, PropagationOptions(slice_range=(min(span), max(span)))).mask, False


def error_response(exc: Exception) -> JSONResponse:
    """FastAPI's error shape ``{"detail": ...}``, which the client reads for 410 and 503."""
    headers = {}
    if isinstance(exc, Refused) and exc.status == 404:  # a core session freed after its idle timeout
        status = 410
    elif isinstance(exc, Refused):
        status = exc.status
        if status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
    elif isinstance(exc, LeaseGone):
        status = 410
    elif isinstance(exc, TooLarge):
        status = 413
    elif isinstance(exc, (InputError, PromptError)):
        status = 400
    elif isinstance(exc, SAM3DError):
        status = 500
    else:
        log.error("nnInteractive request failed", exc_info=exc)
        status, exc = 500, f"The server failed ({type(exc).__name__}: {exc}); see its log."
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


# --- the service ---------------------------------------------------------------------------------

class NNInteractiveService:
    """The leases of nnInteractive clients over one :class:`ServerCore`."""

    def __init__(self, core: ServerCore):
        self.core = core
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        core.sweep_hooks.append(self.sweep)

    # --- leases ----------------------------------------------------------------------------------

    def claim(self, owner: str) -> dict:
        now = time.monotonic()
        lease = Lease(secrets.token_hex(16), owner, now, now)
        self.core.hold_slot(lease.slot)
        with self._lock:
            self._leases[lease.token] = lease
        limits = self.core.limits
        return {"lease_token": lease.token, "idle_timeout_seconds": limits.idle_timeout_s,
                "liveness_timeout_seconds": limits.lease_s, "max_sessions": limits.max_sessions}

    def lease(self, request: Request, touch: bool = True, active: bool = False, busy: bool = False) -> Lease:
        """The request's lease (410 when missing, unknown, another token's or expired); refreshes its clocks."""
        token = request.headers.get(LEASE_HEADER)
        if not token:
            raise LeaseGone("lease token missing")
        now = time.monotonic()
        with self._lock:
            lease = self._leases.get(token)
            if lease is None or lease.owner != request.state.owner or (not lease.busy and self._expired(lease, now)):
                raise LeaseGone("lease expired or unknown")
            if touch:
                lease.last_seen = now
            if active:
                lease.last_active = now
            if busy:
                lease.busy += 1
        return lease

    @asynccontextmanager
    async def using(self, request: Request):
        """The lease, held for one action: one at a time, never reaped meanwhile, 410 once released."""
        lease = self.lease(request, active=True, busy=True)
        try:
            async with lease.lock:
                if lease.closed:
                    raise LeaseGone("lease expired or unknown")
                yield lease
                if lease.closed:  # released while this request ran: its answer is void
                    raise LeaseGone("lease released while the request ran")
        finally:
            with self._lock:
                lease.busy -= 1
                lease.last_seen = time.monotonic()

    def _expired(self, lease: Lease, now: float) -> bool:
        limits = self.core.limits
        return now - lease.last_seen > limits.lease_s or now - lease.last_active > limits.idle_timeout_s

    def remaining(self, lease: Lease) -> dict:
        idle = self.core.limits.idle_timeout_s
        left = max(0.0, idle - (time.monotonic() - lease.last_active))
        return {"remaining_seconds": left, "idle_timeout_seconds": idle}

    def release(self, request: Request) -> None:
        with self._lock:
            lease = self._leases.get(request.headers.get(LEASE_HEADER, ""))
            if lease is None or lease.owner != request.state.owner:
                return
            del self._leases[lease.token]
        self._close(lease, "the client released it")

    def sweep(self, now: float) -> None:
        """Free the leases whose client stopped beating (liveness) or acting (idle) (sweeper thread)."""
        with self._lock:
            gone = [lease for lease in self._leases.values() if not lease.busy and self._expired(lease, now)]
            for lease in gone:
                del self._leases[lease.token]
        for lease in gone:
            self._close(lease, "expired")

    def _close(self, lease: Lease, why: str) -> None:
        log.info("nnInteractive lease %s… freed: %s", lease.token[:8], why)
        lease.closed = True
        if lease.image is not None:
            for plane in lease.image.planes:
                self._close_plane(lease, plane)
        self.core.drop_slot(lease.slot)

    def _close_plane(self, lease: Lease, plane: Plane) -> None:
        try:
            self.core.close_session(lease.owner, plane.session_id)
        except Refused:
            pass  # freed already

    # --- image and target ------------------------------------------------------------------------

    async def set_image(self, lease: Lease, body: bytes, meta: dict) -> dict:
        def load() -> tuple[dict, Volume, tuple | None]:
            array = decode_array(body, self.core.limits.max_volume_bytes, "image")
            volume, spacing = image_volume(array, meta)
            return self.core.store_volume(lease.owner, volume), volume, spacing

        stored, volume, spacing = await asyncio.to_thread(load)
        if lease.image is not None:
            self.reset(lease.image, lease)
        lease.image = Image(stored["sha256"], volume.shape, spacing, np.zeros(volume.shape, dtype=np.uint8))
        return {"original_image_shape": [1, *volume.shape]}

    def reset(self, image: Image, lease: Lease) -> None:
        for plane in image.planes:
            self._close_plane(lease, plane)
        image.planes, image.steps, image.pending = [], [], False
        image.target[...] = 0

    @staticmethod
    def image_of(lease: Lease) -> Image:
        if lease.image is None:
            raise InputError("No image yet: call set_image first.")
        return lease.image

    def set_target_buffer(self, lease: Lease, payload: dict) -> None:
        image = self.image_of(lease)
        shape, dtype = payload.get("shape"), payload.get("dtype")
        if shape != list(image.shape):
            raise InputError(f"The target buffer's shape {shape!r} must be the image's {list(image.shape)}.")
        try:
            if np.dtype(dtype).kind not in "biu":
                raise TypeError
        except TypeError:
            raise InputError(f"The target buffer's dtype must be bool or an integer type; got {dtype!r}.") from None
        image.target[...] = 0

    # --- interactions ----------------------------------------------------------------------------

    async def _core(self, future) -> object:
        return await asyncio.wrap_future(future)

    async def _open_plane(self, lease: Lease, image: Image, axis: int, index: int, seed: np.ndarray) -> Plane:
        """A new current plane: a session along ``axis`` whose object is ``seed`` (each non-empty slice a
        fixed mask). The caller drops it with :meth:`_drop_plane` if what it opened it for fails."""
        info = await self._core(self.core.open_session(lease.owner, {"volume": image.volume_sha, "axis": axis},
                                                       slot=lease.slot))
        plane = Plane(axis, info["session_id"], index)
        if lease.closed:  # released while it opened
            self._close_plane(lease, plane)
            raise LeaseGone("lease released while the request ran")
        image.planes.append(plane)

        def fix_slices(session) -> None:
            for i in np.flatnonzero(seed.any(axis=tuple(a for a in range(3) if a != axis))):
                session.set_slice_mask(OBJECT, int(i), np.take(seed, i, axis=axis) != 0)

        try:
            await self._core(self.core.run(lease.owner, plane.session_id, fix_slices))
        except BaseException:
            self._drop_plane(lease, image, plane)
            raise
        return plane

    def _drop_plane(self, lease: Lease, image: Image, plane: Plane) -> None:
        if plane in image.planes:
            image.planes.remove(plane)
        self._close_plane(lease, plane)

    async def add(self, lease: Lease, prompt: SlicePrompt, replace: bool, run: bool, deadline: float) -> Answer:
        """Add ``prompt`` as one undoable step (in a new plane if it lies in another); predict when ``run``."""
        image = self.image_of(lease)
        before = await asyncio.to_thread(encode_array, image.target)
        current = image.planes[-1] if image.planes else None
        opened = current is None or current.axis != prompt.axis
        plane = (await self._open_plane(lease, image, prompt.axis, prompt.index, image.target)) if opened else current
        try:
            await self._core(self.core.call(lease.owner, plane.session_id, "add_prompt", OBJECT, prompt, replace))
        except BaseException:
            if opened:
                self._drop_plane(lease, image, plane)
            raise
        plane.last_index = prompt.index
        image.steps.append(Step(plane, opened, before, image.pending))
        image.pending = True
        self._trim(lease, image)
        return await self.predict(lease, deadline) if run else Answer(False)

    def _trim(self, lease: Lease, image: Image) -> None:
        """Keep :data:`UNDO_DEPTH` steps and :data:`MAX_PLANES` planes (closing the oldest)."""
        del image.steps[:-UNDO_DEPTH]
        while len(image.planes) > MAX_PLANES:
            oldest = image.planes.pop(0)
            self._close_plane(lease, oldest)
            image.steps = [s for s in image.steps if s.plane is not oldest]

    async def predict(self, lease: Lease, deadline: float, force: bool = False) -> Answer:
        image = self.image_of(lease)
        if not image.planes or not (image.pending or force):
            return Answer(False)
        plane = image.planes[-1]
        mask, complete = await self._core(self.core.run(
            lease.owner, plane.session_id,
            lambda session: propagate_within(session, plane.last_index, deadline, self.core.worker)))
        if lease.closed:
            raise LeaseGone("lease released while the request ran")
        image.pending = not complete
        return await asyncio.to_thread(changed, image.target, mask)

    async def undo(self, lease: Lease) -> Answer:
        image = self.image_of(lease)
        if not image.steps:
            return Answer(False)
        step = image.steps.pop()
        if step.opened_plane:
            self._drop_plane(lease, image, step.plane)
        else:
            await self._core(self.core.call(lease.owner, step.plane.session_id, "undo", OBJECT))
        image.pending = step.pending_before
        before = await asyncio.to_thread(decode_array, step.before, image.target.nbytes)
        return await asyncio.to_thread(changed, image.target, before)

    async def initial_seg(self, lease: Lease, seg: np.ndarray, run: bool, deadline: float) -> Answer:
        """Start the object again from ``seg``: each of its slices along the plane a fixed mask."""
        image = self.image_of(lease)
        if list(seg.shape) != list(image.shape):
            raise InputError(f"The initial segmentation has shape {list(seg.shape)}; the image is {list(image.shape)}.")
        axis = plane_of(image)
        self.reset(image, lease)
        image.target[...] = seg != 0
        if not image.target.any():
            return Answer(False)
        index = int(np.flatnonzero(image.target.any(axis=tuple(a for a in range(3) if a != axis)))[0])
        await self._open_plane(lease, image, axis, index, image.target)
        return await self.predict(lease, deadline, force=True) if run else Answer(False)


# --- HTTP ----------------------------------------------------------------------------------------

async def binary_body(request: Request, core: ServerCore) -> tuple[bytes, dict]:
    """(NNIA body, X-Meta JSON) of a binary request."""
    meta = protocol.parse_json(request.headers.get(META_HEADER, "{}").encode(), "X-Meta header")
    return await read_body(request, upload_limit(core), "array upload"), meta


def flag(payload: dict, name: str, default: bool) -> bool:
    value = payload.get(name, default)
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false; got {value!r}.")
    return value


def capabilities(core: ServerCore) -> dict:
    """What this server does, in the keys the client reads (and ours: engine, model, adapter, undo depth)."""
    spec = core.choice.spec
    drawn = not takes_include_clicks_only(core)  # the volumetric engine: positive points only
    return {
        "supported_interactions": {"points": True, "bbox2d": drawn, "bbox3d": False, "lasso": drawn, "scribble": drawn},
        "channel_mapping": {},  # our models take prompts, not interaction channels
        "num_interaction_channels": 0,
        "supports_initial_label": drawn,
        "supports_zero_shot_label_refinement": False,
        "preferred_scribble_thickness": [1, 1, 1],
        "interaction_decay": None,
        "inference_session_version": f"SAM3DSegment {__version__}",
        "license": spec.licence if spec is not None else "no weights (weight-free engine)",
        "supports_undo": True,
        "do_autozoom": False,
        "patch_size": None,
        "engine": core.choice.engine,
        "model": None if spec is None else spec.name,
        "adapter": core.adapter,
        "undo_depth": UNDO_DEPTH,
    }


def create_router(core: ServerCore) -> APIRouter:
    """The routes of the protocol (mount them under :data:`PREFIX`); the app checks the token first."""
    service = NNInteractiveService(core)
    router = APIRouter()

    def route(method: str, path: str):
        def register(handler):
            async def endpoint(request: Request) -> Response:
                try:
                    answer = await handler(request)
                except Exception as exc:
                    return error_response(exc)
                return answer.response() if isinstance(answer, Answer) else JSONResponse(answer)

            router.add_api_route(path, endpoint, methods=[method], name=handler.__name__, response_model=None)
            return handler
        return register

    def deadline() -> float:
        return time.monotonic() + core.limits.prediction_budget_s

    @route("GET", "/healthz")
    async def healthz(request: Request):
        return {"ok": True}

    @route("GET", "/capabilities")
    async def get_capabilities(request: Request):
        return capabilities(core)

    @route("POST", "/claim")
    async def claim(request: Request):
        return service.claim(request.state.owner)

    @route("POST", "/release")
    async def release(request: Request):
        service.release(request)
        return {"released": True}

    @route("POST", "/heartbeat")
    async def heartbeat(request: Request):
        return {"remaining_seconds": service.remaining(service.lease(request))["remaining_seconds"]}

    @route("GET", "/lease_status")
    async def lease_status(request: Request):
        return service.remaining(service.lease(request, touch=False))

    @route("POST", "/set_image")
    async def set_image(request: Request):
        async with service.using(request) as lease:
            body, meta = await binary_body(request, core)
            return await service.set_image(lease, body, meta)

    @route("POST", "/set_target_buffer")
    async def set_target_buffer(request: Request):
        async with service.using(request) as lease:
            service.set_target_buffer(lease, await read_json(request))
            return {}

    @route("POST", "/set_do_autozoom")
    async def set_do_autozoom(request: Request):
        async with service.using(request) as lease:
            lease.do_autozoom = flag(await read_json(request), "do_autozoom", True)  # kept, not used: no zoom here
            return {}

    @route("POST", "/reset_interactions")
    async def reset_interactions(request: Request):
        async with service.using(request) as lease:
            service.reset(service.image_of(lease), lease)
            return {}

    @route("POST", "/add_point_interaction")
    async def add_point(request: Request):
        until = deadline()
        async with service.using(request) as lease:
            payload = await read_json(request)
            if not payload.get("include_interaction"):
                refuse_unless_clicks(core, "a negative (exclude) point")
            prompt = point_prompt(payload, service.image_of(lease))
            return await service.add(lease, prompt, False, flag(payload, "run_prediction", True), until)

    @route("POST", "/add_bbox_interaction")
    async def add_bbox(request: Request):
        until = deadline()
        async with service.using(request) as lease:
            refuse_unless_clicks(core, "a box")
            payload = await read_json(request)
            prompt = box_prompt(payload, service.image_of(lease))
            return await service.add(lease, prompt, False, flag(payload, "run_prediction", True), until)

    async def drawn(request: Request, lasso: bool):
        until = deadline()
        async with service.using(request) as lease:
            refuse_unless_clicks(core, "a lasso" if lasso else "a scribble")
            body, meta = await binary_body(request, core)
            image = service.image_of(lease)
            mask = await asyncio.to_thread(decode_array, body, image.target.nbytes * 8, "mask")
            where = meta.get("interaction_bbox")
            axis, index, region = drawn_slice(mask, None if where is None else
                                              int_box(where, image.shape, "interaction_bbox", clip=False), image)
            include = flag(meta, "include_interaction", True)
            if lasso:  # the slice as the client shows it, with the region added or taken away
                shown = np.take(image.target, index, axis=axis) != 0
                region = shown | region if include else shown & ~region
                if not region.any():
                    raise PromptError(f"The exclude lasso leaves nothing on slice {index}; undo, or reset the object.")
                prompt = SlicePrompt(axis=axis, index=index, mask=region)
            else:
                prompt = SlicePrompt(axis=axis, index=index, points=scribble_points(region, include))
            return await service.add(lease, prompt, lasso, flag(meta, "run_prediction", True), until)

    @route("POST", "/add_lasso_interaction")
    async def add_lasso(request: Request):
        return await drawn(request, lasso=True)

    @route("POST", "/add_scribble_interaction")
    async def add_scribble(request: Request):
        return await drawn(request, lasso=False)

    @route("POST", "/add_initial_seg_interaction")
    async def add_initial_seg(request: Request):
        until = deadline()
        async with service.using(request) as lease:
            refuse_unless_clicks(core, "an initial segmentation")
            body, meta = await binary_body(request, core)
            limit = service.image_of(lease).target.nbytes * 8
            seg = await asyncio.to_thread(decode_array, body, limit, "initial segmentation")
            return await service.initial_seg(lease, seg, flag(meta, "run_prediction", False), until)

    @route("POST", "/undo")
    async def undo(request: Request):
        async with service.using(request) as lease:
            return await service.undo(lease)

    @route("POST", "/predict")
    async def predict(request: Request):
        until = deadline()
        async with service.using(request) as lease:
            force = flag(await read_json(request), "force_full_refine", False)
            return await service.predict(lease, until, force=force)

    return router
