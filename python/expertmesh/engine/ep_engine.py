"""Expert-parallel engine: R ranks, each an LLMEngine over its own requests, stepping together.

Rank 0 (`EPEngine`, in the process that made the LLM) owns the request API. It validates and
hands each request to a rank: the least loaded one, except that requests whose first KV block
of prompt tokens matches an earlier request's go to that request's rank, so they keep their
prefix-cache hits. Each step rank 0 broadcasts the new requests and aborts, every rank runs one
engine step (a rank with nothing scheduled runs an empty one that still joins every MoE
all-to-all), and rank 0 gathers the outputs. Other ranks run `run_worker`.

A rank that dies makes the next collective fail: rank 0 raises CollectiveError (it also
checks the processes it spawned before every step) and the survivors exit.
"""

from __future__ import annotations

import logging
import subprocess
from collections import OrderedDict

import numpy as np
import torch.distributed as dist

from expertmesh.config import EngineConfig
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.request_state import EngineRequest
from expertmesh.errors import CollectiveError, InvalidRequestError
from expertmesh.outputs import CompletionOutput, RequestOutput
from expertmesh.parallel.all_to_all import tokens_per_rank
from expertmesh.parallel.groups import (Groups, RankInfo, destroy_groups, free_port, rank_info_from_env,
                                        set_expert_parallel)
from expertmesh.parallel.launch import setup_rank, spawn_workers
from expertmesh.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_AFFINITY_ENTRIES = 4096  # remembered first blocks (LRU)


def _build_engine(config: EngineConfig, info: RankInfo) -> tuple[Groups, LLMEngine]:
    groups, ep = setup_rank(config, info)
    set_expert_parallel(ep)  # read by every FusedMoE while the model is built
    try:
        engine = LLMEngine(config)
    finally:
        set_expert_parallel(None)
    return groups, engine


def _collective(fn, what: str):
    try:
        return fn()
    except CollectiveError:
        raise
    except Exception as exc:
        raise CollectiveError(f"{what} failed ({type(exc).__name__}: {exc}); a peer rank probably died") from exc


def run_worker(config: EngineConfig, info: RankInfo) -> None:
    """Rank > 0: serve rank 0's commands until "stop" (or until rank 0 is gone)."""
    groups, engine = _build_engine(config, info)
    try:
        while True:
            box: list = [None]
            _collective(lambda: dist.broadcast_object_list(box, src=0, group=groups.control), "receiving a command")
            kind, payload = box[0]
            if kind == "stop":
                return
            if kind == "step":
                adds, aborts = payload
                failed = [_add_or_fail(engine, req, request_id) for req, request_id in adds[info.rank]]
                for request_id in aborts[info.rank]:
                    engine.abort_request(request_id)
                outputs = [out for out in failed if out is not None] + engine.step()
                _collective(lambda: dist.gather_object(outputs, None, dst=0, group=groups.control), "sending outputs")
            elif kind == "stats":
                stats = engine.stats()
                _collective(lambda: dist.gather_object(stats, None, dst=0, group=groups.control), "sending stats")
    finally:
        for m in engine.runner.model.modules():
            if getattr(m, "ep", None) is not None:
                m.ep.transport.close()
                break
        destroy_groups()


def _add_or_fail(engine: LLMEngine, req: EngineRequest, request_id: str) -> RequestOutput | None:
    """Add on a worker rank; a request it cannot take ends with "error" (reported with the
    step's outputs) instead of taking the rank, and with it the group, down."""
    try:
        engine.add(req, request_id)
        return None
    except Exception:  # noqa: BLE001 - rank 0 validated it: this is a bug, isolated to the request
        logger.exception("rank could not add request %s", request_id)
        outs = [CompletionOutput(i, "", [], finish_reason="error") for i in range(req.params.n)]
        return RequestOutput(request_id, req.prompt, req.prompt_ids, outs, finished=True)


