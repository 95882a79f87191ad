"""Data-parallel replicas stepping together: R = TP x DP ranks, DP replicas of TP ranks each.

Each replica's leader (its TP rank 0) is an LLMEngine over its own requests and KV cache;
its TP followers only run the model on the leader's batches (ModelRunner.follow). Global rank
0 (`DPEngine`, in the process that made the LLM) is replica 0's leader and owns the request
API: it validates and hands each request to a replica -- the least loaded one, except that
requests whose first KV block of prompt tokens matches an earlier request's go to that one, so
they keep their prefix-cache hits. Each step rank 0 sends the leaders one command frame (new
requests and aborts), every leader runs one engine step (a leader with nothing scheduled runs
an empty one that still joins every MoE all-to-all) and replies with a frame of its outputs'
deltas (dp_frames.py; moved by parallel/control_channel.py: shared memory on one host). Other
leaders run `serve_leader`.

A rank that dies makes the next collective fail: rank 0 raises CollectiveError (it also checks
the processes it spawned before every step) and the survivors exit.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from expertmesh.config import EngineConfig
from expertmesh.engine.dp_frames import (STATS, STEP, STOP, OutputMirror, decode_add, encode_add, encode_outputs, pack,
                                         unpack)
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.engine.request_state import EngineRequest
from expertmesh.errors import CollectiveError, InvalidRequestError
from expertmesh.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from expertmesh.parallel.all_to_all import tokens_per_rank
from expertmesh.parallel.launch import RankSetup
from expertmesh.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_AFFINITY_ENTRIES = 4096  # remembered first blocks (LRU)


def _collective(fn, what: str):
    try:
        return fn()
    except CollectiveError:
        raise
    except Exception as exc:
        raise CollectiveError(f"{what} failed ({type(exc).__name__}: {exc}); a peer rank probably died") from exc


def _add_or_fail(engine: LLMEngine, req: EngineRequest, request_id: str) -> RequestOutput | None:
    """Add on a leader; a request it cannot take ends with "error" (reported with the step's
    outputs) instead of taking the rank, and with it the group, down."""
    try:
        engine.add(req, request_id, RequestOutputKind.DELTA)  # what encode_outputs sends
        return None
    except Exception:  # noqa: BLE001 - rank 0 validated it: this is a bug, isolated to the request
        logger.exception("rank could not add request %s", request_id)
        outs = [CompletionOutput(i, "", [], finish_reason="error") for i in range(req.params.n)]
        return RequestOutput(request_id, req.prompt, req.prompt_ids, outs, finished=True)


def serve_leader(engine: LLMEngine, setup: RankSetup) -> None:
    """A replica leader other than rank 0: serve rank 0's commands until "stop"."""
    while _serve_one(engine, setup):
        pass


def _serve_one(engine: LLMEngine, setup: RankSetup) -> bool:
    """One command from rank 0; False once told to stop."""
    channel, replica, profile = setup.control, setup.layout.dp_rank, setup.profile
    assert channel is not None
    with profile.step():
        with profile.section("control"):
            command = unpack(_collective(lambda: channel.broadcast(None), "receiving a command"))
        if command[0] == STOP:
            return False
        if command[0] == STEP:
            _, adds, aborts = command
            failed = [_add_or_fail(engine, *decode_add(add)) for add in adds[replica]]
            for request_id in aborts[replica]:
                engine.abort_request(request_id)
            outputs = [out for out in failed if out is not None] + engine.step()
            with profile.section("control"):
                reply = encode_outputs(outputs)
                _collective(lambda: channel.gather(reply), "sending outputs")
        elif command[0] == STATS:
            reply = pack(engine.stats())
            _collective(lambda: channel.gather(reply), "sending stats")
    return True


