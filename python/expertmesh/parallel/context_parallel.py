"""Context parallelism: long sequences' tokens and KV split over a replica's CP ranks.

Placement is by KV block, from the block's index in its sequence, so it never changes while a
sequence grows (rust/src/kv_placement.rs): the first m = ceil(cp_min_tokens / B) blocks live on
CP rank 0, the rest go round in a zigzag over periods of 2N that balances causal work (rank i
holds pieces i and 2N-1-i of every 2N). The scheduler's pool gives each CP rank its own run of
P block ids and allocates every block from its rank's run, so a block id names its rank (id //
P) and each rank's KV cache holds only its P blocks. A token lives with its block: the block's
owner computes the token's hidden state and writes its KV, so decode appends and chunked-prefill
chunks spread by the same rule, and a prefix-cache hit finds each cached block's KV on the rank
that owns it. (The published scheme cuts a prompt into 2N equal chunks; those chunks move
whenever the sequence grows, and the cached KV would have to move with them.)

A request is context-parallel when its sequence (context + new tokens) is longer than
cp_min_tokens. A shorter one only has blocks below m, so it lives wholly on rank 0, which runs
it with ordinary paged attention. Every rank of the replica receives the whole batch and plans
the same `CpStep`: which tokens it computes (plain requests' first, rank 0 only; then those of
pass-KV requests; then those of pass-Q requests), and what every peer holds -- so each ring
message's size and contents are known to both ends and nothing but tensors is exchanged.

Variant per request (ring_attention.py runs both in one ring): pass-KV (KV travels, queries
stay) when new / (new + cached) >= 2 NKV / NH, else pass-Q (queries travel, partial outputs
come back): the rule of Yang et al., "Context Parallelism for Scalable Million-Token
Inference" (2024), which compares the bytes each would send. `cp_variant` forces one.
bench/cp found it never measurably wrong on CPU ranks: pass-Q wins for short appends, and
where the rule picks pass-KV the two cost the same (attention dwarfs the bytes).

Legend: T tokens, N requests, S sampled rows, B block size, P blocks per rank, L KV tokens a rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from expertmesh.parallel.layout import CP_VARIANTS
from expertmesh.parallel.ring_attention import TorchRing, ring_attention
from expertmesh.parallel.shm_ring import ShmRing
from expertmesh_kernels import ops

PASS_KV, PASS_Q = CP_VARIANTS[1:]


@dataclass
class Holding:
    """What one CP rank holds of a step's context-parallel requests; each part lists pass-KV
    requests' rows first (batch order), then pass-Q requests'."""

    kv_pos: np.ndarray  # [L] positions of the KV tokens it holds
    kv_req: np.ndarray  # [L] their requests (batch index)
    kv_split: int  # rows of kv_* that belong to pass-KV requests
    q_index: np.ndarray  # [Tc] batch token index of the new tokens it computes
    q_pos: np.ndarray  # [Tc] their positions
    q_req: np.ndarray  # [Tc] their requests
    q_split: int  # rows of q_* that belong to pass-KV requests


def pairs(q_req: np.ndarray, k_req: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(q_lo, q_hi, k_lo, k_hi) for every request present in both sorted row lists."""
    out = []
    for n in np.intersect1d(q_req, k_req):
        q_lo, q_hi = np.searchsorted(q_req, n), np.searchsorted(q_req, n, side="right")
        k_lo, k_hi = np.searchsorted(k_req, n), np.searchsorted(k_req, n, side="right")
        out.append((int(q_lo), int(q_hi), int(k_lo), int(k_hi)))
    return out


@dataclass
class CpStep:
    """One step's plan as seen from one CP rank."""

    local: np.ndarray  # [Tl] batch token index of each token this rank computes
    num_plain: int  # the first num_plain of them belong to plain requests (rank 0 only)
    plain_reqs: np.ndarray  # [Np] batch index of the plain requests (rank 0; none elsewhere)
    holdings: list[Holding]  # what every CP rank holds, by CP rank
    own_slots: torch.Tensor  # [L] int64 slots in this rank's cache of its KV tokens (holdings[rank].kv_*)
    sample_owner: np.ndarray  # [S] CP rank holding each sampled row's hidden state
    sample_local: np.ndarray  # [S] its index in that rank's local tokens
    requests: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> [Nv] batch index of its CP requests
    kv_pairs: dict[int, list] = field(default_factory=dict)  # src -> pairs(my pass-KV q, src's pass-KV KV)
    q_pairs: dict[int, list] = field(default_factory=dict)  # src -> pairs(src's pass-Q q, my pass-Q KV)
    returns_from: list[int] = field(default_factory=list)  # peers whose KV my pass-Q queries see (they send partials)

    @property
    def has_cp(self) -> bool:
        return bool(self.requests)


