"""Expert parallelism's two-shot all-to-all: dispatch (shot 1) and combine (shot 2).

The MoE layer calls `moe_forward(ep, x, weights, ids, num_experts, expert_fn)`; with EP off it
never comes here. Plans come from the Rust core (plan_dispatch, plan_receive, A2aCapacity);
rows move through `ep.transport` (transport.py, shm.py).

Per call (at most max_tokens_per_rank tokens from every rank; bigger steps are split into
chunks, and every rank runs the same number of chunks, an idle rank with zero tokens):
  dispatch: rows (token, destination) with the hidden state, the k slots' local expert ids
            (-1 = elsewhere) and the routing weights go to the ranks owning the experts.
  experts:  the receiver groups (row, slot) pairs by local expert, runs the expert MLPs and
            sums each row's slots with their weights in slot order (fp32).
  combine:  the partial sums return along the same rows; the source adds them per token in
            rank order. For top-2 that is the single-rank order of additions; the expert GEMMs
            see other batches than on one rank, so results agree to fp32 rounding.

Legend: T tokens, H hidden, k top-k, E experts, El experts per rank, R ranks, S rows sent,
S' rows received, Q valid (row, slot) pairs received.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from expertmesh._core import A2aCapacity, plan_dispatch, plan_receive
from expertmesh.parallel.transport import Received, Transport
from expertmesh.step_profile import StepProfile

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [Q, H], offsets [El+1]) -> [Q, H]


@dataclass
class ExpertParallel:
    """One rank's expert-parallel state, shared by all its MoE layers."""

    rank: int
    world_size: int
    transport: Transport
    max_tokens_per_rank: int
    profile: StepProfile = field(default_factory=StepProfile)  # the rank's step breakdown
    _capacity: dict[tuple[int, int], A2aCapacity] = field(default_factory=dict)
    _combine_out: torch.Tensor | None = None  # [T, H] fp32, see combine_buffer
    _step_tokens: int | None = None  # this step's tokens per MoE call on this rank, once agreed
    _step_max: int = 0  # the most tokens any rank has this step (agreed by the first MoE layer)

    def begin_step(self) -> None:
        """A new forward pass: its first MoE layer agrees on the chunk count with the other ranks
        and the others reuse it (one agreement per step instead of one per layer)."""
        self._step_tokens = None

    def step_max_tokens(self, num_tokens: int) -> int:
        """The largest token count over ranks this step; a collective on the step's first call."""
        if self._step_tokens is None:
            self._step_max, self._step_tokens = self.transport.all_max(num_tokens), num_tokens
        elif num_tokens != self._step_tokens:  # every layer of a step has the same tokens: a caller bug
            raise RuntimeError(f"MoE layer got {num_tokens} tokens after {self._step_tokens} in the same step; "
                               "call begin_step() before every forward pass")
        return self._step_max

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """[lo, hi) of the experts this rank owns."""
        if num_experts % self.world_size:
            raise ValueError(
                f"num_experts ({num_experts}) must be a multiple of expert_parallel_size ({self.world_size})"
            )
        per_rank = num_experts // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def combine_buffer(self, num_tokens: int, hidden: int, device: torch.device) -> torch.Tensor:
        """Zeroed [T, H] fp32 view of a buffer reused by every combine (valid until the next one).

        A fresh multi-MB tensor per call costs page faults every time (glibc maps big blocks
        anew), several times the cost of zeroing warm memory."""
        buf = self._combine_out
        if buf is None or buf.device != device or buf.shape[1] != hidden or buf.shape[0] < num_tokens:
            buf = self._combine_out = torch.empty((num_tokens, hidden), dtype=torch.float32, device=device)
        return buf[:num_tokens].zero_()

    def capacity(self, top_k: int, num_experts: int) -> A2aCapacity:
        key = (top_k, num_experts)
        if key not in self._capacity:
            self._capacity[key] = A2aCapacity(max_tokens_per_rank=self.max_tokens_per_rank, top_k=top_k,
                                              num_experts=num_experts, num_ranks=self.world_size)
        return self._capacity[key]


@dataclass
class Dispatched:
    """What a rank received in shot 1, and what combine needs to send it back."""

    x: Received  # [S', H] received hidden states, possibly still in the transport's buffer
    local_experts: torch.Tensor  # [S', k] int64 local expert ids, -1 = not for this rank
    weights: torch.Tensor  # [S', k] fp32 routing weights
    recv_counts: list[int]  # [R] rows from each source
    send_counts: list[int]  # [R] rows this rank sent to each destination
    send_token_ids: torch.Tensor  # [S] token of each sent row (the combine map)


