"""Fused mixture-of-experts layer: router, top-k, routing plan, grouped expert MLPs, combine.

Expert weights live fused per layer (w_gate_up [E, 2I, H], w_down [E, H, I]; layout in
expertmesh_kernels.moe) so the grouped kernels see one tensor, and expert parallelism can
later slice the E axis. The routing plan (which (token, slot) pair goes where, in
expert-sorted order) comes from the Rust core (expertmesh._core.route), the same code
that plans expert-parallel dispatch.

With expert parallelism (EP, R ranks) the layer holds only its rank's El = E / R experts
(w_gate_up [El, 2I, H], w_down [El, H, I]) and hands the expert half to
expertmesh.parallel.all_to_all.moe_forward, which moves tokens to the ranks owning their
experts and back; the layer itself holds no parallelism, only the expert range it owns.

Legend: T tokens, H hidden, E experts, El local experts, k top-k, I expert intermediate size,
P = T * k pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from expertmesh._core import route
from expertmesh.layers.linear import Linear
from expertmesh.parallel.all_to_all import moe_forward
from expertmesh.parallel.groups import get_expert_parallel
from expertmesh_kernels import ops
from expertmesh_kernels.moe import expert_mlp_ref


def routing_plan(
    topk_ids: torch.Tensor, num_experts: int, counts: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-sorted order of the T*k (token, slot) pairs of topk_ids [T, k], from the Rust core.

    Returns sorted_pair_ids [P] (pair p = token * k + slot, sorted by expert, stable),
    pair_positions [P] (inverse permutation) and expert_offsets [E+1], all int64 on
    topk_ids' device. `counts` [E] int64, if given, has this call's tokens per expert added.
    """
    plan = route(topk_ids.to(torch.int32).cpu().numpy(), num_experts, 1)
    if counts is not None:
        counts += plan.tokens_per_expert  # already on the host: counting costs no device sync
    device = topk_ids.device
    return (
        torch.from_numpy(plan.sorted_pair_ids).to(device),
        torch.from_numpy(plan.pair_positions).to(device),
        torch.from_numpy(plan.expert_offsets).to(device),
    )


class FusedMoE(nn.Module):
    """Router + top-k experts. Parameters: gate.weight [E, H], w_gate_up, w_down.

    renormalize: rescale the k routing weights to sum to 1 (Mixtral: yes; Qwen/OLMoE: the
    config's norm_topk_prob).
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        # Expert parallelism, read once when the model is built: which experts live here.
        ep = get_expert_parallel()
        self.ep = ep if ep is not None and ep.world_size > 1 else None
        self.expert_start, self.expert_end = (0, num_experts) if self.ep is None else self.ep.expert_range(num_experts)
        local = self.expert_end - self.expert_start
        self.gate = Linear(hidden_size, num_experts, dtype=dtype)  # the router
        # Tokens routed to each expert since load (MoE load). A plain array, not a buffer, so
        # it stays out of state dicts; the engine reads it for its stats.
        self.tokens_routed = np.zeros(num_experts, dtype=np.int64)  # [E]
        self.w_gate_up = nn.Parameter(
            torch.empty(local, 2 * intermediate_size, hidden_size, dtype=dtype), requires_grad=False
        )  # [El, 2I, H]
        self.w_down = nn.Parameter(
            torch.empty(local, hidden_size, intermediate_size, dtype=dtype), requires_grad=False
        )  # [El, H, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        router_logits = self.gate(x)  # [T, E]
        weights, ids = ops.topk_gating(router_logits, self.top_k, self.renormalize)  # [T, k] x2
        return self.experts(x, weights, ids)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Run the chosen experts and sum their outputs with the routing weights."""
        num_tokens = x.shape[0]
        if self.ep is not None:  # every rank joins, with T = 0 too (see ModelRunner.idle_step)
            self.tokens_routed += np.bincount(ids.flatten().cpu().numpy(), minlength=self.num_experts)
            return moe_forward(self.ep, x, weights, ids, self.num_experts, self._local_expert_mlp)
        if ops.use_triton(x):  # fused Triton kernels: sorting, grouped GEMMs and weights on the device
            self.tokens_routed += torch.bincount(ids.flatten().long(), minlength=self.num_experts).cpu().numpy()
            return ops.fused_moe(x, self.w_gate_up, self.w_down, weights, ids)
        sorted_pair_ids, pair_positions, expert_offsets = routing_plan(ids, self.num_experts, self.tokens_routed)
        x_sorted = x[sorted_pair_ids // self.top_k]  # [P, H]
        y_sorted = expert_mlp_ref(x_sorted, self.w_gate_up, self.w_down, expert_offsets)  # [P, H]
        y = y_sorted[pair_positions].view(num_tokens, self.top_k, self.hidden_size)  # [T, k, H]
        return (y.float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)  # [T, H]

    def _local_expert_mlp(self, x_sorted: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        # [Q, H] grouped by local expert, offsets [El+1] -> [Q, H]
        return expert_mlp_ref(x_sorted, self.w_gate_up, self.w_down, expert_offsets)

    @torch.no_grad()
    def load_expert_weight(self, expert: int, part: str, tensor: torch.Tensor) -> None:
        """Copy one expert's projection (part: gate_proj, up_proj or down_proj, nn.Linear layout)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} is out of range: the layer has {self.num_experts} experts")
        if not self.expert_start <= expert < self.expert_end:
            return  # another rank's expert (EP): this rank never reads it
        expert -= self.expert_start
        inter = self.intermediate_size
        targets = {
            "gate_proj": self.w_gate_up[expert, :inter],
            "up_proj": self.w_gate_up[expert, inter:],
            "down_proj": self.w_down[expert],
        }
        if part not in targets:
            raise ValueError(f"unknown expert projection {part!r}; expected one of {sorted(targets)}")
        _copy_checked(targets[part], tensor, f"experts.{expert}.{part}")

    @torch.no_grad()
    def load_fused_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Copy a whole fused tensor: gate_up_proj [E, 2I, H] or down_proj [E, H, I]."""
        target = {"gate_up_proj": self.w_gate_up, "down_proj": self.w_down}.get(name)
        if target is None:
            raise ValueError(f"unknown fused expert weight {name!r}; expected gate_up_proj or down_proj")
        if tensor.shape[0] != self.num_experts:
            raise ValueError(f"weight experts.{name} has {tensor.shape[0]} experts, expected {self.num_experts}")
        _copy_checked(target, tensor[self.expert_start : self.expert_end], f"experts.{name}")

    def extra_repr(self) -> str:
        local = "" if self.ep is None else f", local_experts=[{self.expert_start}, {self.expert_end})"
        return (f"experts={self.num_experts}{local}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, renormalize={self.renormalize}")


def _copy_checked(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if tuple(source.shape) != tuple(target.shape):
        raise ValueError(f"weight {what} has shape {tuple(source.shape)}, expected {tuple(target.shape)}")
    target.copy_(source)