def plan_step(batch, rank: int, cp_size: int, min_tokens: int, block_size: int, blocks_per_rank: int,
              variant: str, num_heads: int, num_kv_heads: int) -> CpStep:
    """The step's placement and ring contents, the same on every CP rank (from the same batch)."""
    bsz = block_size
    qsl = np.asarray(batch.query_start_loc, dtype=np.int64)  # [N+1]
    seq_lens = np.asarray(batch.seq_lens, dtype=np.int64)  # [N]
    positions = np.asarray(batch.positions, dtype=np.int64)  # [T]
    tables = np.asarray(batch.block_tables, dtype=np.int64)  # [N, MB]
    num_reqs = seq_lens.shape[0]
    is_cp = seq_lens > min_tokens  # [N]
    q_lens = qsl[1:] - qsl[:-1]
    if variant == "auto":
        pass_kv = q_lens * num_heads >= 2 * num_kv_heads * seq_lens  # new / seq >= 2 NKV / NH
    else:
        pass_kv = np.full(num_reqs, variant == PASS_KV)
    cp_kv = [n for n in range(num_reqs) if is_cp[n] and pass_kv[n]]
    cp_q = [n for n in range(num_reqs) if is_cp[n] and not pass_kv[n]]
    plain_reqs = np.flatnonzero(~is_cp)
    plain_tokens = np.concatenate([np.arange(qsl[n], qsl[n + 1]) for n in plain_reqs] or [np.zeros(0, np.int64)])

    # Per CP request: owner of every block of the sequence (named by the block id), and of every new token.
    block_owners = {n: tables[n, :-(-seq_lens[n] // bsz)] // blocks_per_rank for n in (*cp_kv, *cp_q)}
    token_owner = np.zeros(positions.shape[0], dtype=np.int64)  # [T] plain tokens: rank 0
    for n, owners in block_owners.items():
        lo, hi = qsl[n], qsl[n + 1]
        token_owner[lo:hi] = owners[positions[lo:hi] // bsz]

    holdings = []
    for x in range(cp_size):
        kv_pos, kv_req, q_index = [], [], []
        for n in (*cp_kv, *cp_q):
            blocks = np.flatnonzero(block_owners[n] == x)
            pos = (blocks[:, None] * bsz + np.arange(bsz)).ravel()
            pos = pos[pos < seq_lens[n]]
            kv_pos.append(pos)
            kv_req.append(np.full(pos.shape[0], n))
            tokens = np.arange(qsl[n], qsl[n + 1])
            q_index.append(tokens[token_owner[tokens] == x])
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        kv_pos_x, kv_req_x, q_index_x = cat(kv_pos), cat(kv_req), cat(q_index)
        q_req_x = np.searchsorted(qsl, q_index_x, side="right") - 1  # [Tc] request of each token
        holdings.append(Holding(kv_pos_x, kv_req_x, int(sum(len(p) for p in kv_pos[:len(cp_kv)])), q_index_x,
                                positions[q_index_x], q_req_x, int(sum(len(i) for i in q_index[:len(cp_kv)]))))

    mine = holdings[rank]
    slots = (tables[mine.kv_req, mine.kv_pos // bsz] - rank * blocks_per_rank) * bsz + mine.kv_pos % bsz  # [L]
    local = np.concatenate([plain_tokens, mine.q_index]) if rank == 0 else mine.q_index

    # Sampled rows: where each one's hidden state is computed, and its index there.
    logits_indices = np.asarray(batch.logits_indices, dtype=np.int64)  # [S]
    sample_owner = token_owner[logits_indices]
    sample_local = np.zeros_like(logits_indices)
    for x in range(cp_size):
        local_x = np.concatenate([plain_tokens, holdings[x].q_index]) if x == 0 else holdings[x].q_index
        where = np.full(positions.shape[0], -1, dtype=np.int64)
        where[local_x] = np.arange(local_x.shape[0])
        sample_local[sample_owner == x] = where[logits_indices[sample_owner == x]]

    if rank != 0:  # plain requests live on rank 0
        plain_tokens, plain_reqs = plain_tokens[:0], plain_reqs[:0]
    step = CpStep(local, plain_tokens.shape[0], plain_reqs, holdings, torch.from_numpy(slots), sample_owner,
                  sample_local)
    for name, reqs in ((PASS_KV, cp_kv), (PASS_Q, cp_q)):
        if reqs:
            step.requests[name] = np.asarray(reqs, dtype=np.int64)
    for src, held in enumerate(holdings):
        step.kv_pairs[src] = pairs(mine.q_req[:mine.q_split], held.kv_req[:held.kv_split])
        step.q_pairs[src] = pairs(held.q_req[held.q_split:], mine.kv_req[mine.kv_split:])
        if src != rank and np.intersect1d(mine.q_req[mine.q_split:], held.kv_req[held.kv_split:]).size:
            step.returns_from.append(src)
    return step


class ContextParallel:
    """One rank's place in its replica's CP ring: plans each step (`begin`), runs every
    attention layer (installed as Attention.context by apply.py) and brings the sampled rows'
    hidden states to CP rank 0 (`gather_samples`), which computes the logits."""

    def __init__(self, ring: TorchRing | ShmRing, min_tokens: int, block_size: int, variant: str = "auto") -> None:
        self.ring, self.rank, self.size = ring, ring.rank, ring.size
        self.min_tokens, self.block_size, self.variant = min_tokens, block_size, variant
        self.step: CpStep | None = None
        self.request_steps = {PASS_KV: 0, PASS_Q: 0}  # CP requests run, step by step, per variant
        self.ring_bytes = 0  # bytes this rank sent over the ring (and the pass-Q returns)

    def begin(self, batch, num_heads: int, num_kv_heads: int, blocks_per_rank: int, device: torch.device) -> CpStep:
        self.step = plan_step(batch, self.rank, self.size, self.min_tokens, self.block_size, blocks_per_rank,
                              self.variant, num_heads, num_kv_heads)
        self.step.own_slots = self.step.own_slots.to(device)  # once per step, not per layer
        for name, reqs in self.step.requests.items():
            self.request_steps[name] += reqs.shape[0]
        return self.step

    def __call__(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: tuple[torch.Tensor, torch.Tensor], meta) -> torch.Tensor:
        """Attention.forward on a CP rank: q/k/v [Tl, NH|NKV, D] of this rank's tokens in plan order;
        `meta` holds the local slots and the plain requests' tables."""
        step = self.step
        k_cache, v_cache = kv_cache
        ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)  # each rank writes only its blocks
        out = torch.empty_like(q)  # [Tl, NH, D]
        plain = step.num_plain
        if plain:
            out[:plain] = ops.paged_attention(q[:plain], k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                              meta.seq_lens, scale=attn.scale, sliding_window=attn.sliding_window)
        if step.has_cp:
            ring_out, sent = ring_attention(self.ring, step, q[plain:], k_cache, v_cache, attn.scale,
                                            attn.sliding_window)
            out[plain:] = ring_out.to(q.dtype)
            self.ring_bytes += sent
        return out

    def gather_samples(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [Tl, H] of this rank's tokens -> the sampled rows [S, H] on CP rank 0 (None elsewhere)."""
        step = self.step
        if self.rank != 0:
            rows = step.sample_local[step.sample_owner == self.rank]
            if rows.size:
                self.ring.wait(self.ring.post({0: hidden[torch.from_numpy(rows).to(hidden.device)]}, {}))
            return None
        out = torch.empty((step.sample_owner.shape[0], hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
        recvs = {x: torch.empty((int((step.sample_owner == x).sum()), hidden.shape[1]), dtype=hidden.dtype,
                                device=hidden.device) for x in range(1, self.size) if (step.sample_owner == x).any()}
        self.ring.wait(self.ring.post({}, recvs))
        mine = step.sample_owner == 0
        own_rows = torch.from_numpy(step.sample_local[mine]).to(hidden.device)
        out[torch.from_numpy(mine).to(hidden.device)] = hidden[own_rows]
        for x, rows in recvs.items():
            out[torch.from_numpy(step.sample_owner == x).to(hidden.device)] = rows
        return out

    def stats(self) -> dict[str, object]:
        return {"size": self.size, "transport": self.ring.name, "min_tokens": self.min_tokens,
                "variant": self.variant, "request_steps": dict(self.request_steps), "ring_bytes": self.ring_bytes}
