"""Type stubs for ``expertmesh._core``, the Rust core (rust/src/py/).

Legend: N scheduled requests, T tokens computed this step, S requests that sample this step,
MB block-table columns, E experts, k experts per token, R ranks, El = E / R experts per rank,
S_send / S_recv rows a rank sends / receives in one expert-parallel all-to-all, Q (row, slot)
pairs a rank's experts compute.
"""

from collections.abc import Sequence
from typing import Any, Self, final

import numpy as np
import numpy.typing as npt

from expertmesh.errors import CoreError as CoreError

__all__ = [
    "CoreError", "MAX_TOKEN_ID", "Scheduler", "SchedulerOutput", "kv_blocks_per_rank", "RoutingPlan", "route",
    "DispatchPlan", "ReceivePlan", "A2aCapacity", "PhaseRing", "PhaseHandle", "plan_dispatch", "plan_receive",
    "ShmRows", "MoeDispatch", "paged_attention", "quant_linear", "use_openmp",
]

_IntArray = npt.NDArray[np.integer[Any]]

MAX_TOKEN_ID: int
"""The largest token id the core stores (2**31 - 1); bigger ids are refused with CoreError."""

@final
class Scheduler:
    """Continuous batching over a paged KV cache with prefix caching.

    Each step: ``out = schedule()``, run the model on ``out``, then ``update(sampled)`` with one
    token per ``out.sample_request_ids`` entry. Decodes are scheduled first, then chunked
    prefills (running ones first, then waiting requests in (priority, arrival) order; lower
    priority value = more urgent) under ``max_num_batched_tokens`` and ``max_num_seqs``. When KV
    blocks run out, the least urgent (then newest) running request is preempted and later
    recomputed. schedule() and update() release the GIL.
    """

    def __new__(
        cls,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        context_parallel_size: int = 1,
        cp_first_blocks: int = 0,
    ) -> Self:
        """Raises CoreError if a size is < 1 (or num_blocks / max_model_len >= 2**31). With
        context_parallel_size N > 1 the pool is split into N equal runs of block ids, one per
        CP rank (num_blocks must divide by N); block i of a sequence comes from the run of the
        rank the placement gives it: rank 0 for i < cp_first_blocks, then a zigzag over
        periods of 2N (rank j for offset j < N, 2N-1-j otherwise)."""
    def add_request(
        self,
        request_id: int,
        prompt_token_ids: Sequence[int] | _IntArray,
        *,
        max_tokens: int,
        stop_token_ids: Sequence[int] = ...,
        eos_token_id: int | None = None,
        ignore_eos: bool = False,
        priority: int = 0,
    ) -> None:
        """Queues a request. Raises CoreError for a duplicate id, an empty prompt, a token id
        outside [0, 2**31 - 1], max_tokens < 1, prompt_len + max_tokens > max_model_len, or a
        request whose KV (prompt_len + max_tokens - 1 tokens) can never fit in num_blocks (or,
        split over CP ranks, in one rank's run)."""
    def schedule(self) -> SchedulerOutput:
        """Picks this step's batch. Raises CoreError if the previous non-empty step has not
        been passed to update() (or all its requests finished)."""
    def update(self, sampled_token_ids: Sequence[int] | _IntArray) -> list[tuple[int, str]]:
        """Appends one sampled token per entry of the last ``sample_request_ids`` (same order;
        tokens of requests finished in between are dropped), caches newly computed full
        blocks, and returns the requests that finished as (request_id, "stop" | "length")."""
    def finish_request(self, request_id: int, reason: str) -> bool:
        """Ends a request in any state (reason "stop", "abort" or "error") and frees its
        blocks. Returns False for an unknown id."""
    def abort(self, request_id: int) -> bool:
        """``finish_request(request_id, "abort")``."""
    def cached_prefix_blocks(self, token_ids: Sequence[int] | _IntArray) -> list[int]:
        """Block ids of the longest cached prefix of ``token_ids`` (at most (len - 1) // block_size
        blocks: one token is always computed). Raises CoreError for an empty list or a bad id."""
    def pin_prefix(self, transfer_id: int, token_ids: Sequence[int] | _IntArray) -> list[int]:
        """Pins ``cached_prefix_blocks(token_ids)`` under ``transfer_id`` until ``unpin``: no
        allocation evicts them meanwhile. Raises CoreError if the id already holds pins."""
    def import_prefix(
        self, transfer_id: int, token_ids: Sequence[int] | _IntArray, have: int, count: int
    ) -> tuple[int, list[int]]:
        """Registers prompt blocks ``[have, have + count)`` in the prefix cache, pinned under
        ``transfer_id`` until ``unpin``: returns (index of the first block registered, block ids)
        whose KV the caller writes before unpinning. Registers none if the first ``have`` blocks
        are no longer cached, starts later if more are, stops at the free blocks there are.
        Raises CoreError if ``have + count`` passes the blocks a prefix hit can use."""
    def unpin(self, transfer_id: int) -> bool:
        """Releases a transfer's pins (the blocks stay cached); False if it holds none."""
    def discard(self, transfer_id: int) -> bool:
        """Releases a transfer's pins and drops its blocks from the prefix cache (imported
        blocks whose KV could not be written); False if it holds none."""
    @property
    def num_pinned_transfers(self) -> int: ...
    def has_unfinished(self) -> bool: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def blocks_per_rank(self) -> int:
        """Blocks in each CP rank's run of ids (num_blocks without context parallelism)."""
    def stats(self) -> dict[str, int]:
        """prefix_cache_queries and prefix_cache_hits (both in tokens, counted once per
        admission), num_preemptions, num_free_blocks, num_cached_blocks."""
    def output_token_ids(self, request_id: int) -> list[int]:
        """Tokens generated so far by a live request, or by one finished since the last
        schedule(). Raises CoreError for an unknown id."""

