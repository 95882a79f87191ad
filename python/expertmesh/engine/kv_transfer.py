"""Prefix KV blocks moved from a prefill engine to a decode engine (disaggregated serving).

Prefill side, `KvExporter`: when a request marked for remote decode finishes, `export()` pins
its prompt's cached full blocks in the scheduler under a fresh, unguessable transfer id (no
allocation can evict them meanwhile) and returns the `kv_transfer_params` the decode side needs.
A server thread answers pulls: it reads the asked blocks in place from the cache tensors --
pinned, so nothing writes them -- and sends them in the cache's layout. The end of a pull, or
`pin_timeout_s` without one, releases the pins on the engine's thread (the scheduler is not
shared between threads): the blocks stay cached like any finished request's.

Decode side, `KvImporter`: `missing()` counts the leading blocks this engine's prefix cache
already holds, so only the others travel; `fetch()` pulls them (any thread: it only does I/O);
`install()` registers them in the prefix cache, writes their KV and unpins, so the request added
next finds them as prefix hits and computes only the rest (at least its last token, whose
logits it samples from). A transfer that fails leaves the request to compute its prompt
itself: slower, never wrong.

Wire, one pull per TCP connection: the puller sends a frame {"transfer_id", "first", "count"};
the exporter answers a frame {"ok", "error"?, "shape", "dtype"} then the raw bytes of a
[L, 2, n, B, NKV, D] tensor (layers; K and V; blocks). A frame is a 4-byte big-endian length
and msgpack.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import torch

logger = logging.getLogger(__name__)
_LEN = struct.Struct(">I")
_MAX_FRAME = 1 << 16


class KvTransferError(Exception):
    """A pull failed: the exporter is unreachable, refused it, or the layouts differ."""


@dataclass(frozen=True)
class KvLayout:
    """What must match for blocks to move between two caches."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "bfloat16"

    @classmethod
    def of(cls, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> KvLayout:
        _, b, nkv, d = kv_caches[0][0].shape  # [NB, B, NKV, D]
        return cls(len(kv_caches), b, nkv, d, str(kv_caches[0][0].dtype).removeprefix("torch."))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_ids: list[int]) -> torch.Tensor:
    """[L, 2, n, B, NKV, D] copy of the given blocks of every layer."""
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0][0].device)
    return torch.stack([torch.stack((k.index_select(0, index), v.index_select(0, index))) for k, v in kv_caches])


def write_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_ids: list[int],
                 data: torch.Tensor) -> None:
    """Writes [L, 2, n, B, NKV, D] `data` into the given blocks of every layer."""
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0][0].device)
    for (k, v), layer in zip(kv_caches, data.to(kv_caches[0][0].device)):
        k.index_copy_(0, index, layer[0])
        v.index_copy_(0, index, layer[1])


def _send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    body = msgpack.packb(message)
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise KvTransferError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def _recv_frame(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_FRAME:
        raise KvTransferError(f"frame of {n} bytes is over the {_MAX_FRAME}-byte limit")
    message = msgpack.unpackb(bytes(_recv_exact(sock, n)))
    if not isinstance(message, dict):
        raise KvTransferError(f"a frame must be a map, got {type(message).__name__}")
    return message


class KvExporter:
    """The prefill side: pins finished prompts' blocks and serves pulls of them."""

    def __init__(self, scheduler: Any, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], notify: Callable[[], None],
                 host: str = "127.0.0.1", port: int = 0, pin_timeout_s: float = 60.0) -> None:
        self.scheduler, self.kv_caches, self.notify = scheduler, kv_caches, notify
        self.layout = KvLayout.of(kv_caches)
        self.pin_timeout_s = pin_timeout_s
        self._pins: dict[int, tuple[list[int], float]] = {}  # transfer id -> (block ids, deadline)
        self._released: queue.SimpleQueue[int] = queue.SimpleQueue()  # pulled: unpin on the engine thread
        self._lock = threading.Lock()
        self._reading: set[int] = set()  # transfers a pull is copying right now
        self.stats = {"exports": 0, "pulls": 0, "pull_failures": 0, "bytes": 0, "blocks": 0, "expired": 0}
        self._listener = socket.create_server((host, port))
        self.host, self.port = host, self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="kv-exporter", daemon=True)
        self._thread.start()

    def export(self, prompt_ids: list[int]) -> dict[str, Any]:
        """Pin a finished prompt's cached blocks; the kv_transfer_params a decode engine pulls with."""
        transfer_id = secrets.randbits(63)
        blocks = self.scheduler.pin_prefix(transfer_id, prompt_ids)
        with self._lock:
            self._pins[transfer_id] = (blocks, time.monotonic() + self.pin_timeout_s)
        self.stats["exports"] += 1
        return {"do_remote_prefill": True, "transfer_id": transfer_id, "remote_host": self.host,
                "remote_port": self.port, "num_blocks": len(blocks), "layout": self.layout.as_dict()}

    def release_finished(self) -> int:
        """On the engine thread: unpin what was pulled and what waited past its timeout; returns
        how many transfers were released."""
        released, later = 0, []
        while True:
            try:
                transfer_id = self._released.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                if transfer_id in self._reading:  # another pull of it is copying: not yet
                    later.append(transfer_id)
                    continue
                pinned = self._pins.pop(transfer_id, None)
            if pinned is not None:
                self.scheduler.unpin(transfer_id)
                released += 1
        for transfer_id in later:
            self._released.put(transfer_id)
        now = time.monotonic()
        with self._lock:
            expired = [t for t, (_, deadline) in self._pins.items() if deadline < now and t not in self._reading]
            for transfer_id in expired:
                del self._pins[transfer_id]
        for transfer_id in expired:
            logger.warning("KV transfer %d was not pulled within %.0f s; releasing its blocks", transfer_id,
                           self.pin_timeout_s)
            self.scheduler.unpin(transfer_id)
            self.stats["expired"] += 1
        return released + len(expired)

    @property
    def num_pinned(self) -> int:
        return len(self._pins)

    def close(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), name="kv-pull", daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        transfer_id = None
        with conn:
            try:
                ask = _recv_frame(conn)
                transfer_id, first, count = int(ask["transfer_id"]), int(ask["first"]), int(ask["count"])
                with self._lock:  # claimed: the timeout cannot release these pins while we read
                    pinned = self._pins.get(transfer_id)
                    if pinned is not None:
                        self._reading.add(transfer_id)
                if pinned is None:
                    _send_frame(conn, {"ok": False, "error": f"no pinned KV under transfer_id {transfer_id} "
                                                              "(never exported, already pulled, or expired)"})
                    return
                try:
                    blocks = pinned[0]
                    if not (0 <= first and 0 <= count and first + count <= len(blocks)):
                        _send_frame(conn, {"ok": False, "error": f"blocks [{first}, {first + count}) are outside "
                                                                  f"the {len(blocks)} exported"})
                        return
                    data = read_blocks(self.kv_caches, blocks[first:first + count])  # a copy
                finally:
                    with self._lock:
                        self._reading.discard(transfer_id)
                _send_frame(conn, {"ok": True, "shape": list(data.shape), "dtype": self.layout.dtype})
                if data.numel():
                    conn.sendall(data.view(torch.uint8).numpy())
                if _recv_exact(conn, 1) != b"\x01":
                    raise KvTransferError("the puller sent no receipt")
            except (OSError, KvTransferError, KeyError, ValueError, TypeError) as exc:
                self.stats["pull_failures"] += 1
                logger.warning("a KV pull failed: %s", exc)
                return  # the pins stay until their timeout: the puller may ask again
        self.stats["pulls"] += 1
        self.stats["bytes"] += data.numel() * data.element_size()
        self.stats["blocks"] += count
        self._released.put(transfer_id)  # received: now the pins may go
        self.notify()