class EPEngine:
    """Rank 0 of an expert-parallel group; the same request API as LLMEngine."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.world_size = config.expert_parallel_size
        self.procs: list[subprocess.Popen] = []
        info = rank_info_from_env()
        if info is None:  # single host, started by us: this process is rank 0
            info = RankInfo(0, self.world_size, "127.0.0.1", free_port())
            self.procs = spawn_workers(config, info)
        elif info.world_size != self.world_size:
            raise InvalidRequestError(
                f"expert_parallel_size is {self.world_size} but WORLD_SIZE is {info.world_size}",
                param="expert_parallel_size", value=self.world_size,
            )
        if info.rank != 0:  # torchrun & co.: this process is a worker rank
            run_worker(config, info)
            raise SystemExit(0)
        try:
            self.groups, self.engine = _build_engine(config, info)
        except BaseException:
            self._kill_workers()
            raise
        self.tokenizer = self.engine.tokenizer
        self.block_size = config.block_size
        self._owner: dict[str, int] = {}  # live request -> rank
        self._load = [0] * self.world_size  # live requests per rank
        self._affinity: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self._adds: list[list] = [[] for _ in range(self.world_size)]
        self._aborts: list[list[str]] = [[] for _ in range(self.world_size)]
        self._next_id = 0
        self._closed = False

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def runner(self):
        """Rank 0's model runner (vocabulary, KV blocks per rank)."""
        return self.engine.runner

    # ---- requests ----------------------------------------------------------------------

    def pick_rank(self, prompt_ids: list[int]) -> int:
        """Least loaded rank, unless the prompt's first full block was seen before."""
        key = tuple(prompt_ids[: self.block_size]) if len(prompt_ids) > self.block_size else None
        if key is not None and key in self._affinity:
            self._affinity.move_to_end(key)
            return self._affinity[key]
        rank = min(range(self.world_size), key=lambda r: (self._load[r], r))
        if key is not None:
            self._affinity[key] = rank
            if len(self._affinity) > _AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)
        return rank

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0) -> str:
        req = self.engine.check_request(prompt, params, priority)  # rank 0 validates for everyone
        if request_id is None:
            request_id = f"ep-{self._next_id}"
            self._next_id += 1
        if request_id in self._owner:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id", value=request_id)
        rank = self.pick_rank(req.prompt_ids)
        if rank == 0:
            self.engine.add(req, request_id)
        else:
            self._adds[rank].append((req, request_id))
        self._owner[request_id] = rank
        self._load[rank] += 1
        return request_id

    def abort_request(self, request_id: str) -> bool:
        rank = self._owner.get(request_id)
        if rank is None:
            return False
        if rank == 0:
            self.engine.abort_request(request_id)
        else:
            pending = [a for a in self._adds[rank] if a[1] != request_id]
            if len(pending) == len(self._adds[rank]):
                self._aborts[rank].append(request_id)
            self._adds[rank] = pending
        self._forget(request_id)
        return True

    def _forget(self, request_id: str) -> None:
        rank = self._owner.pop(request_id, None)
        if rank is not None:
            self._load[rank] -= 1

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    # ---- stepping ----------------------------------------------------------------------

    def _check_workers(self) -> None:
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None:
                raise CollectiveError(f"expert-parallel rank {rank} (pid {proc.pid}) exited with code {code}")

    def _command(self, kind: str, payload: object) -> None:
        if self._closed:
            raise CollectiveError("the expert-parallel engine is closed (a rank failed or close() was called)")
        self._check_workers()
        box = [(kind, payload)]
        _collective(lambda: dist.broadcast_object_list(box, src=0, group=self.groups.control), f"sending {kind}")

    def _gather(self, local: object, what: str) -> list:
        out: list = [None] * self.world_size
        _collective(lambda: dist.gather_object(local, out, dst=0, group=self.groups.control), what)
        return out

    def step(self) -> list[RequestOutput]:
        """One lockstep step of every rank; outputs of all ranks' requests that advanced."""
        try:
            self._command("step", (self._adds, self._aborts))
            self._adds = [[] for _ in range(self.world_size)]
            self._aborts = [[] for _ in range(self.world_size)]
            outputs = [out for per_rank in self._gather(self.engine.step(), "gathering outputs") for out in per_rank]
        except CollectiveError:
            self.close(graceful=False)
            raise
        for out in outputs:
            if out.finished:
                self._forget(out.request_id)
        return outputs

    # The same loop as one rank's: it only calls self.step().
    run_to_completion = LLMEngine.run_to_completion

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Rank 0's counters plus per-rank snapshots, tokens per expert summed over ranks
        ([layers][E]) and tokens per owning rank ([layers][R]): load imbalance at a glance."""
        self._command("stats", None)
        per_rank = self._gather(self.engine.stats(), "gathering stats")
        total = np.sum([np.asarray(s["expert_tokens"], dtype=np.int64) for s in per_rank], axis=0)  # [L, E]
        snapshot = dict(per_rank[0])
        snapshot["expert_tokens"] = total.tolist()
        snapshot["rank_tokens"] = [tokens_per_rank(layer, self.world_size).tolist() for layer in total]
        snapshot["ranks"] = per_rank
        return snapshot

    # ---- shutdown ----------------------------------------------------------------------

    def _kill_workers(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def close(self, graceful: bool = True) -> None:
        """Stop every rank and leave the process groups (idempotent)."""
        if self._closed:
            return
        if graceful:
            try:
                self._command("stop", None)
            except CollectiveError:
                graceful = False
        self._closed = True
        for proc in self.procs:
            try:
                proc.wait(timeout=10 if graceful else 0.5)
            except subprocess.TimeoutExpired:
                pass
        self._kill_workers()
        for m in self.engine.runner.model.modules():
            if getattr(m, "ep", None) is not None:
                m.ep.transport.close()
                break
        destroy_groups()
