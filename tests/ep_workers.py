"""Functions the expert-parallel tests run inside rank processes (see ep_util.run_ranks).
They live in a module of their own so spawned processes can import them."""

from __future__ import annotations

import torch

from expertmesh.parallel.all_to_all import ExpertParallel, moe_forward
from expertmesh.parallel.shm import ShmTransport
from expertmesh.parallel.transport import TorchTransport
from expertmesh_kernels.moe import expert_mlp_ref


def _transports(rank, world, groups, slot_rows, row_bytes):
    return [TorchTransport(groups.data, rank, world, torch.device("cpu")),
            ShmTransport(groups.control, rank, world, slot_rows=slot_rows, max_row_bytes=row_bytes, timeout_s=30)]


def exchange_both(rank, world, groups):
    """Random uneven exchanges (empty sends included) through both transports."""
    out = {}
    for tr in _transports(rank, world, groups, slot_rows=8, row_bytes=64):
        results = []
        for trial in range(4):
            g = torch.Generator().manual_seed(100 * trial + rank)
            counts = [int(c) for c in torch.randint(0, 5, (world,), generator=g)]
            if trial == 1:
                counts = [0] * world  # an idle rank sends nothing
            x = torch.randn(sum(counts), 3, generator=g)
            ids = torch.arange(sum(counts)) + 100 * rank
            if trial == 2:  # rows gathered by the transport from a bigger tensor
                base = torch.randn(sum(counts) + 3, 3, generator=g)
                (rx, rid), rc = tr.exchange([base, ids], counts, gather=[torch.arange(sum(counts)).flip(0) + 2, None])
            else:
                (rx, rid), rc = tr.exchange([x, ids], counts)
            # Received tensors may be views of the transport's buffers, valid for two calls: keep copies.
            results.append((rx.clone(), rid.clone(), rc))
        results.append(tr.all_max(rank * 3))
        results.append(_round_trip(tr, rank, world))
        if tr.name == "shm":
            try:
                tr.exchange([torch.zeros(9, 2)], [9] + [0] * (world - 1))  # more rows than a slot holds
                results.append("no error")
            except ValueError as exc:
                results.append(str(exc))
        out[tr.name] = results
        tr.close()
    return out


def _round_trip(tr, rank, world):
    """exchange_rows out, then exchange_add of the received rows (as they landed) back home:
    what dispatch and combine do. Every row comes back to the index it left from."""
    g = torch.Generator().manual_seed(7 + rank)
    counts = [int(c) for c in torch.randint(0, 5, (world,), generator=g)]
    x = torch.randn(sum(counts), 6, generator=g)
    origin = torch.randperm(sum(counts), generator=g)  # row j of the send order is x[origin[j]]
    (rx, rid), rc = tr.exchange_rows([x, torch.arange(sum(counts)) + 100 * rank], counts, gather=[origin, None])
    received = (rx.compact().clone(), rid.compact().clone(), rc)
    out = torch.zeros(sum(counts), 6)
    tr.exchange_add(rx.base, rc, counts, out, origin, gather=rx.rows)
    return received, out, x


def moe_both(rank, world, groups, top_k, chunk, routing):
    """moe_forward on every rank vs. the single-rank computation of the same tokens."""
    num_experts, hidden, inter = 8, 16, 8
    g = torch.Generator().manual_seed(0)  # same weights on every rank
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.3
    w_down = torch.randn(num_experts, hidden, inter, generator=g) * 0.3
    g = torch.Generator().manual_seed(1 + rank)
    num_tokens = {"idle_rank": 0 if rank == world - 1 else 11, "one_rank_experts": 9, "random": 5 + 3 * rank}[routing]
    x = torch.randn(num_tokens, hidden, generator=g)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if routing == "one_rank_experts":  # every token's experts on rank 0: other ranks get nothing
        logits[:, num_experts // world :] = -1e9
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    # Single-rank reference: all experts here, slot sum in fp32 (FusedMoE's local path).
    from expertmesh._core import route

    plan = route(ids.to(torch.int32).numpy(), num_experts, 1)
    y = expert_mlp_ref(x[torch.from_numpy(plan.sorted_pair_ids) // top_k], w_gate_up, w_down,
                       torch.from_numpy(plan.expert_offsets))
    y = y[torch.from_numpy(plan.pair_positions)].view(num_tokens, top_k, hidden)
    want = (y * weights.unsqueeze(-1)).sum(1)
    per_rank = num_experts // world
    lo = rank * per_rank
    local = (w_gate_up[lo : lo + per_rank], w_down[lo : lo + per_rank])
    got = {}
    for tr in _transports(rank, world, groups, slot_rows=chunk, row_bytes=hidden * 4 + 12 * top_k):
        ep = ExpertParallel(rank, world, tr, chunk)
        ep.begin_step()
        got[tr.name] = moe_forward(ep, x, weights, ids, num_experts,
                                   lambda xs, offs: expert_mlp_ref(xs, local[0], local[1], offs))
        tr.close()
    return want, got
