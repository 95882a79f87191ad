"""The one place that picks an engine for a config, and the protocol every engine keeps.

    one rank                 LLMEngine
    TP ranks, one replica    LLMEngine on rank 0; its model runner hands every batch to the
                             TP followers (ranks 1..TP-1), which only run the model
    several replicas (EP)    DPEngine on rank 0 (replica 0's leader), other leaders serve it
                             (dp_engine.serve_leader), every replica's followers run the model

Rank 0 starts the other ranks itself (parallel/launch.py) unless a launcher (torchrun, ...)
already set RANK and WORLD_SIZE; then every process calls make_engine and on ranks > 0 it
serves until rank 0 closes, then exits the process (SystemExit(0)), so code after it runs on
rank 0 only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from expertmesh.config import EngineConfig
from expertmesh.engine.dp_engine import DPEngine, serve_leader
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.engine.request_state import EngineRequest
from expertmesh.models.loader import read_hf_config
from expertmesh.models.registry import get_model_class
from expertmesh.outputs import RequestOutput, RequestOutputKind
from expertmesh.parallel.apply import check_layout
from expertmesh.parallel.groups import RankInfo, free_port, rank_info_from_env
from expertmesh.parallel.launch import RankSetup, setup_rank, spawn_workers
from expertmesh.sampling_params import SamplingParams


class Engine(Protocol):
    """What LLM, the server's engine process and the benchmarks use of an engine."""

    tokenizer: Any
    runner: ModelRunner
    max_model_len: int

    def check_request(self, prompt: str | list[int], params: SamplingParams, priority: int = 0) -> EngineRequest: ...
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0, output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> str: ...
    def add(self, req: EngineRequest, request_id: str | None = None,
            output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> str: ...
    def abort_request(self, request_id: str) -> bool: ...
    def has_unfinished_requests(self) -> bool: ...
    def step(self) -> list[RequestOutput]: ...
    def run_to_completion(self, request_ids: list[str],
                          on_finish: Callable[[RequestOutput], None] | None = None) -> dict[str, RequestOutput]: ...
    def stats(self) -> dict[str, object]: ...
    def close(self) -> None: ...


def make_engine(config: EngineConfig) -> Engine:
    layout = config.parallel
    if layout.world_size == 1:
        return LLMEngine(config)
    hf = read_hf_config(config.model_path)
    check_layout(layout, get_model_class(hf).config_from_hf(hf))  # before any rank starts
    info = rank_info_from_env()
    procs = []
    if info is None:  # single host, started by us: this process is rank 0
        info = RankInfo(0, layout.world_size, "127.0.0.1", free_port())
        procs = spawn_workers(config, info, "expertmesh.engine.rank_worker")
    try:
        setup = setup_rank(config, info, procs)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    if info.rank != 0:
        run_rank(config, setup)
        raise SystemExit(0)
    try:
        runner = ModelRunner(config, setup)
    except BaseException:
        setup.close(graceful=False)
        raise
    return LLMEngine(config, runner) if layout.data_parallel_size == 1 else DPEngine(config, runner)


def run_rank(config: EngineConfig, setup: RankSetup) -> None:
    """A rank other than 0: a TP follower runs its leader's batches, a replica leader serves
    rank 0's commands; both until told to stop."""
    runner = ModelRunner(config, setup)
    graceful = True
    try:
        if setup.layout.is_replica_leader:
            serve_leader(LLMEngine(config, runner), setup)
        else:
            runner.follow()
    except BaseException:
        graceful = False
        raise
    finally:
        runner.close(graceful)
