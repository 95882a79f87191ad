"""The frontend's end of the engine link: starts the engine process, sends adds and aborts,
and routes each output frame to the queue of the request it belongs to.

One reader task owns the socket's read side; it cannot end without saying why. If the engine
dies (the socket closes, it reports a fatal error, it sends a frame the reader cannot use, or
it sends nothing for `engine_timeout_s` while requests wait on it) the process is killed, every
request in flight gets an `EngineDeadError` in its queue at once, `alive` turns false and
`dead` is set, which `expertmesh serve` waits on to exit for its supervisor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from typing import Any

from expertmesh.errors import EngineDeadError
from expertmesh.server.link import LinkClosed, encode, read_frame

logger = logging.getLogger(__name__)
DEFAULT_ENGINE_TIMEOUT_S = 120.0  # longest silence of a busy engine (it reports after every step)
SEND_TIMEOUT_S = 10.0  # a write the engine's reader thread does not take within this is a hung engine


class EngineRejected(Exception):
    """The engine refused an add: 400 (invalid for this engine) or 500 (it failed taking it)."""

    def __init__(self, message: str, param: str | None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class RequestCutOff(Exception):
    """The server stopped the request (shutdown drain ran out of time)."""


class EngineClient:
    def __init__(self, engine_timeout_s: float = DEFAULT_ENGINE_TIMEOUT_S) -> None:
        self.process: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}  # the engine's "ready" frame
        self.stats: dict[str, Any] = {}  # its latest "stats" frame
        self.dead_reason: str | None = None
        self.dead = asyncio.Event()  # set once, when the engine is gone for good
        self.engine_timeout_s = engine_timeout_s
        self._queues: dict[str, asyncio.Queue] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task] = []
        self._last_frame_at = time.monotonic()
        self._busy_since = time.monotonic()  # when the first of the requests now in flight was added
        self._closing = False  # close() asked the engine to exit: its link closing is no death
        self.on_stats = None  # optional callback(stats), e.g. the metrics' last-seen time

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.process is not None and self.process.poll() is None

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    async def start(self, engine_config: dict[str, Any], timeout: float = 300.0,
                    kv_transfer: dict[str, Any] | None = None) -> None:
        """Spawn the engine on one end of a socketpair and wait for its "ready" frame.
        kv_transfer: its role in disaggregated serving (engine_kv.py), if any."""
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "expertmesh.server.engine_process", "--fd", str(theirs.fileno()),
             "--config", json.dumps(engine_config), "--kv-transfer", json.dumps(kv_transfer or {})],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()  # only the child holds it now, so its death closes the link
        reader, self._writer = await asyncio.open_connection(sock=ours)
        try:
            first = await asyncio.wait_for(read_frame(reader), timeout)
        except (LinkClosed, asyncio.TimeoutError) as exc:
            self.process.kill()
            raise RuntimeError(f"engine process did not start within {timeout:.0f} s: {exc!r}") from None
        if first["type"] != "ready":
            self.process.kill()
            raise RuntimeError(first.get("message", f"engine sent {first['type']!r} before ready"))
        self.info = first
        self._last_frame_at = time.monotonic()
        self._tasks = [asyncio.create_task(self._read_loop(reader), name="engine-link-reader"),
                       asyncio.create_task(self._watchdog(), name="engine-watchdog")]

    # ---- the reader: every frame, or a visible death ---------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                self._last_frame_at = time.monotonic()
                self._route(frame)
                if frame["type"] == "fatal":
                    self._die(f"engine failed: {frame.get('message')}")
                    return
        except asyncio.CancelledError:
            raise
        except (LinkClosed, ConnectionError) as exc:
            if self._closing:
                return
            code = self.process.poll() if self.process else None
            self._die(f"engine process exited (code {code}): {exc}")
        except Exception as exc:  # noqa: BLE001 - a frame we cannot use: the link cannot be trusted
            logger.exception("engine link reader failed")
            self._die(f"engine link reader failed on a frame: {type(exc).__name__}: {exc}")

    def _route(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "outputs":
            for item in frame["outputs"]:
                q = self._queues.get(item["id"])
                if q is not None:
                    q.put_nowait(item)
                    if item["finished"]:
                        self._queues.pop(item["id"], None)
        elif kind == "error":
            q = self._queues.pop(frame["id"], None)
            if q is not None:
                error = frame["error"]
                q.put_nowait(EngineRejected(error["message"], error.get("param"), int(error.get("status", 400))))
        elif kind == "stats":
            self.stats = frame
            if self.on_stats is not None:
                try:
                    self.on_stats(frame)
                except Exception:  # noqa: BLE001 - metrics must not take the link down
                    logger.exception("stats callback failed; stats keep flowing")

    async def _watchdog(self) -> None:
        """Every wait on the engine has a deadline: a busy engine reports after every step."""
        period = max(0.05, min(1.0, self.engine_timeout_s / 4))
        while self.dead_reason is None:
            await asyncio.sleep(period)
            if not self._queues:
                continue
            silent = time.monotonic() - max(self._last_frame_at, self._busy_since)
            if silent > self.engine_timeout_s:
                self._die(f"engine sent nothing for {silent:.1f} s while {len(self._queues)} request(s) waited "
                          f"on it (--engine-timeout {self.engine_timeout_s:g})")
            elif self.process is not None and self.process.poll() is not None and not self._closing:
                self._die(f"engine process exited (code {self.process.returncode})")

    def _die(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
            logger.error("engine is dead: %s", reason)
            print(f"expertmesh: engine is dead: {reason}", file=sys.stderr, flush=True)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # a wedged or confused engine must not linger
        for q in self._queues.values():
            q.put_nowait(EngineDeadError(self.dead_reason))
        self._queues.clear()
        self.dead.set()

    # ---- requests out ----------------------------------------------------------------------

    async def _send(self, frame: bytes) -> None:
        if not self.alive or self._writer is None:
            raise EngineDeadError(self.dead_reason or "engine process is not running")
        try:
            self._writer.write(frame)
            await asyncio.wait_for(self._writer.drain(), SEND_TIMEOUT_S)
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            self._die(f"engine link broke: {type(exc).__name__}: {exc}")
            raise EngineDeadError(self.dead_reason) from None

    async def add(self, request_id: str, prompt_ids: list[int], params: dict[str, Any], priority: int = 0,
                  kv: dict[str, Any] | None = None) -> asyncio.Queue:
        """Queue a request; its output items (or an exception) arrive on the returned queue.
        A request the link cannot encode raises ValueError before anything is registered.
        kv: its kv_transfer_params (disaggregated serving)."""
        message = {"type": "add", "id": request_id, "prompt_ids": prompt_ids, "params": params, "priority": priority}
        if kv is not None:
            message["kv"] = kv
        try:
            frame = encode(message)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"the request cannot be sent to the engine: {type(exc).__name__}: {exc}") from None
        q: asyncio.Queue = asyncio.Queue()
        if not self._queues:
            self._busy_since = time.monotonic()
        self._queues[request_id] = q
        try:
            await self._send(frame)
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        return q

    async def abort(self, request_id: str) -> None:
        if self._queues.pop(request_id, None) is None:
            return  # finished (or never added): nothing to free
        try:
            await self._send(encode({"type": "abort", "id": request_id}))
        except EngineDeadError:
            pass

    async def cut_off(self, reason: str) -> int:
        """End every request in flight with RequestCutOff (and free it in the engine); returns
        how many there were."""
        ids = list(self._queues)
        for request_id in ids:
            q = self._queues.get(request_id)
            if q is not None:
                q.put_nowait(RequestCutOff(reason))
            await self.abort(request_id)
        return len(ids)

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the engine to exit; kill it if it does not within `timeout`."""
        if self.process is None:
            return
        self._closing = True
        if self.alive:
            try:
                await self._send(encode({"type": "shutdown"}))
            except EngineDeadError:
                pass
        try:
            await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout)
        except asyncio.TimeoutError:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._writer.close()
        if self.dead_reason is None:
            self.dead_reason = "engine stopped"  # set first: a planned stop is not logged as a death
        self._die(self.dead_reason)