def dispatch(ep: ExpertParallel, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             num_experts: int) -> Dispatched:
    """Shot 1 for at most max_tokens_per_rank tokens: x [T, H], weights/ids [T, k]."""
    plan = plan_dispatch(ids.to(torch.int32).cpu().numpy(), num_experts, ep.world_size)
    ep.capacity(ids.shape[1], num_experts).check_send_counts(plan.send_counts)
    send_token_ids = torch.from_numpy(plan.send_token_ids).to(x.device)  # [S]
    local = torch.from_numpy(plan.send_local_experts).to(x.device)  # [S, k]
    send_counts = plan.send_counts.tolist()
    # The transport gathers the sent rows itself (shared memory: straight into the peer's slot)
    # and may leave received rows where they landed, so the [S, H] hidden states are copied once.
    (rx, rl, rw), recv_counts = ep.transport.exchange_rows(
        [x, local, weights.float()], send_counts, gather=[send_token_ids, None, send_token_ids]
    )  # [S', H], [S', k], [S', k]
    return Dispatched(rx, rl.compact(), rw.compact(), recv_counts, send_counts, send_token_ids)


def run_local_experts(ep: ExpertParallel, d: Dispatched, expert_fn: ExpertFn, num_experts: int) -> torch.Tensor:
    """Expert MLPs over the received rows; returns per-row weighted sums [S', H] fp32."""
    rows, k = d.local_experts.shape
    hidden, device = d.x.base.shape[1], d.x.base.device
    if rows == 0:
        return torch.zeros((0, hidden), dtype=torch.float32, device=device)
    per_rank = num_experts // ep.world_size
    rp = plan_receive(d.recv_counts, d.local_experts.cpu().numpy(), per_rank)
    pairs = torch.from_numpy(rp.sorted_pair_ids).to(device)  # [Q] row * k + slot
    offsets = torch.from_numpy(rp.expert_offsets).to(device)  # [El+1]
    y = expert_fn(d.x.take(pairs // k), offsets)  # [Q, H]
    slots = torch.zeros((rows * k, hidden), dtype=torch.float32, device=device)  # [S'*k, H]
    slots[pairs] = y.float() * d.weights.reshape(-1)[pairs].unsqueeze(-1)
    # Sum in slot order with zeros for other ranks' slots: the single-rank order of operations.
    return slots.view(rows, k, hidden).sum(dim=1)  # [S', H]


def combine(ep: ExpertParallel, d: Dispatched, partial: torch.Tensor | Received, num_tokens: int) -> torch.Tensor:
    """Shot 2: send partial sums [S', H] fp32 back; returns the per-token sum [T, H] fp32, a view
    of a buffer the next combine on `ep` overwrites (moe_forward copies it out at once).

    `partial` may be a Received (rows sent back as they arrived, as bench/comm does)."""
    base, gather = (partial.base, partial.rows) if isinstance(partial, Received) else (partial, None)
    out = ep.combine_buffer(num_tokens, base.shape[1], base.device)  # [T, H] zeroed
    ep.transport.exchange_add(base, d.recv_counts, d.send_counts, out, d.send_token_ids, gather=gather)
    return out


def moe_forward(ep: ExpertParallel, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                num_experts: int, expert_fn: ExpertFn) -> torch.Tensor:
    """The expert half of an MoE layer across ranks: x [T, H] -> [T, H] in x's dtype.

    Every rank of the group must call this for the same layers in the same order, T = 0 included,
    after ep.begin_step() at the start of each forward pass.
    """
    num_tokens, top_k = ids.shape
    cap = ep.capacity(top_k, num_experts)
    chunk = cap.max_tokens_per_rank
    num_chunks = cap.num_chunks(ep.step_max_tokens(num_tokens))  # every rank runs this many calls
    if num_chunks == 1:  # decode and small prefills: no chunk copies
        return _one_call(ep, x, weights, ids, num_experts, expert_fn).to(x.dtype)
    out = torch.empty((num_tokens, x.shape[1]), dtype=x.dtype, device=x.device)
    for c in range(num_chunks):
        lo, hi = min(c * chunk, num_tokens), min((c + 1) * chunk, num_tokens)  # may be empty here
        out[lo:hi] = _one_call(ep, x[lo:hi], weights[lo:hi], ids[lo:hi], num_experts, expert_fn).to(x.dtype)
    return out


def _one_call(ep: ExpertParallel, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
              expert_fn: ExpertFn) -> torch.Tensor:
    """Dispatch, experts and combine for at most max_tokens_per_rank tokens: [T, H] fp32, a view
    of the combine buffer (valid until the next call)."""
    if ep.transport.fused_moe:  # shared memory: the exchanges are two Rust calls
        summed = ep.combine_buffer(x.shape[0], x.shape[1], x.device)  # [T, H] fp32 zeroed
        ep.transport.moe_exchange(x, weights, ids, num_experts, expert_fn, summed)
        return summed
    with ep.profile.section("all_to_all"):
        d = dispatch(ep, x, weights, ids, num_experts)
    partial = run_local_experts(ep, d, expert_fn, num_experts)
    with ep.profile.section("all_to_all"):
        return combine(ep, d, partial, x.shape[0])


def tokens_per_rank(tokens_per_expert: np.ndarray, world_size: int) -> np.ndarray:
    """[E] routed tokens per expert -> [R] per owning rank (load imbalance at a glance)."""
    return tokens_per_expert.reshape(world_size, -1).sum(axis=1)
