"""The engine process: runs LLMEngine in a loop and talks to the frontend over one socket.

It never waits on HTTP. A reader thread turns incoming frames into a queue; the main loop takes
whatever is queued (adds, aborts), runs one step when there is work, and sends that step's
deltas back. When idle it blocks on the queue, so it costs nothing.

Frames, frontend -> engine:
  {"type": "add", "id", "prompt_ids", "params": SamplingParams fields, "priority", "kv"?}
      kv: the request's kv_transfer_params, on a prefill or decode engine (engine_kv.py)
  {"type": "abort", "id"}         the client went away (or the drain timed out)
  {"type": "shutdown"}
Frames, engine -> frontend:
  {"type": "ready", "model", "max_model_len", "vocab_size", "num_kv_blocks", "pid", "kv_transfer"}
      kv_transfer: {"role": "both" | "prefill" | "decode", "host"?, "port"?}
  {"type": "outputs", "outputs": [{"id", "finished", "queue_time"?, "seqs": [
      {"index", "text", "token_ids", "logprobs"?, "finish_reason", "stop_reason"}]}]}
      text / token_ids / logprobs hold only what is new since the previous frame; a prefill
      engine's last item of a do_remote_decode request also has "kv_transfer_params".
  {"type": "error", "id", "error": {"message", "param", "status"}}
      the request ended without outputs: its add was refused (status 400) or failed (500), or
      its outputs could not be encoded (500); the engine holds nothing of it
  {"type": "stats", ...LLMEngine.stats()}                  after steps (rate-limited) and when idle
  {"type": "fatal", "message"}                             startup or a step failed; the process exits

Error boundary: a failure that belongs to one request (its add, its outputs' encoding, and,
inside LLMEngine.step, its draw or detokenization) ends that request with an error and the loop
goes on; only a failure of the engine itself (a step that raises, a dead peer rank) is fatal.

Detokenization and stop strings run here, not in the frontend (DESIGN.md puts them in the
frontend): the engine finds a stop string in the same step that produced it, so no token is
generated past a stop and KV blocks are freed at once; the frontend only forwards text deltas.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
from typing import Any

from expertmesh.errors import CoreError, InvalidRequestError
from expertmesh.outputs import RequestOutputKind
from expertmesh.server.link import LinkClosed, encode, recv_frame

logger = logging.getLogger(__name__)
STATS_INTERVAL_S = 0.1  # a stats frame at most this often while busy (and always when going idle)


def _logprob_entries(entries: list[dict]) -> list[list[list[Any]]]:
    # Per generated token: [[token_id, logprob, rank, text], ...], the sampled token first.
    return [[[tid, lp.logprob, lp.rank, lp.decoded_token] for tid, lp in entry.items()] for entry in entries]


class EngineLoop:
    def __init__(self, engine: Any, sock: socket.socket, kv_transfer: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.sock = sock
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.kv = _kv_side(engine, kv_transfer or {}, self.inbox)  # None unless --role prefill|decode
        self.live: set[str] = set()  # requests added and not yet finished or aborted
        self.arrival: dict[str, float] = {}  # request id -> when it arrived, until its first output
        self.last_stats = 0.0
        self.dirty = True

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def _read_forever(self) -> None:
        try:
            while True:
                self.inbox.put(recv_frame(self.sock))
        except (LinkClosed, OSError) as exc:
            # The frontend is gone (or sent garbage): nobody can receive results, so stop.
            print(f"expertmesh engine: frontend link closed ({exc}); shutting down", file=sys.stderr, flush=True)
            self.inbox.put({"type": "shutdown"})

    def _error(self, request_id: Any, message: str, param: str | None, status: int) -> None:
        self.send({"type": "error", "id": request_id, "error": {"message": message, "param": param, "status": status}})

    def _add(self, message: dict[str, Any]) -> None:
        from expertmesh.sampling_params import SamplingParams

        request_id = message.get("id")
        try:
            params = SamplingParams(**message["params"])
            req = self.engine.check_request(message["prompt_ids"], params, message.get("priority", 0))
            self.arrival[request_id] = time.monotonic()
            if self.kv is not None and self.kv.defer(message, req):
                return  # added once its KV has arrived (kv_ready)
            self._admit(request_id, req)
        except (InvalidRequestError, CoreError) as exc:
            self.arrival.pop(request_id, None)
            self._error(request_id, str(exc), getattr(exc, "param", None), 400)
            return
        except Exception as exc:  # noqa: BLE001 - this request's failure, not the engine's
            logger.exception("adding request %s failed", request_id)
            self.arrival.pop(request_id, None)
            self._error(request_id, f"the engine could not take the request: {type(exc).__name__}: {exc}", None, 500)

    def _admit(self, request_id: str, req: Any) -> None:
        self.engine.add(req, request_id, output_kind=RequestOutputKind.DELTA)
        self.live.add(request_id)

    def _kv_ready(self, frame: dict[str, Any]) -> None:
        assert self.kv is not None
        req = self.kv.ready(frame)
        if req is None:
            return  # aborted while its KV travelled
        try:
            self._admit(frame["id"], req)
        except Exception as exc:  # noqa: BLE001 - this request's failure, not the engine's
            logger.exception("adding request %s failed", frame["id"])
            self.arrival.pop(frame["id"], None)
            self._error(frame["id"], f"the engine could not take the request: {type(exc).__name__}: {exc}", None, 500)

    def _handle(self, message: dict[str, Any]) -> bool:
        """Apply one frame; False means shut down."""
        kind = message.get("type")
        if kind == "add":
            self._add(message)
        elif kind == "abort":
            self.engine.abort_request(message["id"])
            self.live.discard(message["id"])
            self.arrival.pop(message["id"], None)
            if self.kv is not None:
                self.kv.forget(message["id"])
        elif kind == "kv_ready":
            self._kv_ready(message)
        elif kind == "shutdown":
            return False
        self.dirty = True
        return True

    def _send_outputs(self, frame: dict[str, Any]) -> None:
        """The step's outputs in one frame; if one item cannot be encoded, that request ends
        with an error and the others still go out."""
        try:
            self.send(frame)
            return
        except (TypeError, ValueError, OverflowError):
            logger.exception("an outputs frame could not be encoded; sending its items one by one")
        good = []
        for item in frame["outputs"]:
            try:
                encode({"type": "outputs", "outputs": [item]})
                good.append(item)
            except (TypeError, ValueError, OverflowError) as exc:
                self.engine.abort_request(item["id"])
                self.live.discard(item["id"])
                self._error(item["id"], f"the engine could not encode this request's output: {exc}", None, 500)
        self.send({"type": "outputs", "outputs": good})

    def _outputs_frame(self, outputs: list[Any], step_start: float) -> dict[str, Any]:
        frames = []
        for out in outputs:
            if out.request_id not in self.live:  # aborted while the step ran
                continue
            item: dict[str, Any] = {"id": out.request_id, "finished": out.finished, "seqs": []}
            arrived = self.arrival.pop(out.request_id, None)
            if arrived is not None:
                item["queue_time"] = max(0.0, step_start - arrived)
            for seq in out.outputs:  # DELTA outputs: only what this step made
                entry: dict[str, Any] = {
                    "index": seq.index,
                    "text": seq.text_delta,
                    "token_ids": seq.token_ids,
                    "finish_reason": seq.finish_reason,
                    "stop_reason": seq.stop_reason,
                }
                if seq.logprobs is not None:
                    entry["logprobs"] = _logprob_entries(seq.logprobs)
                item["seqs"].append(entry)
            if out.finished:
                self.live.discard(out.request_id)
                if self.kv is not None:
                    self.kv.finished(item)  # before the next step can evict what it pins
            frames.append(item)
        return {"type": "outputs", "outputs": frames}

    def run(self) -> None:
        threading.Thread(target=self._read_forever, name="engine-link-reader", daemon=True).start()
        while True:
            busy = self.engine.has_unfinished_requests()
            try:
                # Idle: block until the frontend sends something. Busy: only take what is queued.
                message = self.inbox.get(block=not busy, timeout=None if self.kv is None else self.kv.idle_timeout())
                if not self._handle(message):
                    return
                while True:
                    if not self._handle(self.inbox.get_nowait()):
                        return
            except queue.Empty:
                pass
            if self.kv is not None and self.kv.poll():
                self.dirty = True  # pins went: the next stats frame says so
            if self.engine.has_unfinished_requests():
                step_start = time.monotonic()
                outputs = self.engine.step()
                if outputs:
                    self._send_outputs(self._outputs_frame(outputs, step_start))
                self.dirty = True
            now = time.monotonic()
            idle = not self.engine.has_unfinished_requests()
            if self.dirty and (idle or now - self.last_stats >= STATS_INTERVAL_S):
                stats = self.engine.stats()
                if self.kv is not None:
                    stats["kv_transfer"] = self.kv.stats()
                self.send({"type": "stats", **stats})
                self.last_stats, self.dirty = now, False


def _kv_side(engine: Any, kv_transfer: dict[str, Any], inbox: queue.Queue) -> Any:
    from expertmesh.server.engine_kv import DecodeSide, PrefillSide

    role = kv_transfer.get("role", "both")
    if role == "prefill":
        return PrefillSide(engine, lambda: inbox.put({"type": "kv_wake"}), kv_transfer.get("host", "127.0.0.1"),
                           int(kv_transfer.get("port", 0)), float(kv_transfer.get("pin_timeout_s", 60.0)))
    if role == "decode":
        return DecodeSide(engine, inbox.put, float(kv_transfer.get("timeout_s", 30.0)))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="expertmesh engine process (started by `expertmesh serve`)")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the frontend")
    parser.add_argument("--config", required=True, help="EngineConfig fields as JSON")
    parser.add_argument("--kv-transfer", default="{}",
                        help="disaggregated serving: role, host, port, pin_timeout_s, timeout_s (JSON)")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    try:
        from expertmesh.config import EngineConfig

        from expertmesh.engine.factory import make_engine

        config = EngineConfig(**json.loads(args.config))
        engine = make_engine(config)  # with a parallel layout this process is rank 0 and starts the others
        loop = EngineLoop(engine, sock, json.loads(args.kv_transfer))
    except Exception as exc:  # noqa: BLE001 - reported to the frontend, which exits with it
        sock.sendall(encode({"type": "fatal", "message": f"engine failed to start: {exc}"}))
        return 1
    sock.sendall(
        encode(
            {
                "type": "ready",
                "model": config.model or config.model_path.name,
                "max_model_len": engine.max_model_len,
                "vocab_size": engine.runner.vocab_size,
                "num_kv_blocks": engine.runner.num_kv_blocks,
                "pid": os.getpid(),
                "kv_transfer": {"role": "both"} if loop.kv is None else loop.kv.info(),
            }
        )
    )
    try:
        try:
            loop.run()
        finally:
            if loop.kv is not None:
                loop.kv.close()
            engine.close()  # stops the other ranks, if any
    except (LinkClosed, BrokenPipeError, ConnectionResetError):
        return 0
    except Exception:  # noqa: BLE001 - a bug in a step: tell the frontend, which fails in-flight requests
        message = traceback.format_exc()
        print(message, file=sys.stderr)
        try:
            sock.sendall(encode({"type": "fatal", "message": message.strip().splitlines()[-1]}))
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