@final
class SchedulerOutput:
    """One step's batch. Arrays are owned by numpy (no copy was made)."""

    @property
    def request_ids(self) -> npt.NDArray[np.uint64]:
        """[N] scheduled requests, in batch order (decodes, running prefills, new requests)."""
    @property
    def input_ids(self) -> npt.NDArray[np.int32]:
        """[T] tokens to compute."""
    @property
    def positions(self) -> npt.NDArray[np.int32]:
        """[T] position of each token in its sequence."""
    @property
    def slot_mapping(self) -> npt.NDArray[np.int64]:
        """[T] block_id * block_size + offset in block."""
    @property
    def query_start_loc(self) -> npt.NDArray[np.int32]:
        """[N+1] prefix sums of per-request new tokens."""
    @property
    def seq_lens(self) -> npt.NDArray[np.int32]:
        """[N] tokens in KV after this step (context + new)."""
    @property
    def block_tables(self) -> npt.NDArray[np.int32]:
        """[N, MB] block ids, padded with 0 (MB = most blocks of any scheduled request)."""
    @property
    def sample_request_ids(self) -> npt.NDArray[np.uint64]:
        """[S] requests that sample a token this step (those computing their last token)."""
    @property
    def logits_indices(self) -> npt.NDArray[np.int32]:
        """[S] index into T of each sampling request's last token."""
    @property
    def num_prefill_tokens(self) -> int: ...
    @property
    def num_decode_tokens(self) -> int: ...
    @property
    def is_empty(self) -> bool:
        """T == 0."""

@final
class RoutingPlan:
    """Where each (token, slot) pair p = token * k + slot of ``topk_ids`` goes."""

    @property
    def sorted_pair_ids(self) -> npt.NDArray[np.int64]:
        """[T*k] pair ids sorted by expert; stable (token order within an expert)."""
    @property
    def pair_positions(self) -> npt.NDArray[np.int64]:
        """[T*k] inverse: position of pair p in sorted order."""
    @property
    def tokens_per_expert(self) -> npt.NDArray[np.int64]:
        """[E] pairs per expert."""
    @property
    def expert_offsets(self) -> npt.NDArray[np.int64]:
        """[E+1] expert e's pairs are sorted_pair_ids[offsets[e]:offsets[e+1]]."""
    @property
    def rank_send_counts(self) -> npt.NDArray[np.int64]:
        """[R] distinct tokens sent to each rank (rank r owns experts [r*E/R, (r+1)*E/R))."""

