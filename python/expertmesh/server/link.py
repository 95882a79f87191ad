"""Frames between the frontend and the engine process: a 4-byte big-endian length, then one
msgpack map. Every map has a "type" key; the kinds are listed in engine_process.py.

A length prefix (rather than msgpack's own streaming unpacker) lets each side read a whole
frame before decoding it, and puts a hard cap on what a broken peer can make us buffer.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

MAX_FRAME_BYTES = 64 << 20  # far above any real frame (a 64-way batch of deltas is a few KB)
_HEADER = struct.Struct(">I")


class LinkClosed(ConnectionError):
    """The peer closed the socket (or sent something that is not a frame)."""


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _HEADER.pack(len(body)) + body


def _decode(body: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    if not isinstance(message, dict) or "type" not in message:
        raise LinkClosed(f"malformed frame: {type(message).__name__}")
    return message


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next frame from an asyncio stream (the frontend side)."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (length,) = _HEADER.unpack(header)
        if length > MAX_FRAME_BYTES:
            raise LinkClosed(f"frame length {length} exceeds {MAX_FRAME_BYTES}")
        return _decode(await reader.readexactly(length))
    except asyncio.IncompleteReadError as exc:
        raise LinkClosed("engine link closed") from exc


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise LinkClosed("frontend link closed")
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """The next frame from a blocking socket (the engine side, on its reader thread)."""
    (length,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if length > MAX_FRAME_BYTES:
        raise LinkClosed(f"frame length {length} exceeds {MAX_FRAME_BYTES}")
    return _decode(_recv_exactly(sock, length))
