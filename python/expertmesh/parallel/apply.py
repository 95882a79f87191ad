"""Parallelism applied to a built model: the only code that knows both the model and the layout.

`apply_parallelism` runs after the model is built and before its weights are loaded
(models/loader.load_model's `shard` hook). It tells each layer which part of its weights to
hold (the layers' `own` methods; loading then reads only those parts) and installs the
collectives as forward hooks and one exchange, the way gpt-fast's tp.py shards a plain model:

  attention     q/k/v keep their heads' rows (column-parallel), o_proj their columns
                (row-parallel) + allreduce; KV heads are split, or replicated when there are
                fewer of them than TP ranks (rank r reads KV head r * NKV // TP). A full-width
                q/k norm (OLMoE) becomes a GatheredNorm.
  dense MLPs    gate/up rows, down columns + allreduce (dense layers, Qwen2-MoE's shared expert)
  experts, EP   each of the R = TP x DP ranks holds E / R experts; the exchange (all_to_all.py)
                sends each TP rank's share of the tokens to the experts' owners and back, then
                the TP group all-gathers the shares. A shared expert is split like a dense MLP.
  experts, TP   every expert's intermediate rows are split over the TP ranks; one allreduce
                after the layer sums the routed and the (unreduced) shared expert's shares.
  context       with CP ranks, every attention layer's `context` is the rank's ContextParallel
                (context_parallel.py): long sequences' tokens and KV are split over the ring.
  vocabulary    embedding rows split (ids outside a rank's rows embed as zeros) + allreduce;
                lm_head rows split + all-gather, so every rank's logits are one rank's logits.

Legend: T tokens, H hidden, NH/NKV heads, D head dim, E experts, I intermediate, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from expertmesh.layers.linear import Embedding
from expertmesh.layers.moe import FusedMoE
from expertmesh.layers.norm import RMSNorm
from expertmesh.models.arch_config import DecoderConfig
from expertmesh.models.decoder import DenseMLP, MoeForCausalLM, SelfAttentionBlock
from expertmesh.parallel.all_to_all import ExpertParallel, moe_forward
from expertmesh.parallel.context_parallel import ContextParallel
from expertmesh.parallel.layout import ParallelConfig, RankLayout, split
from expertmesh.parallel.tensor_parallel import GatheredNorm, TensorParallel


def check_layout(layout: ParallelConfig, cfg: DecoderConfig) -> None:
    """InvalidRequestError naming the sizes if the model cannot be split this way (rank 0
    checks before it starts any rank)."""
    dense = {cfg.dense_intermediate_size} if cfg.dense_layers else set()
    if cfg.shared_expert_intermediate_size:
        dense.add(cfg.shared_expert_intermediate_size)
    layout.check_model(cfg.num_heads, cfg.num_kv_heads, cfg.num_experts, cfg.moe_intermediate_size,
                       tuple(sorted(dense)))


def apply_parallelism(model: MoeForCausalLM, layout: RankLayout, tp: TensorParallel | None,
                      ep: ExpertParallel | None, cp: ContextParallel | None = None) -> None:
    cfg = model.config
    check_layout(layout.config, cfg)
    if cp is not None:
        for layer in model.model.layers:
            layer.self_attn.attn.context = cp
    if tp is not None and tp.world_size > 1:
        _shard_vocabulary(model, tp)
        for layer in model.model.layers:
            _shard_attention(layer.self_attn, cfg.num_heads, cfg.num_kv_heads, tp)
    for layer in model.model.layers:
        mlp = layer.mlp
        if isinstance(mlp, FusedMoE):
            _shard_moe(mlp, layout, tp if tp is not None and tp.world_size > 1 else None, ep)
        elif isinstance(mlp, DenseMLP) and tp is not None and tp.world_size > 1:
            _shard_dense(mlp, tp, reduce=True)


def _all_reduce_output(module: nn.Module, tp: TensorParallel) -> None:
    module.register_forward_hook(lambda _m, _args, out: tp.all_reduce(out))


def _shard_vocabulary(model: MoeForCausalLM, tp: TensorParallel) -> None:
    vocab = model.config.vocab_size
    embed: Embedding = model.model.embed_tokens
    embed.own(tp.split(vocab))
    _all_reduce_output(embed, tp)
    model.lm_head.own(rows=tp.split(vocab))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = embed.weight  # the same rows of the same table
    sizes = tp.sizes(vocab)
    model.lm_head.register_forward_hook(lambda _m, _args, out: tp.all_gather(out, sizes, dim=1))  # [S, V]


def _shard_attention(block: SelfAttentionBlock, num_heads: int, num_kv_heads: int, tp: TensorParallel) -> None:
    q_heads = tp.split(num_heads)
    if num_kv_heads >= tp.world_size:
        kv_heads = tp.split(num_kv_heads)
    else:  # fewer KV heads than ranks: each rank reads the one its query heads use
        head = tp.rank * num_kv_heads // tp.world_size
        kv_heads = (head, head + 1)
    block.own_heads(q_heads, kv_heads, add_bias=tp.rank == 0)
    _all_reduce_output(block.o_proj, tp)
    if block.qk_norm == "full":
        d = block.head_dim
        block.q_norm = _gathered(block.q_norm, tp, d, per_rank=q_heads[1] - q_heads[0],
                                 owner=[r for r in range(tp.world_size) for _ in range(num_heads // tp.world_size)],
                                 keep=q_heads)
        if num_kv_heads >= tp.world_size:
            owner = [r for r in range(tp.world_size) for _ in range(num_kv_heads // tp.world_size)]
        else:  # head h is held by ranks h * TP / NKV, ...; read it from the first of them
            owner = [h * tp.world_size // num_kv_heads for h in range(num_kv_heads)]
        block.k_norm = _gathered(block.k_norm, tp, d, per_rank=kv_heads[1] - kv_heads[0], owner=owner, keep=kv_heads)


def _gathered(norm: RMSNorm, tp: TensorParallel, d: int, per_rank: int, owner: list[int],
              keep: tuple[int, int]) -> GatheredNorm:
    """GatheredNorm over heads: head h of the full vector is read from rank owner[h]'s columns."""
    take, seen = [], {}
    for h, r in enumerate(owner):
        slot = seen.get(r, 0)  # the slot-th head rank r holds
        seen[r] = slot + 1
        take += range((r * per_rank + slot) * d, (r * per_rank + slot + 1) * d)
    return GatheredNorm(norm, tp, per_rank * d, take, (keep[0] * d, keep[1] * d))