def kv_blocks_per_rank(num_blocks: int, *, context_parallel_size: int, cp_first_blocks: int) -> int:
    """The most of a sequence's first num_blocks KV blocks that one CP rank holds under the
    Scheduler's placement. Raises CoreError if context_parallel_size < 1 or a value is < 0."""

def route(topk_ids: npt.NDArray[np.int32] | npt.NDArray[np.int64], num_experts: int, num_ranks: int = 1) -> RoutingPlan:
    """Builds the routing plan for ``topk_ids`` [T, k] (int32 or int64). Raises CoreError if an
    id is outside [0, num_experts) or num_experts % num_ranks != 0. Releases the GIL."""

@final
class DispatchPlan:
    """Shot 1 of the expert-parallel all-to-all on the sending side. A row is one (token,
    destination rank): a token goes once to a rank even when several of its experts live there."""

    @property
    def send_token_ids(self) -> npt.NDArray[np.int64]:
        """[S_send] token of each row, grouped by destination (rank 0 first), token order within.
        Also the combine map: returned row i is added into token send_token_ids[i]."""
    @property
    def send_local_experts(self) -> npt.NDArray[np.int64]:
        """[S_send, k] each slot's expert as a local id on the destination, -1 if it lives elsewhere."""
    @property
    def send_counts(self) -> npt.NDArray[np.int64]:
        """[R] rows sent to each rank."""
    @property
    def send_offsets(self) -> npt.NDArray[np.int64]:
        """[R+1] rank r's rows are send_token_ids[send_offsets[r]:send_offsets[r+1]]."""

def plan_dispatch(
    topk_ids: npt.NDArray[np.int32] | npt.NDArray[np.int64], num_experts: int, num_ranks: int
) -> DispatchPlan:
    """Plans shot 1 for topk_ids [T, k]; rank r owns experts [r*E/R, (r+1)*E/R). Raises CoreError
    for an id outside [0, num_experts) or num_experts % num_ranks != 0. Releases the GIL."""

@final
class ReceivePlan:
    """Shot 1 on the receiving side: where each source's rows landed and the grouping by local expert."""

    @property
    def recv_offsets(self) -> npt.NDArray[np.int64]:
        """[R+1] prefix sums of the received counts: source s's rows are [off[s], off[s+1])."""
    @property
    def sorted_pair_ids(self) -> npt.NDArray[np.int64]:
        """[Q] valid pairs row * k + slot sorted by local expert (stable)."""
    @property
    def tokens_per_expert(self) -> npt.NDArray[np.int64]:
        """[El] pairs per local expert."""
    @property
    def expert_offsets(self) -> npt.NDArray[np.int64]:
        """[El+1] local expert e's pairs are sorted_pair_ids[off[e]:off[e+1]]."""

def plan_receive(
    recv_counts: Sequence[int] | _IntArray,
    recv_local_experts: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    experts_per_rank: int,
) -> ReceivePlan:
    """Plans the receiver's side from the counts [R] every source sent and the received local
    expert ids [S_recv, k]. Raises CoreError for a negative count, a length mismatch, an id outside
    [-1, experts_per_rank) or a row with no valid slot. Releases the GIL."""

