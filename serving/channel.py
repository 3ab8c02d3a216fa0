"""The framing between a node's front process and its model workers. Pure: no asyncio, no sockets.

A frame is `[u32 header length][u32 payload length][msgpack header][payload]`, little endian.
The header is a msgpack array `[op, id, key, meta, tensors]`; each tensor is
`[name, dtype, shape, nbytes]` and its raw buffer is in the payload, in order (a C-contiguous
copy only when the array is not one already). Object arrays (BYTES tensors) travel as a msgpack
list in the header instead (`dtype` "O", `nbytes` the list).

Why this shape: a prediction of a small model is ~100 µs; pickle or JSON of its arrays would be
a large share of that, while one msgpack header plus `np.frombuffer` views costs a few µs and
does not copy the tensors on the receiving side.

Ops, front → worker: `load` (meta: loader spec, payload: the package bytes), `predict`,
`unload`, `ping`. Worker → front: `ok` (tensors: the outputs) or `err` (meta: [kind, reason],
kind `invalid` for the request's own fault, `predict` for the model's).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np

PREFIX = struct.Struct("<II")
MAX_HEADER = 64 * 1024 * 1024

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()

Arrays = dict[str, np.ndarray]


class FrameError(Exception):
    """A frame that cannot be read: the peer is broken (or hostile); the channel is closed."""


def encode(op: str, ident: int, key: str = "", meta: Any = None, arrays: Mapping[str, Any] | None = None,
           payload: bytes | None = None) -> list[bytes | memoryview]:
    """The pieces of one frame (write them in order; joined or scatter-gathered)."""
    tensors: list[list[Any]] = []
    bufs: list[bytes | memoryview] = []
    size = 0
    if arrays:
        for name, a in arrays.items():
            arr = a if isinstance(a, np.ndarray) else np.asarray(a)
            if arr.dtype.hasobject:
                tensors.append([name, "O", list(arr.shape), _plain(arr.tolist())])
                continue
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr)
            buf = memoryview(arr).cast("B") if arr.size else memoryview(b"")
            tensors.append([name, arr.dtype.str, list(arr.shape), buf.nbytes])
            bufs.append(buf)
            size += buf.nbytes
    if payload is not None:
        bufs.append(payload)
        size += len(payload)
    header = _enc.encode([op, ident, key, meta, tensors])
    return [PREFIX.pack(len(header), size), header, *bufs]


def _plain(value: Any) -> Any:
    """Object arrays hold bytes or str: msgpack carries both."""
    return value


def decode(header: bytes | memoryview, payload: memoryview) -> tuple[str, int, str, Any, Arrays, memoryview]:
    """(op, id, key, meta, arrays, rest of the payload after the tensors)."""
    try:
        op, ident, key, meta, tensors = _dec.decode(header)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise FrameError(f"unreadable frame header: {exc}") from None
    arrays: Arrays = {}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        if dtype == "O":
            arrays[name] = np.array(nbytes, dtype=object).reshape(shape)
            continue
        dt = np.dtype(dtype)
        if dt.hasobject or offset + nbytes > len(payload):
            raise FrameError(f"tensor {name!r} does not fit its frame")
        count = nbytes // dt.itemsize if dt.itemsize else 0
        arrays[name] = np.frombuffer(payload, dtype=dt, count=count, offset=offset).reshape(shape)
        offset += nbytes
    return op, ident, key, meta, arrays, payload[offset:]


class FrameReader:
    """Accumulates bytes; yields whole frames. Used by the front's protocol (data_received)."""

    __slots__ = ("_buf", "_need")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = 0

    def feed(self, data: bytes) -> list[tuple[memoryview, memoryview]]:
        buf = self._buf
        buf += data
        out = []
        start = 0
        n = len(buf)
        while n - start >= 8:
            hlen, plen = PREFIX.unpack_from(buf, start)
            if hlen > MAX_HEADER:
                raise FrameError(f"frame header of {hlen} bytes")
            end = start + 8 + hlen + plen
            if end > n:
                break
            # One copy of the frame: the views stay valid after the buffer is reused.
            frame = memoryview(bytes(buf[start + 8:end]))
            out.append((frame[:hlen], frame[hlen:]))
            start = end
        if start:
            del buf[:start]
        return out