def _shard_dense(mlp: DenseMLP, tp: TensorParallel, reduce: bool) -> None:
    mlp.own(tp.split(mlp.gate_proj.out_features))
    if reduce:
        _all_reduce_output(mlp, tp)


def _shard_moe(moe: FusedMoE, layout: RankLayout, tp: TensorParallel | None, ep: ExpertParallel | None) -> None:
    shared = getattr(moe, "shared_expert", None)  # Qwen2-MoE's always-on expert (a DenseMLP)
    if ep is not None:
        moe.own(experts=ep.expert_range(moe.num_experts))
        moe.exchange = ExpertExchangeEP(ep, tp)
        if shared is not None and tp is not None:
            _shard_dense(shared, tp, reduce=True)
    elif tp is not None:
        moe.own(intermediate=tp.split(moe.intermediate_size))
        if shared is not None:
            _shard_dense(shared, tp, reduce=False)  # summed with the routed share by the one allreduce
        _all_reduce_output(moe, tp)


class ExpertExchangeEP:
    """Expert parallelism across all ranks: TP rank r of a replica dispatches its share of the
    replica's tokens (all TP ranks hold the same ones), so every token is sent once; after
    combine the TP group gathers the shares back into the whole batch."""

    def __init__(self, ep: ExpertParallel, tp: TensorParallel | None) -> None:
        self.ep, self.tp = ep, tp

    def __call__(self, moe: FusedMoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            moe.count_routed(ids)
            return moe_forward(self.ep, x, weights, ids, moe.num_experts, moe.local_expert_mlp)
        lo, hi = split(x.shape[0], self.tp.world_size, self.tp.rank)
        if self.tp.rank == 0:  # the replica's leader counts its whole batch (what its stats report)
            moe.count_routed(ids)
        share = moe_forward(self.ep, x[lo:hi], weights[lo:hi], ids[lo:hi], moe.num_experts,
                            moe.local_expert_mlp)  # [hi - lo, H]
        return self.tp.all_gather(share, self.tp.sizes(x.shape[0]), dim=0)  # [T, H]
