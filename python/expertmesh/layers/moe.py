"""Fused mixture-of-experts layer: router, top-k, routing plan, grouped expert MLPs, combine.

Expert weights live fused per layer (w_gate_up [E, 2I, H], w_down [E, H, I]; layout in
expertmesh_kernels.moe) so the grouped kernels see one tensor, and expert parallelism can
later slice the E axis. The routing plan (which (token, slot) pair goes where, in
expert-sorted order) comes from the Rust core (expertmesh._core.route), the same code
that plans expert-parallel dispatch.

A layer may hold only part of its experts' weights (`own`): a range of experts (expert
parallelism: w_gate_up [El, 2I, H], w_down [El, H, I]) and/or a range of every expert's
intermediate rows (tensor parallelism: [E, 2Il, H], [E, H, Il], the output then a partial
sum). When its experts are spread over ranks, whoever spread them installs an `exchange`
(parallel/apply.py) that moves tokens to the experts' owners and back; the layer itself never
communicates.

Its expert weights may be held quantized (`quantize`, called by quant/apply.py after `own`):
w_gate_up / w_down then hold int8 or fp8 values and w_gate_up_scale / w_down_scale their
scales (quant/format.py), and the expert matmuls take them as QuantWeights.

Legend: T tokens, H hidden, E experts, El local experts, k top-k, I expert intermediate size
(Il held), P = T * k pairs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn

from expertmesh._core import route
from expertmesh.layers.linear import Linear
from expertmesh.layers.weights import empty_parameter, read, source_shape
from expertmesh.quant.format import ReadRC, WeightFormat
from expertmesh_kernels import ops
from expertmesh_kernels.moe import expert_mlp_ref
from expertmesh_kernels.quant import QuantWeight


class ExpertExchange(Protocol):
    """Runs a layer's chosen experts when they live on several ranks: [T, H] -> [T, H]."""

    def __call__(self, moe: FusedMoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ...


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


def _expert_reader(source, e: int, shift: int = 0) -> ReadRC:
    """Rows x cols of expert e's matrix in a fused [E, R, C] tensor, its rows starting at `shift`."""
    return lambda r, c: read(source, (slice(e, e + 1), slice(r.start + shift, r.stop + shift), c))[0]


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
        self.expert_start, self.expert_end = 0, num_experts  # the experts held (see own)
        self.inter_start, self.inter_end = 0, intermediate_size  # their intermediate rows held
        self.exchange: ExpertExchange | None = None  # set when the experts live on several ranks
        self.gate = Linear(hidden_size, num_experts, dtype=dtype)  # the router
        # Tokens routed to each expert since load (MoE load). A plain array, not a buffer, so
        # it stays out of state dicts; the engine reads it for its stats.
        self.tokens_routed = np.zeros(num_experts, dtype=np.int64)  # [E]
        self.w_gate_up = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype), requires_grad=False
        )  # [E, 2I, H]
        self.w_down = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype), requires_grad=False
        )  # [E, H, I]
        self.format: WeightFormat | None = None  # set by quantize
        self.w_gate_up_scale: nn.Parameter | None = None  # [El, 2Il] int8, [El, 2Il, KB] fp8
        self.w_down_scale: nn.Parameter | None = None  # [El, H] int8, [El, H, KB] fp8

    def own(self, experts: tuple[int, int] | None = None, intermediate: tuple[int, int] | None = None) -> None:
        """Keep experts [experts) and, of each, intermediate rows [intermediate) (the output is
        then a partial sum over the intermediate dimension)."""
        (e0, e1) = experts or (0, self.num_experts)
        (i0, i1) = intermediate or (0, self.intermediate_size)
        self.expert_start, self.expert_end, self.inter_start, self.inter_end = e0, e1, i0, i1
        self.w_gate_up = empty_parameter((e1 - e0, 2 * (i1 - i0), self.hidden_size), self.w_gate_up)  # [El, 2Il, H]
        self.w_down = empty_parameter((e1 - e0, self.hidden_size, i1 - i0), self.w_down)  # [El, H, Il]

    def quantize(self, fmt: WeightFormat) -> None:
        """Hold the experts' weights (the part `own` kept) in `fmt`; loading fills them."""
        (e0, e1), (i0, i1), h = (self.expert_start, self.expert_end), (self.inter_start, self.inter_end), \
            self.hidden_size
        device, n = self.w_gate_up.device, e1 - e0
        self.format = fmt
        self.w_gate_up = nn.Parameter(torch.empty(n, 2 * (i1 - i0), h, dtype=fmt.dtype, device=device),
                                      requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(n, h, i1 - i0, dtype=fmt.dtype, device=device), requires_grad=False)
        gate_up_scale = fmt.scale_shape((0, 2 * (i1 - i0)), (0, h))
        down_scale = fmt.scale_shape((0, h), (i0, i1))
        self.w_gate_up_scale = nn.Parameter(torch.empty(n, *gate_up_scale, device=device), requires_grad=False)
        self.w_down_scale = nn.Parameter(torch.empty(n, *down_scale, device=device), requires_grad=False)

    def expert_weights(self) -> tuple[torch.Tensor | QuantWeight, torch.Tensor | QuantWeight]:
        """(w_gate_up, w_down) as the expert matmuls take them."""
        if self.format is None:
            return self.w_gate_up, self.w_down
        return (self.format.weight(self.w_gate_up, self.w_gate_up_scale, (0, self.hidden_size)),
                self.format.weight(self.w_down, self.w_down_scale, (self.inter_start, self.inter_end)))

    def count_routed(self, ids: torch.Tensor) -> None:
        """Add these top-k choices [T, k] to the per-expert token counts."""
        self.tokens_routed += np.bincount(ids.flatten().cpu().numpy(), minlength=self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        router_logits = self.gate(x)  # [T, E]
        weights, ids = ops.topk_gating(router_logits, self.top_k, self.renormalize)  # [T, k] x2
        return self.experts(x, weights, ids)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Run the chosen experts and sum their outputs with the routing weights."""
        num_tokens = x.shape[0]
        if self.exchange is not None:  # every rank joins, with T = 0 too (see ModelRunner.idle_step)
            return self.exchange(self, x, weights, ids)
        # Fused Triton kernels (sorting, grouped GEMMs and weights on the device), plain or quantized.
        if ops.use_triton(x):
            self.tokens_routed += torch.bincount(ids.flatten().long(), minlength=self.num_experts).cpu().numpy()
            return ops.fused_moe(x, *self.expert_weights(), weights, ids)
        sorted_pair_ids, pair_positions, expert_offsets = routing_plan(ids, self.num_experts, self.tokens_routed)
        x_sorted = x[sorted_pair_ids // self.top_k]  # [P, H]
        y_sorted = expert_mlp_ref(x_sorted, *self.expert_weights(), expert_offsets)  # [P, H]
        y = y_sorted[pair_positions].view(num_tokens, self.top_k, self.hidden_size)  # [T, k, H]
        return (y.float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)  # [T, H]

    def local_expert_mlp(self, x_sorted: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        """The held experts over rows grouped by local expert: x [Q, H], offsets [El+1] -> [Q, H]."""
        return expert_mlp_ref(x_sorted, *self.expert_weights(), expert_offsets)

    # ---- loading: only the experts and intermediate rows this layer holds are read ------------

    @torch.no_grad()
    def load_expert_weight(self, expert: int, part: str, source) -> None:
        """Copy one expert's projection (part: gate_proj, up_proj or down_proj, nn.Linear layout;
        `source` a tensor or a safetensors slice)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} is out of range: the layer has {self.num_experts} experts")
        if part not in ("gate_proj", "up_proj", "down_proj"):
            raise ValueError(f"unknown expert projection {part!r}; expected down_proj, gate_proj or up_proj")
        full = (self.hidden_size, self.intermediate_size) if part == "down_proj" else \
            (self.intermediate_size, self.hidden_size)
        if source_shape(source) != full:
            raise ValueError(f"weight experts.{expert}.{part} has shape {source_shape(source)}, expected {full}")
        if not self.expert_start <= expert < self.expert_end:
            return  # another rank's expert: this rank never reads it
        e, (i0, i1) = expert - self.expert_start, (self.inter_start, self.inter_end)
        what = f"experts.{expert}.{part}"
        if part == "down_proj":
            self._store("w_down", e, 0, lambda r, c: read(source, (r, c)), full, (0, self.hidden_size), (i0, i1), what)
        else:
            first = 0 if part == "gate_proj" else i1 - i0
            self._store("w_gate_up", e, first, lambda r, c: read(source, (r, c)), full, (i0, i1), (0, self.hidden_size),
                        what)

    @torch.no_grad()
    def load_expert_scale(self, expert: int, part: str, source) -> None:
        """Copy one expert's weight_scale_inv (an FP8 checkpoint's block scales)."""
        if self.format is None or not self.format.prequantized:
            raise ValueError(f"checkpoint weight experts.{expert}.{part}.weight_scale_inv is a quantization scale, "
                             "but the checkpoint's config.json has no fp8 quantization_config")
        if not self.expert_start <= expert < self.expert_end:
            return
        e, (i0, i1), h, what = expert - self.expert_start, (self.inter_start, self.inter_end), self.hidden_size, \
            f"experts.{expert}.{part}.weight_scale_inv"
        if part == "down_proj":
            self.format.store_scale(self.w_down_scale[e], read(source), (h, self.intermediate_size), (0, h), (i0, i1),
                                    what)
        else:
            rows = slice(0, i1 - i0) if part == "gate_proj" else slice(i1 - i0, 2 * (i1 - i0))
            self.format.store_scale(self.w_gate_up_scale[e, rows], read(source), (self.intermediate_size, h),
                                    (i0, i1), (0, h), what)

    def _store(self, name: str, e: int, first: int, read_rc: ReadRC, full: tuple[int, int],
               rows: tuple[int, int], cols: tuple[int, int], what: str) -> None:
        """Rows [rows) x cols [cols) of one full expert matrix into local expert e of
        parameter `name`, at its rows first..: copied, or quantized in this layer's format."""
        dst = getattr(self, name)[e, first: first + rows[1] - rows[0]]  # [n, k]
        if self.format is None:
            dst.copy_(read_rc(slice(*rows), slice(*cols)))
            return
        scale = getattr(self, f"{name}_scale")[e, first: first + rows[1] - rows[0]]
        self.format.store(dst, scale, read_rc, full, rows, cols, what)

    @torch.no_grad()
    def load_fused_weight(self, name: str, source) -> None:
        """Copy a fused tensor: gate_up_proj [E, 2I, H] or down_proj [E, H, I]."""
        inter, hidden, (e0, e1), (i0, i1) = (self.intermediate_size, self.hidden_size,
                                             (self.expert_start, self.expert_end), (self.inter_start, self.inter_end))
        full = {"gate_up_proj": (self.num_experts, 2 * inter, hidden), "down_proj": (self.num_experts, hidden, inter)}
        if name not in full:
            raise ValueError(f"unknown fused expert weight {name!r}; expected gate_up_proj or down_proj")
        if source_shape(source) != full[name]:
            raise ValueError(f"weight experts.{name} has shape {source_shape(source)}, expected {full[name]}")
        for e in range(e0, e1):
            what = f"experts.{name}[{e}]"
            if name == "down_proj":
                self._store("w_down", e - e0, 0, _expert_reader(source, e), (hidden, inter), (0, hidden), (i0, i1),
                            what)
                continue
            for first, shift in ((0, 0), (i1 - i0, inter)):  # gate rows, then up rows
                self._store("w_gate_up", e - e0, first, _expert_reader(source, e, shift), (inter, hidden), (i0, i1),
                            (0, hidden), what)

    def extra_repr(self) -> str:
        held = ""
        if (self.expert_start, self.expert_end) != (0, self.num_experts):
            held += f", experts_held=[{self.expert_start}, {self.expert_end})"
        if (self.inter_start, self.inter_end) != (0, self.intermediate_size):
            held += f", intermediate_held=[{self.inter_start}, {self.inter_end})"
        if self.format is not None:
            held += f", quantized={self.format.kind}"
        return (f"experts={self.num_experts}{held}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, renormalize={self.renormalize}")
