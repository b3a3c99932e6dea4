"""nnInteractive's binary array format ("NNIA", client 2.6.0), read and written with blosc2.

Layout (little-endian): ``b"NNIA"``, version ``1`` (uint8), codec id (uint8: 1 = ZSTD, 2 = LZ4),
ndim (uint8), length of the dtype name (uint8), the numpy dtype name in ASCII ("uint8",
"float32", ...), the shape as ndim int64, the number of chunks (uint32), then per chunk its
uncompressed and compressed sizes (two uint64) and one blosc2 chunk. The data is the C-order
little-endian byte image of the array, cut into pieces of at most 1 GiB (blosc2's limit per
call). Bad input raises :class:`InputError`; an array larger than allowed :class:`TooLarge`.
blosc2 is imported on first use, so a server without it still serves everything else.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from ..errors import DependencyError, InputError
from .protocol import TooLarge

MAGIC = b"NNIA"
VERSION = 1
CODECS = {1: "ZSTD", 2: "LZ4"}
PIECE_BYTES = 1 << 30
HEADER = struct.Struct("<4sBBBB")


def _blosc2():
    try:
        import blosc2
    except ImportError:
        raise DependencyError("nnInteractive clients need blosc2 on the server: pip install blosc2") from None
    return blosc2


def encode_array(array: np.ndarray, codec_id: int = 1, clevel: int = 3) -> bytes:
    """``array`` in the NNIA format (blosc2, no filter: what masks compress best with)."""
    blosc2 = _blosc2()
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    if array.size == 0:
        raise InputError("An empty array cannot be sent in the NNIA format.")
    name = array.dtype.name.encode("ascii")
    raw = memoryview(array.reshape(-1).view(np.uint8))
    parts = [HEADER.pack(MAGIC, VERSION, codec_id, array.ndim, len(name)), name,
             struct.pack(f"<{array.ndim}q", *array.shape)]
    pieces = [raw[start:start + PIECE_BYTES] for start in range(0, len(raw), PIECE_BYTES)]
    parts.append(struct.pack("<I", len(pieces)))
    codec = getattr(blosc2.Codec, CODECS[codec_id])
    for piece in pieces:
        chunk = blosc2.compress2(piece, typesize=array.dtype.itemsize, codec=codec, clevel=clevel,
                                 filters=[blosc2.Filter.NOFILTER])
        parts += [struct.pack("<QQ", len(piece), len(chunk)), chunk]
    return b"".join(parts)


def decode_array(body: bytes, max_bytes: int, what: str = "array") -> np.ndarray:
    """The array in an NNIA ``body``; arrays over ``max_bytes`` raise :class:`TooLarge` before decompressing."""
    blosc2 = _blosc2()
    body = memoryview(body)
    try:
        magic, version, codec_id, ndim, name_length = HEADER.unpack_from(body, 0)
        offset = HEADER.size
        name = bytes(body[offset:offset + name_length]).decode("ascii")
        offset += name_length
        shape = struct.unpack_from(f"<{ndim}q", body, offset)
        offset += 8 * ndim
        (count,) = struct.unpack_from("<I", body, offset)
        offset += 4
    except (struct.error, UnicodeDecodeError):
        raise InputError(f"The {what} is not an nnInteractive (NNIA) array: its header is cut short.") from None
    if magic != MAGIC or version != VERSION or codec_id not in CODECS:
        raise InputError(f"The {what} is not an NNIA version 1 array with ZSTD or LZ4 chunks.")
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise InputError(f"The {what} has an unknown dtype {name!r}.") from None
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"The {what} must hold real numbers; its dtype is {name}.")
    if any(s <= 0 for s in shape):
        raise InputError(f"The {what} has shape {list(shape)}; every axis needs at least one element.")
    total = math.prod(shape) * dtype.itemsize
    if total > max_bytes:
        raise TooLarge(f"The {what} holds {total / 1024**2:.1f} MB; this server accepts at most "
                       f"{max_bytes / 1024**2:.1f} MB (sam3d serve --max-volume-mb).")
    out = np.empty(total, dtype=np.uint8)
    filled = 0
    for _ in range(count):
        try:
            plain, packed = struct.unpack_from("<QQ", body, offset)
        except struct.error:
            raise InputError(f"The {what} ends before its chunks do.") from None
        offset += 16
        chunk = body[offset:offset + packed]
        offset += packed
        if len(chunk) != packed or filled + plain > total or plain % dtype.itemsize:
            raise InputError(f"The {what}'s chunk sizes do not match its shape and dtype.")
        try:
            if blosc2.get_cbuffer_sizes(chunk)[0] != plain:
                raise ValueError("size")
            blosc2.decompress2(chunk, dst=out[filled:filled + plain])
        except (ValueError, RuntimeError):
            raise InputError(f"The {what} holds a chunk that is not valid blosc2 data.") from None
        filled += plain
    if filled != total or offset != len(body):
        raise InputError(f"The {what}'s chunks hold {filled} bytes, not the {total} its shape needs.")
    return out.view(dtype).reshape(shape)
