"""Engine configuration, validated when it is made: the engine only ever sees valid values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from expertmesh._core import kv_blocks_per_rank
from expertmesh.errors import InvalidRequestError
from expertmesh.models.loader import DTYPES
from expertmesh.parallel.cpu_binding import parse_cpu_bind
from expertmesh.parallel.layout import CP_VARIANTS, ParallelConfig
from expertmesh.quant.config import check_method


def _positive(name: str, value: object, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    least = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidRequestError(f"{name} must be an integer >= {least}, got {value!r}", param=name, value=value)


@dataclass
class EngineConfig:
    """What the engine is asked to run and within which limits.

    model: a checkpoint directory (config.json, *.safetensors, tokenizer.json); None means the
    built-in tiny MoE. dtype: "auto" follows the checkpoint, but runs half types as fp32 on the
    CPU (models/loader.py). max_model_len: longest prompt + output; None means the checkpoint's
    max_position_embeddings. quantization: "int8" or "fp8" weights quantized at load (quant/);
    None serves the checkpoint as stored (an FP8 checkpoint as fp8). kv_cache_blocks: paged KV
    blocks of block_size tokens per rank (a replica's CP ranks each hold their own, so its pool
    is context_parallel_size times that); None means
    enough for max_num_seqs full-length sequences, capped by kv_cache_memory_bytes -- or, with
    gpu_memory_utilization (vLLM's spelling: the share of the device's memory, the GPU's on CUDA
    and the host's RAM on the CPU, for weights and KV cache together), by what the weights
    leave of that share, so memory quantization saves becomes KV blocks.
    """

    model: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    device: str = "cpu"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_blocks: int | None = None
    kv_cache_memory_bytes: int = 2 << 30
    gpu_memory_utilization: float | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # The parallel layout (parallel/layout.py): world size = TP x CP x DP; with expert parallelism
    # the experts are split over all of them. expert_parallel_size=R is the older spelling of
    # data_parallel_size=R with enable_expert_parallel. The transports ("auto": shared memory
    # for CPU ranks on one host, else torch.distributed) of the allreduce (TP) and all-to-all
    # (EP), tokens per rank per all-to-all call (None: the step's token budget; bigger steps
    # are split) and how long a collective may wait.
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # Context parallelism (parallel/context_parallel.py): sequences longer than cp_min_tokens
    # are split over context_parallel_size ranks; cp_variant "auto" picks pass-KV or pass-Q
    # per request, "pass-kv" / "pass-q" force one; the ring rides shared memory ("auto": CPU
    # ranks on one host) or torch.distributed send/recv.
    context_parallel_size: int = 1
    cp_min_tokens: int = 1024
    cp_variant: str = "auto"
    cp_transport: str = "auto"
    expert_parallel_size: int = 1
    allreduce: str = "auto"
    ep_transport: str = "auto"
    ep_max_tokens_per_rank: int | None = None
    ep_timeout_s: float = 60.0
    # Cores per CPU rank on one host (parallel/cpu_binding.py): "auto" splits them evenly,
    # "nobind" leaves torch's defaults, or "0-3|4-7" lists them per local rank (vLLM's spelling).
    cpu_bind: str = "auto"
    # Time each rank's steps by section (step_profile.py); stats() report it as step_breakdown.
    step_breakdown: bool = False
    show_progress: bool = True
    model_path: Path = field(init=False)
    parallel: ParallelConfig = field(init=False)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes"):
            _positive(name, getattr(self, name))
        _positive("max_model_len", self.max_model_len, allow_none=True)
        util = self.gpu_memory_utilization
        if util is not None and (isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1):
            raise InvalidRequestError(f"gpu_memory_utilization must be a number in (0, 1], got {util!r}",
                                      param="gpu_memory_utilization", value=util)
        _positive("expert_parallel_size", self.expert_parallel_size)
        _positive("ep_max_tokens_per_rank", self.ep_max_tokens_per_rank, allow_none=True)
        for name in ("ep_transport", "allreduce", "cp_transport"):
            if getattr(self, name) not in ("auto", "shm", "torch"):
                raise InvalidRequestError(f"{name} must be 'auto', 'shm' or 'torch', got {getattr(self, name)!r}",
                                          param=name, value=getattr(self, name))
        if self.expert_parallel_size > 1:
            if self.data_parallel_size not in (1, self.expert_parallel_size) or self.tensor_parallel_size != 1:
                raise InvalidRequestError(
                    f"expert_parallel_size={self.expert_parallel_size} means data_parallel_size="
                    f"{self.expert_parallel_size} with expert parallelism on; it cannot be combined with "
                    f"tensor_parallel_size={self.tensor_parallel_size}, data_parallel_size={self.data_parallel_size} "
                    f"(use enable_expert_parallel with those instead)",
                    param="expert_parallel_size", value=self.expert_parallel_size)
            self.data_parallel_size, self.enable_expert_parallel = self.expert_parallel_size, True
        parse_cpu_bind(self.cpu_bind)
        check_method(self.quantization)
        _positive("cp_min_tokens", self.cp_min_tokens, allow_zero=True)
        if self.cp_variant not in CP_VARIANTS:
            raise InvalidRequestError(f"cp_variant must be one of {list(CP_VARIANTS)}, got {self.cp_variant!r}",
                                      param="cp_variant", value=self.cp_variant)
        self.parallel = ParallelConfig(self.tensor_parallel_size, self.data_parallel_size, self.enable_expert_parallel,
                                       self.context_parallel_size)
        _positive("kv_cache_blocks", self.kv_cache_blocks, allow_none=True)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InvalidRequestError(
                f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}", param="dtype", value=self.dtype
            )
        if self.model is None:
            from expertmesh.default_model import default_model_path

            self.model_path = default_model_path()
        else:
            self.model_path = Path(self.model).expanduser()
            if not self.model_path.is_dir():
                raise InvalidRequestError(
                    f"model path {str(self.model_path)!r} is not a directory (expected a Hugging Face "
                    "checkpoint: config.json, *.safetensors, tokenizer.json)",
                    param="model",
                    value=self.model,
                )

    @property
    def cp_first_blocks(self) -> int:
        """Leading KV blocks of every sequence that CP rank 0 holds: those of a request too
        short for context parallelism (none without it)."""
        return -(-self.cp_min_tokens // self.block_size) if self.context_parallel_size > 1 else 0

    def resolve_max_model_len(self, max_position_embeddings: int) -> int:
        if self.max_model_len is None:
            return max_position_embeddings
        if self.max_model_len > max_position_embeddings:
            raise InvalidRequestError(
                f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                f"{max_position_embeddings}",
                param="max_model_len",
                value=self.max_model_len,
            )
        return self.max_model_len

    def resolve_kv_cache_blocks(self, max_model_len: int, bytes_per_block: int, weight_bytes: int = 0,
                                device_memory: int = 0) -> int:
        """Blocks for the KV cache: as asked, else enough for every sequence at full length
        within the memory budget (and at least one full-length sequence). The budget is
        kv_cache_memory_bytes, or gpu_memory_utilization x device_memory - weight_bytes."""
        # Blocks one rank holds of a full-length sequence: all of them, or under CP its busiest share.
        per_seq = kv_blocks_per_rank(math.ceil(max_model_len / self.block_size),
                                     context_parallel_size=self.context_parallel_size,
                                     cp_first_blocks=self.cp_first_blocks)
        if self.kv_cache_blocks is not None:
            blocks = self.kv_cache_blocks
        else:
            budget = self.kv_cache_memory_bytes
            if self.gpu_memory_utilization is not None:
                budget = int(self.gpu_memory_utilization * device_memory) - weight_bytes
                if budget < per_seq * bytes_per_block:
                    raise InvalidRequestError(
                        f"gpu_memory_utilization {self.gpu_memory_utilization} of {device_memory} bytes leaves "
                        f"{budget} bytes after the weights ({weight_bytes} bytes), less than one sequence of "
                        f"max_model_len {max_model_len} needs ({per_seq * bytes_per_block} bytes of KV cache)",
                        param="gpu_memory_utilization", value=self.gpu_memory_utilization)
            wanted = per_seq * self.max_num_seqs
            blocks = min(wanted, max(per_seq, budget // bytes_per_block))
        if blocks < per_seq:
            on_rank = f" on one of {self.context_parallel_size} context-parallel ranks" \
                if self.context_parallel_size > 1 else ""
            raise InvalidRequestError(
                f"kv_cache_blocks {blocks} cannot hold one sequence of max_model_len {max_model_len} "
                f"({per_seq} blocks of {self.block_size} tokens{on_rank}); raise kv_cache_blocks or lower "
                f"max_model_len",
                param="kv_cache_blocks",
                value=blocks,
            )
        return blocks
