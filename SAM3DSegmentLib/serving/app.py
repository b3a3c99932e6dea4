"""The HTTP routes of ``sam3d serve``: a thin FastAPI layer over :class:`~.store.ServerCore`.

Every request needs ``Authorization: Bearer <token>`` (401 otherwise); the token decides the
owner, so one token's volumes and sessions are "not found" (404) for another. Bodies are read
up to a limit (413, with the limit in the message); malformed input gives 400 with the
library's own message. Errors are JSON ``{"error": <exception class>, "message": <text>}``.
Routes are listed in docs/server.md. nnInteractive's remote protocol is mounted under
``/nninteractive`` (:mod:`.nninteractive`, with its own error shape; docs/nninteractive.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, PromptError, PropagationCancelled, SAM3DError
from . import protocol
from .bodies import read_body, read_json, upload_limit
from .nninteractive import PREFIX as NNINTERACTIVE_PREFIX
from .nninteractive import create_router as nninteractive_router
from .protocol import TooLarge
from .store import Refused, ServerCore

log = logging.getLogger(__name__)

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def owner_of(token: str) -> str:
    """The owner id of a token (the store never sees the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, Refused):
        status, name = exc.status, "ServerError"
    elif isinstance(exc, TooLarge):
        status, name = 413, "InputError"
    elif isinstance(exc, (InputError, PromptError)):
        status, name = 400, type(exc).__name__
    elif isinstance(exc, PropagationCancelled):
        status, name = 409, type(exc).__name__
    elif isinstance(exc, SAM3DError):
        status, name = 500, type(exc).__name__
    else:
        status, name = 500, "ServerError"
        exc = f"The server failed ({type(exc).__name__}: {exc}); see its log."
    return JSONResponse({"error": name, "message": str(exc)}, status_code=status)


def as_int(text: str, what: str) -> int:
    if not re.fullmatch(r"-?\d{1,12}", text):
        raise InputError(f"The {what} in the address must be an integer; got {text!r}.")
    return int(text)


async def status_response(status: protocol.JobStatus, code: int = 200) -> JSONResponse:
    body = status.to_json() if status.result is None else await asyncio.to_thread(status.to_json)
    return JSONResponse(body, status_code=code)


def create_app(core: ServerCore, tokens: list[str]) -> FastAPI:
    """The FastAPI application serving ``core`` to clients holding one of ``tokens``."""
    if not tokens or any(len(t) < 16 for t in tokens):
        raise InputError("The server needs at least one token of 16 or more characters.")
    owners = [(t.encode(), owner_of(t)) for t in tokens]
    app = FastAPI(title="sam3d serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.core = core
    app.include_router(nninteractive_router(core), prefix=NNINTERACTIVE_PREFIX)  # docs/nninteractive.md

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        owner = None
        for token, candidate in owners:  # compare with every token, in constant time
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token):
                owner = candidate
        if owner is None:
            message = "Missing or wrong token: send 'Authorization: Bearer <token>' with the server's token."
            return JSONResponse({"error": "ServerError", "message": message}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        request.state.owner = owner
        return await call_next(request)

    @app.exception_handler(SAM3DError)
    async def on_library_error(request: Request, exc: SAM3DError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def on_failure(request: Request, exc: Exception):  # a bug: logged with its traceback
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": "ServerError", "message": f"{exc.detail}: {request.method} {request.url.path}"},
                            status_code=exc.status_code)

    def session_call(request: Request, sid: str, action: str, oid: str, *args):
        return asyncio.wrap_future(core.call(request.state.owner, sid, action, as_int(oid, "object id"), *args))

    @app.get("/v1/info")
    async def info(request: Request):
        return JSONResponse(core.info(request.state.owner))

    @app.get("/v1/volumes/{sha}")
    async def has_volume(request: Request, sha: str):
        return JSONResponse(core.volume_info(request.state.owner, sha))

    @app.put("/v1/volumes/{sha}")
    async def put_volume(request: Request, sha: str):
        if not SHA256.match(sha):
            raise InputError("A volume's address is its sha256: 64 lower-case hexadecimal digits.")
        body = await read_body(request, upload_limit(core), "volume upload")
        return JSONResponse(await asyncio.to_thread(core.put_volume, request.state.owner, sha, body), status_code=201)

    @app.post("/v1/sessions")
    async def open_session(request: Request):
        future = core.open_session(request.state.owner, await read_json(request))
        return JSONResponse(await asyncio.wrap_future(future), status_code=201)

    @app.get("/v1/sessions/{sid}")
    async def session_info(request: Request, sid: str):
        return JSONResponse(core.session_info(request.state.owner, sid))

    @app.delete("/v1/sessions/{sid}")
    async def close_session(request: Request, sid: str):
        core.close_session(request.state.owner, sid)
        return JSONResponse({"closed": sid})

    @app.post("/v1/sessions/{sid}/objects/{oid}/prompts")
    async def add_prompt(request: Request, sid: str, oid: str):
        body = await read_json(request)
        prompt = protocol.prompt_from_json(body.get("prompt"))
        return JSONResponse(await session_call(request, sid, "add_prompt", oid, prompt, bool(body.get("replace"))))

    @app.put("/v1/sessions/{sid}/objects/{oid}/slices/{index}")
    async def set_slice_mask(request: Request, sid: str, oid: str, index: str):
        index_number = as_int(index, "slice")
        mask = protocol.mask_from_json((await read_json(request)).get("mask"), "slice mask")
        return JSONResponse(await session_call(request, sid, "set_slice_mask", oid, index_number, mask))

    @app.delete("/v1/sessions/{sid}/objects/{oid}/anchors/{index}")
    async def remove_anchor(request: Request, sid: str, oid: str, index: str):
        return JSONResponse(await session_call(request, sid, "remove_anchor", oid, as_int(index, "slice")))

    @app.delete("/v1/sessions/{sid}/objects/{oid}")
    async def remove_object(request: Request, sid: str, oid: str):
        return JSONResponse(await session_call(request, sid, "remove_object", oid))

    @app.post("/v1/sessions/{sid}/objects/{oid}/undo")
    async def undo(request: Request, sid: str, oid: str):
        return JSONResponse(await session_call(request, sid, "undo", oid))

    @app.get("/v1/sessions/{sid}/objects/{oid}/mask")
    async def mask(request: Request, sid: str, oid: str):
        return JSONResponse(await session_call(request, sid, "mask", oid))

    @app.get("/v1/sessions/{sid}/objects/{oid}/anchors")
    async def anchors(request: Request, sid: str, oid: str):
        return JSONResponse(await session_call(request, sid, "anchors", oid))

    @app.get("/v1/sessions/{sid}/objects/{oid}/anchors/{index}")
    async def anchor_result(request: Request, sid: str, oid: str, index: str):
        return JSONResponse(await session_call(request, sid, "anchor_result", oid, as_int(index, "slice")))

    @app.post("/v1/sessions/{sid}/objects/{oid}/propagate")
    async def propagate(request: Request, sid: str, oid: str):
        options = protocol.options_from_json((await read_json(request)).get("options"))
        status = core.start_propagation(request.state.owner, sid, as_int(oid, "object id"), options)
        return await status_response(status, 202)

    @app.get("/v1/sessions/{sid}/jobs/{job}")
    async def job_status(request: Request, sid: str, job: str):
        return await status_response(core.job_status(request.state.owner, sid, job))

    @app.post("/v1/sessions/{sid}/jobs/{job}/cancel")
    async def cancel_job(request: Request, sid: str, job: str):
        return await status_response(core.cancel_job(request.state.owner, sid, job))

    return app