class KvImporter:
    """The decode side: pulls the prompt blocks its cache lacks and installs them."""

    def __init__(self, scheduler: Any, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0) -> None:
        self.scheduler, self.kv_caches = scheduler, kv_caches
        self.layout = KvLayout.of(kv_caches)
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.stats = {"imports": 0, "failures": 0, "bytes": 0, "blocks": 0, "blocks_already_cached": 0,
                      "seconds": 0.0}

    def missing(self, prompt_ids: list[int], params: dict[str, Any]) -> tuple[int, int]:
        """(first, count): the exported blocks this cache lacks. Engine thread."""
        have = len(self.scheduler.cached_prefix_blocks(prompt_ids))
        exported = int(params.get("num_blocks", 0))
        self.stats["blocks_already_cached"] += min(have, exported)
        return have, max(0, exported - have)

    def fetch(self, params: dict[str, Any], first: int, count: int) -> torch.Tensor:
        """Pull exported blocks [first, first + count): [L, 2, n, B, NKV, D]. Any thread."""
        theirs = KvLayout(**params["layout"])
        if theirs != self.layout:
            raise KvTransferError(f"KV layouts differ: the prefill side's is {theirs}, this one's is {self.layout}")
        t0 = time.perf_counter()
        with socket.create_connection((params["remote_host"], int(params["remote_port"])),
                                      timeout=self.connect_timeout_s) as sock:
            sock.settimeout(self.read_timeout_s)
            _send_frame(sock, {"transfer_id": int(params["transfer_id"]), "first": first, "count": count})
            head = _recv_frame(sock)
            if not head.get("ok"):
                raise KvTransferError(f"the prefill side refused the pull: {head.get('error')}")
            shape = [int(x) for x in head["shape"]]
            dtype = getattr(torch, self.layout.dtype)
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            raw = _recv_exact(sock, nbytes)
            sock.sendall(b"\x01")
        data = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape) if nbytes else \
            torch.empty(shape, dtype=dtype)
        self.stats["bytes"] += nbytes
        self.stats["seconds"] += time.perf_counter() - t0
        return data

    def install(self, prompt_ids: list[int], first: int, data: torch.Tensor) -> int:
        """Register fetched blocks (`data` holds prompt blocks first, first+1, ...) in the prefix
        cache and write their KV; returns how many were installed. Engine thread."""
        transfer_id = secrets.randbits(63)
        start, blocks = self.scheduler.import_prefix(transfer_id, prompt_ids, first, data.shape[2])
        try:
            if blocks:
                write_blocks(self.kv_caches, blocks, data[:, :, start - first:start - first + len(blocks)])
        except BaseException:
            self.scheduler.discard(transfer_id)  # registered but never written: out of the cache
            raise
        self.scheduler.unpin(transfer_id)
        self.stats["imports"] += 1
        self.stats["blocks"] += len(blocks)
        return len(blocks)
