"""The frontend's end of the engine link: starts the engine process, sends adds and aborts,
and routes each output frame to the queue of the request it belongs to.

One reader task owns the socket's read side. If the engine dies (the socket closes, or it
reports a fatal error) every request in flight gets an `EngineDeadError` in its queue, so no
HTTP handler can hang on a dead engine, and `alive` turns false (/health answers 503).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from typing import Any

from expertmesh.server.link import LinkClosed, encode, read_frame


class EngineDeadError(RuntimeError):
    """The engine process is gone; requests in flight cannot finish."""


class EngineRejected(Exception):
    """The engine refused an add (InvalidRequestError on its side); carries message and param."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class EngineClient:
    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}  # the engine's "ready" frame
        self.stats: dict[str, Any] = {}  # its latest "stats" frame
        self.dead_reason: str | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self.on_stats = None  # optional callback(stats), e.g. the metrics' last-seen time

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.process is not None and self.process.poll() is None

    async def start(self, engine_config: dict[str, Any], timeout: float = 300.0) -> None:
        """Spawn the engine on one end of a socketpair and wait for its "ready" frame."""
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "expertmesh.server.engine_process", "--fd", str(theirs.fileno()),
             "--config", json.dumps(engine_config)],
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
            raise RuntimeError(first.get("message", f"engine sent {first['type']!r} before ready"))
        self.info = first
        self._reader_task = asyncio.create_task(self._read_loop(reader), name="engine-link-reader")

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader)
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
                        q.put_nowait(EngineRejected(frame["error"]["message"], frame["error"].get("param")))
                elif kind == "stats":
                    self.stats = frame
                    if self.on_stats is not None:
                        self.on_stats(frame)
                elif kind == "fatal":
                    self._die(f"engine failed: {frame.get('message')}")
                    return
        except (LinkClosed, ConnectionError) as exc:
            code = self.process.poll() if self.process else None
            self._die(f"engine process exited (code {code}): {exc}")
        except asyncio.CancelledError:
            raise

    def _die(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
        for q in self._queues.values():
            q.put_nowait(EngineDeadError(self.dead_reason))
        self._queues.clear()

    async def _send(self, message: dict[str, Any]) -> None:
        if not self.alive or self._writer is None:
            raise EngineDeadError(self.dead_reason or "engine process is not running")
        try:
            self._writer.write(encode(message))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._die(f"engine link broke: {exc}")
            raise EngineDeadError(self.dead_reason) from None

    async def add(self, request_id: str, prompt_ids: list[int], params: dict[str, Any], priority: int = 0) -> asyncio.Queue:
        """Queue a request; its output items (or an exception) arrive on the returned queue."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        try:
            await self._send({"type": "add", "id": request_id, "prompt_ids": prompt_ids, "params": params,
                              "priority": priority})
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        return q

    async def abort(self, request_id: str) -> None:
        if self._queues.pop(request_id, None) is None:
            return  # finished (or never added): nothing to free
        try:
            await self._send({"type": "abort", "id": request_id})
        except EngineDeadError:
            pass

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the engine to exit; kill it if it does not within `timeout`."""
        if self.process is None:
            return
        if self.alive:
            try:
                await self._send({"type": "shutdown"})
            except EngineDeadError:
                pass
        try:
            await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout)
        except asyncio.TimeoutError:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        self._die("engine stopped")