@final
class A2aCapacity:
    """Worst-case sizes of the all-to-all buffers when a rank puts at most max_tokens_per_rank
    tokens into one call (bigger steps are split into num_chunks calls)."""

    def __new__(cls, *, max_tokens_per_rank: int, top_k: int, num_experts: int, num_ranks: int) -> Self:
        """Raises CoreError if a size is < 1, experts do not split evenly or top_k > num_experts."""
    @property
    def max_tokens_per_rank(self) -> int: ...
    @property
    def experts_per_rank(self) -> int: ...
    @property
    def slot_rows(self) -> int:
        """Rows one source writes into one receiver's slot per call at most (= max_tokens_per_rank)."""
    @property
    def max_send_rows(self) -> int:
        """max_tokens_per_rank * min(k, R)."""
    @property
    def max_recv_rows(self) -> int:
        """max_tokens_per_rank * R."""
    @property
    def max_recv_pairs(self) -> int:
        """max_recv_rows * min(k, El)."""
    def recv_buffer_bytes(self, row_bytes: int, num_phases: int) -> int:
        """num_phases * R * slot_rows * row_bytes."""
    def num_chunks(self, max_tokens_any_rank: int) -> int:
        """ceil(max_tokens_any_rank / max_tokens_per_rank)."""
    def check_send_counts(self, send_counts: Sequence[int] | _IntArray) -> None:
        """Raises CoreError naming the rank whose count exceeds slot_rows."""

