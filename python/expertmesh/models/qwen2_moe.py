"""Qwen1.5/Qwen2-MoE (Qwen2MoeForCausalLM).

Differences from Mixtral: q/k/v projections have biases; routing weights are renormalised
only with norm_topk_prob (default off); a shared expert runs on every token and is scaled by
sigmoid(shared_expert_gate(x)); some layers may be dense (mlp_only_layers,
decoder_sparse_step); sliding windows apply per layer when use_sliding_window is set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from expertmesh.layers.linear import Linear
from expertmesh.layers.moe import FusedMoE
from expertmesh.models.arch_config import DecoderConfig, check_activation, common_fields, qwen_dense_layers, require
from expertmesh.models.decoder import DenseMLP, MoeForCausalLM

# Legend: T tokens, H hidden.


class SharedExpertMoE(FusedMoE):
    """Routed experts plus one always-on expert gated per token by a sigmoid."""

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype) -> None:
        super().__init__(cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.moe_intermediate_size,
                         cfg.renormalize, dtype)
        self.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, dtype)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [T, H]
        return super().forward(x) + shared


def _sliding_windows(hf_config: dict[str, Any], num_layers: int) -> list[int | None]:
    if not hf_config.get("use_sliding_window") or not hf_config.get("sliding_window"):
        return [None] * num_layers
    window = int(hf_config["sliding_window"])
    layer_types = hf_config.get("layer_types")
    if layer_types is None:  # the rule transformers applies when the config does not list them
        max_window_layers = int(hf_config.get("max_window_layers", num_layers))
        layer_types = [
            "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention"
            for i in range(num_layers)
        ]
    return [window if t == "sliding_attention" else None for t in layer_types]


class Qwen2MoeForCausalLM(MoeForCausalLM):
    architecture = "Qwen2MoeForCausalLM"

    @classmethod
    def config_from_hf(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        check_activation(hf_config)
        common = common_fields(hf_config)
        return DecoderConfig(
            **common,
            num_experts=int(require(hf_config, "num_experts", "num_local_experts")),
            top_k=int(require(hf_config, "num_experts_per_tok")),
            moe_intermediate_size=int(require(hf_config, "moe_intermediate_size")),
            renormalize=bool(hf_config.get("norm_topk_prob", False)),
            qkv_bias=bool(hf_config.get("qkv_bias", True)),
            shared_expert_intermediate_size=int(require(hf_config, "shared_expert_intermediate_size")),
            dense_intermediate_size=int(require(hf_config, "intermediate_size")),
            dense_layers=qwen_dense_layers(hf_config, common["num_layers"]),
            sliding_windows=_sliding_windows(hf_config, common["num_layers"]),
        )

    def make_mlp(self, cfg: DecoderConfig, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        if layer_idx in cfg.dense_layers:
            return DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size, dtype)
        return SharedExpertMoE(cfg, dtype)