class DPEngine:
    """Global rank 0 of a layout with several replicas; the same request API as LLMEngine."""

    def __init__(self, config: EngineConfig, runner: ModelRunner) -> None:
        assert runner.rank is not None
        self.config = config
        self.setup = runner.rank
        self.replicas = config.parallel.data_parallel_size
        self.engine = LLMEngine(config, runner)
        self.tokenizer = self.engine.tokenizer
        self.block_size = config.block_size
        self._owner: dict[str, int] = {}  # live request -> replica
        self._load = [0] * self.replicas  # live requests per replica
        self._affinity: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self._mirror = OutputMirror()  # other replicas' requests, rebuilt from their replies
        self._adds: list[list] = [[] for _ in range(self.replicas)]
        self._aborts: list[list[str]] = [[] for _ in range(self.replicas)]
        self._next_id = 0
        self._closed = False

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def runner(self) -> ModelRunner:
        """Rank 0's model runner (vocabulary, KV blocks per replica)."""
        return self.engine.runner

    def check_request(self, prompt: str | list[int], params: SamplingParams, priority: int = 0) -> EngineRequest:
        return self.engine.check_request(prompt, params, priority)

    # ---- requests ----------------------------------------------------------------------

    def pick_replica(self, prompt_ids: list[int]) -> int:
        """Least loaded replica, unless the prompt's first full block was seen before."""
        key = tuple(prompt_ids[: self.block_size]) if len(prompt_ids) > self.block_size else None
        if key is not None and key in self._affinity:
            self._affinity.move_to_end(key)
            return self._affinity[key]
        replica = min(range(self.replicas), key=lambda r: (self._load[r], r))
        if key is not None:
            self._affinity[key] = replica
            if len(self._affinity) > _AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)
        return replica

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0, output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> str:
        return self.add(self.check_request(prompt, params, priority), request_id, output_kind)

    def add(self, req: EngineRequest, request_id: str | None = None,
            output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> str:
        """Queue a request rank 0 validated (check_request) on the replica that takes it."""
        if request_id is None:
            request_id = f"dp-{self._next_id}"
            self._next_id += 1
        if request_id in self._owner:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id", value=request_id)
        replica = self.pick_replica(req.prompt_ids)
        if replica == 0:
            self.engine.add(req, request_id, output_kind)
        else:
            self._adds[replica].append(encode_add(req, request_id))
            self._mirror.expect(req, request_id, output_kind)
        self._owner[request_id] = replica
        self._load[replica] += 1
        return request_id

    def abort_request(self, request_id: str) -> bool:
        replica = self._owner.get(request_id)
        if replica is None:
            return False
        if replica == 0:
            self.engine.abort_request(request_id)
        else:
            pending = [a for a in self._adds[replica] if a[0] != request_id]
            if len(pending) == len(self._adds[replica]):
                self._aborts[replica].append(request_id)
            self._adds[replica] = pending
        self._forget(request_id)
        return True

    def _forget(self, request_id: str) -> None:
        replica = self._owner.pop(request_id, None)
        self._mirror.forget(request_id)
        if replica is not None:
            self._load[replica] -= 1

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    # ---- stepping ----------------------------------------------------------------------

    def _command(self, command: list) -> None:
        if self._closed:
            raise CollectiveError("the data-parallel engine is closed (a rank failed or close() was called)")
        self.setup.check_procs()
        frame = pack(command)
        with self.setup.profile.section("control"):
            _collective(lambda: self.setup.control.broadcast(frame), f"sending {command[0]}")

    def _gather(self, frame: bytes, what: str) -> list[bytes]:
        with self.setup.profile.section("control"):
            return _collective(lambda: self.setup.control.gather(frame), what)

    def step(self) -> list[RequestOutput]:
        """One lockstep step of every replica; outputs of all replicas' requests that advanced."""
        with self.setup.profile.step():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        try:
            self._command([STEP, self._adds, self._aborts])
            self._adds = [[] for _ in range(self.replicas)]
            self._aborts = [[] for _ in range(self.replicas)]
            outputs = self.engine.step()
            replies = self._gather(b"", "gathering outputs")
            with self.setup.profile.section("control"):
                for reply in replies[1:]:
                    outputs += self._mirror.decode(reply)
        except CollectiveError:
            self.close(graceful=False)
            raise
        for out in outputs:
            if out.finished:
                self._forget(out.request_id)
        return outputs

    # The same loop as one replica's: it only calls self.step().
    run_to_completion = LLMEngine.run_to_completion

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Replica 0's counters plus per-replica snapshots, tokens per expert summed over replicas
        ([layers][E]) and tokens per owning rank ([layers][R]): load imbalance at a glance."""
        self._command([STATS])
        own = self.engine.stats()
        per_replica = [own] + [unpack(reply) for reply in self._gather(b"", "gathering stats")[1:]]
        total = np.sum([np.asarray(s["expert_tokens"], dtype=np.int64) for s in per_replica], axis=0)  # [L, E]
        snapshot = dict(per_replica[0])
        snapshot["expert_tokens"] = total.tolist()
        world = self.config.parallel.world_size
        snapshot["rank_tokens"] = [tokens_per_rank(layer, world).tolist() for layer in total]
        if "context_parallel" in own:  # every replica's CP ring: requests, request-steps and rank-0 bytes summed
            rings = [s["context_parallel"] for s in per_replica]
            snapshot["context_parallel"] = {
                **own["context_parallel"], "ring_bytes": sum(r["ring_bytes"] for r in rings),
                **{key: {v: sum(r[key][v] for r in rings) for v in own["context_parallel"][key]}
                   for key in ("requests", "request_steps")}}
        snapshot["ranks"] = per_replica
        return snapshot

    # ---- shutdown ----------------------------------------------------------------------

    def close(self, graceful: bool = True) -> None:
        """Stop every rank and leave the process groups (idempotent)."""
        if self._closed:
            return
        if graceful:
            try:
                self._command([STOP])
            except CollectiveError:
                graceful = False
        self._closed = True
        self.engine.runner.close(graceful)