@final
class PhaseHandle:
    """An owned claim on one buffer phase for one call; give it back with PhaseRing.release."""

    @property
    def phase(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def released(self) -> bool: ...

@final
class PhaseRing:
    """Double-buffer bookkeeping: call n uses phase n % num_phases, and a phase is not handed out
    again until the handle of the call holding it was released."""

    def __new__(cls, num_phases: int = 2) -> Self: ...
    def acquire(self) -> PhaseHandle:
        """Claims the next call's phase. Raises CoreError if that phase is still in flight."""
    def release(self, handle: PhaseHandle) -> None:
        """Gives a phase back. Raises CoreError for a handle from another ring or released twice."""
    @property
    def num_phases(self) -> int: ...
    @property
    def next_seq(self) -> int: ...
    @property
    def num_in_flight(self) -> int: ...

@final
class MoeDispatch:
    """What a shared-memory MoE dispatch received; ShmRows.combine_moe takes it back."""

    @property
    def pair_rows(self) -> npt.NDArray[np.int64]:
        """[Q] slot row of each (row, slot) pair's hidden state, pairs grouped by local expert."""
    @property
    def expert_offsets(self) -> npt.NDArray[np.int64]:
        """[El+1] exclusive prefix sums of pairs per local expert."""
    @property
    def send_counts(self) -> list[int]: ...
    @property
    def recv_counts(self) -> list[int]: ...
    @property
    def num_pairs(self) -> int: ...

@final
class ShmRows:
    """One rank's end of the shared-memory all-to-all's data path (parallel/shm.py lays out and
    maps the segments; this moves the rows, with the GIL released).

    Unsafe contract: `segments` are the addresses of every rank's mapped segment (8-aligned,
    laid out as shm.py's module docstring says), kept mapped while this object is used;
    every source address points at `rows` rows of `width` bytes, `stride` bytes apart."""

    def __new__(cls, segments: list[int], rank: int, slot_rows: int, max_row_bytes: int, pids: list[int],
                timeout_s: float, num_phases: int = 2) -> Self: ...
    @property
    def segment_bytes(self) -> int: ...
    def send(self, phase: int, seq: int,
             sources: list[tuple[int, int, int, int, npt.NDArray[np.int64] | None]],
             send_counts: list[int], packed: bool) -> None:
        """Writes send rows offsets[r]..offsets[r+1] (sources side by side; each source is
        (address, row stride, row bytes, rows, gather index or None)) into rank r's slot
        [phase, me], then publishes flag seq + 1. CoreError for rows too wide, too many rows for
        a slot or a gather index out of range (nothing is written then)."""
    def wait(self, phase: int, seq: int) -> list[int]:
        """Rows each source sent once all of them published call seq. CollectiveError when a
        peer's process died (within about a second) or after timeout_s."""
    def dispatch_moe(self, phase: int, seq: int, x: tuple[int, int, int, int], ids: npt.NDArray[np.int64],
                     weights: npt.NDArray[np.float32], num_experts: int) -> MoeDispatch:
        """Expert parallelism's shot 1 in one call: x is (address, row stride, row bytes, T)
        of the hidden rows, ids / weights the [T, k] routing. Plans, writes every destination's
        rows [hidden | local ids | weights], waits, plans the receive side. CoreError for bad
        ids or lengths, CollectiveError for a dead or silent peer."""
    def gather_pairs(self, phase: int, dispatched: MoeDispatch, out: npt.NDArray[np.uint8]) -> None:
        """Copies every pair's hidden row (out's row width in bytes) out of phase `phase`'s
        slots into out [Q, row bytes], in the dispatch's pair order."""
    def combine_moe(self, phase: int, seq: int, dispatched: MoeDispatch, y: npt.NDArray[np.float32],
                    out: npt.NDArray[np.float32]) -> None:
        """Shot 2 in one call: y [Q, H] f32 expert outputs in pair order; each received row's
        weighted sum over its slots goes back to its source, and what comes back is added into
        out [T, H] (zeroed by the caller), sources in rank order."""
    @property
    def waited_s(self) -> float:
        """Seconds spent waiting for peers since this object was made."""
    def add_rows_f32(self, phase: int, counts: list[int], out: npt.NDArray[np.float32],
                     index: npt.NDArray[np.int64]) -> None:
        """out[index[j]] += received packed f32 row j, sources in rank order. CoreError for an
        index out of range."""

def quant_linear(
    code: str,
    dtype: str,
    out: int,
    x: int,
    q: int,
    scale: int,
    dims: tuple[int, int, int, int, int],
    threads: int = 1,
) -> None:
    """out [M, N] = x [M, K] @ dequant(q).T for a quantized weight q [N, K] with scales [N, KB]
    (row n's scale for K-block b; dims = (M, N, K, block_k, col_offset)), on the CPU. ``code``
    says what q's bytes are: "fp8" (e4m3fn) or "int8" (then one block per row: block_k = K).

    ``out``, ``x`` (``dtype``: "float32" or "bfloat16"), ``q`` (bytes) and ``scale`` (fp32) are
    addresses of contiguous CPU tensors. Use expertmesh_kernels.quant, which checks them; this
    checks the sizes (CoreError naming them). Releases the GIL; runs on ``threads`` workers."""

def paged_attention(
    dtype: str,
    out: int,
    q: int,
    k_cache: int,
    v_cache: int,
    dims: tuple[int, int, int, int, int, int],
    block_tables: npt.NDArray[np.int32],
    query_start_loc: npt.NDArray[np.int32],
    seq_lens: npt.NDArray[np.int32],
    scale: float,
    sliding_window: int | None = None,
    lse: int | None = None,
    threads: int = 1,
) -> None:
    """Causal attention over the paged KV cache, reading the blocks in place (CPU).

    ``out``, ``q``, ``k_cache``, ``v_cache`` (and ``lse``) are addresses of contiguous CPU
    tensors of ``dtype`` ("float32" or "bfloat16"; lse fp32) with dims = (T, NH, NKV, D, NB, B):
    q/out [T, NH, D], caches [NB, B, NKV, D], lse [T, NH]. block_tables [N, MB],
    query_start_loc [N+1], seq_lens [N]. Use expertmesh_kernels.cpu_attention, which checks the
    tensors; this checks every index value (CoreError naming it). Releases the GIL; runs on
    ``threads`` workers."""

def use_openmp(library: str) -> None:
    """Run the core's parallel CPU loops on the OpenMP runtime at ``library`` (torch's libgomp,
    which must already be loaded) instead of a thread pool of their own. CoreError naming the
    path if it is not loaded or is not libgomp."""

def _panic_for_tests(message: str) -> None:
    """Panics in Rust (GIL released); raises pyo3's PanicException. For tests only."""
