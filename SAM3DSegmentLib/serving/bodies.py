"""Request bodies read up to a limit, for both protocols' routes."""

from __future__ import annotations

from fastapi import Request

from . import protocol
from .protocol import TooLarge
from .store import MB, ServerCore


def upload_limit(core: ServerCore) -> int:
    """Largest upload body: the voxel limit, plus compression's worst-case growth and a header."""
    return int(core.limits.max_volume_bytes * 1.01) + 64 * 1024


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, or :class:`TooLarge` as soon as it passes ``limit`` bytes."""
    too_large = TooLarge(f"The {what} is larger than {limit / MB:.1f} MB, the most this server accepts.")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict:
    """A JSON request body (at most ``protocol.MAX_JSON_BYTES``); ``{}`` when empty."""
    body = await read_body(request, protocol.MAX_JSON_BYTES, "request body")
    return protocol.parse_json(body) if body else {}
