"""The parallel layout: how many ranks, and what each one holds.

`ParallelConfig` is validated where it is made (the engine config, the CLI): world size =
TP x CP x DP. Rank r sits at tensor-parallel rank r % TP, context-parallel rank (r // TP) % CP
of data-parallel replica r // (TP x CP). Attention is tensor-parallel inside a replica (heads
split over its TP ranks), context-parallel across its CP ranks (each holds part of every long
sequence's tokens and KV: context_parallel.py) and data-parallel across replicas (each replica
its own requests and KV cache). With expert parallelism on, the experts
are split over all TP x DP ranks (as in vLLM: EP size = TP x DP); with it off, every expert's
intermediate dimension is split over the TP ranks, like a dense MLP's.

`check_model(cfg)` refuses a layout the model cannot take, naming the sizes.

Legend: R world size, TP tensor-parallel ranks, CP context-parallel ranks, DP data-parallel replicas, NH/NKV heads, E
experts, I intermediate size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.errors import InvalidRequestError


def _fail(param: str, message: str, value: object) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, value=value)


def split(total: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part `index` when `total` items are cut into `parts` near-equal runs (the
    first total % parts runs one longer): how an uneven vocabulary is split."""
    base, extra = divmod(total, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


CP_VARIANTS = ("auto", "pass-kv", "pass-q")  # how context-parallel attention moves data (context_parallel.py)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    context_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size", "context_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _fail(name, f"{name} must be an integer >= 1, got {value!r}", value)
        if not isinstance(self.enable_expert_parallel, bool):
            raise _fail("enable_expert_parallel", f"enable_expert_parallel must be true or false, got "
                                                  f"{self.enable_expert_parallel!r}", self.enable_expert_parallel)
        if self.data_parallel_size > 1 and not self.enable_expert_parallel:
            raise _fail("data_parallel_size", f"data_parallel_size {self.data_parallel_size} needs "
                                              f"--enable-expert-parallel: replicas without it would hold every "
                                              f"expert each (run separate servers behind a router instead)",
                        self.data_parallel_size)

    @property
    def replica_size(self) -> int:
        """Ranks of one replica: its TP x CP ranks, which run one scheduler's batches."""
        return self.tensor_parallel_size * self.context_parallel_size

    @property
    def world_size(self) -> int:
        return self.replica_size * self.data_parallel_size

    @property
    def expert_parallel_size(self) -> int:
        return self.world_size if self.enable_expert_parallel else 1

    def check_world(self, world_size: int) -> None:
        """WORLD_SIZE from the launcher must equal TP x CP x DP."""
        if world_size != self.world_size:
            raise _fail("tensor_parallel_size", f"the layout needs tensor_parallel_size x context_parallel_size x "
                                                f"data_parallel_size = {self.tensor_parallel_size} x "
                                                f"{self.context_parallel_size} x {self.data_parallel_size} = "
                                                f"{self.world_size} ranks, but WORLD_SIZE is {world_size}", world_size)

    def check_model(self, num_heads: int, num_kv_heads: int, num_experts: int, moe_intermediate: int,
                    dense_intermediates: tuple[int, ...] = ()) -> None:
        """InvalidRequestError naming the sizes when the model cannot be split this way."""
        tp = self.tensor_parallel_size
        if num_heads % tp:
            raise _fail("tensor_parallel_size", f"num_attention_heads {num_heads} must be divisible by "
                                                f"tensor_parallel_size {tp}", tp)
        if num_kv_heads % tp and tp % num_kv_heads:
            raise _fail("tensor_parallel_size", f"num_key_value_heads {num_kv_heads} and tensor_parallel_size {tp}: "
                                                f"one must divide the other (KV heads are split, or replicated "
                                                f"when there are fewer than TP ranks)", tp)
        if self.enable_expert_parallel and num_experts % self.world_size:
            raise _fail("enable_expert_parallel", f"num_experts {num_experts} must be divisible by the expert-"
                                                  f"parallel size {self.world_size} (TP {tp} x CP "
                                                  f"{self.context_parallel_size} x DP {self.data_parallel_size})",
                        num_experts)
        if not self.enable_expert_parallel and moe_intermediate % tp:
            raise _fail("tensor_parallel_size", f"the experts' intermediate size {moe_intermediate} must be "
                                                f"divisible by tensor_parallel_size {tp}", tp)
        for size in dense_intermediates:
            if size % tp:
                raise _fail("tensor_parallel_size", f"a dense MLP's intermediate size {size} must be divisible by "
                                                    f"tensor_parallel_size {tp}", tp)

    def rank(self, global_rank: int) -> RankLayout:
        return RankLayout(self, global_rank)


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits in a ParallelConfig."""

    config: ParallelConfig
    global_rank: int

    @property
    def tp_rank(self) -> int:
        return self.global_rank % self.config.tensor_parallel_size

    @property
    def cp_rank(self) -> int:
        return self.global_rank // self.config.tensor_parallel_size % self.config.context_parallel_size

    @property
    def dp_rank(self) -> int:
        return self.global_rank // self.config.replica_size

    @property
    def replica_ranks(self) -> list[int]:
        """Global ranks of this rank's replica (TP x CP of them), leader first."""
        size = self.config.replica_size
        return list(range(self.dp_rank * size, (self.dp_rank + 1) * size))

    @property
    def tp_ranks(self) -> list[int]:
        """Global ranks of this rank's tensor-parallel group (same replica and CP rank), TP rank 0 first."""
        tp = self.config.tensor_parallel_size
        start = self.replica_ranks[0] + self.cp_rank * tp
        return list(range(start, start + tp))

    @property
    def cp_ranks(self) -> list[int]:
        """Global ranks of this rank's context-parallel ring (same replica and TP rank), CP rank 0 first."""
        tp = self.config.tensor_parallel_size
        return [self.replica_ranks[0] + c * tp + self.tp_rank for c in range(self.config.context_parallel_size)]

    @property
    def is_replica_leader(self) -> bool:
        """The replica's first rank (TP and CP rank 0): it schedules and samples; its peers only run
        the model."""
        return self.tp_rank == 0 and self.cp_rank == 0
