"""Qwen3-MoE (Qwen3MoeForCausalLM).

Differences from Mixtral: an RMSNorm over each head's D dims on q and k (q_norm, k_norm)
before RoPE; routing weights renormalised only with norm_topk_prob; optional dense layers
(mlp_only_layers, decoder_sparse_step); with use_sliding_window the window applies to all
layers.
"""

from __future__ import annotations

from typing import Any

from expertmesh.models.arch_config import DecoderConfig, check_activation, common_fields, qwen_dense_layers, require
from expertmesh.models.decoder import MoeForCausalLM


class Qwen3MoeForCausalLM(MoeForCausalLM):
    architecture = "Qwen3MoeForCausalLM"

    @classmethod
    def config_from_hf(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        check_activation(hf_config)
        common = common_fields(hf_config)
        window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
        return DecoderConfig(
            **common,
            # Hub configs say num_experts; transformers 5 saves num_local_experts.
            num_experts=int(require(hf_config, "num_experts", "num_local_experts")),
            top_k=int(require(hf_config, "num_experts_per_tok")),
            moe_intermediate_size=int(require(hf_config, "moe_intermediate_size")),
            renormalize=bool(hf_config.get("norm_topk_prob", False)),
            qkv_bias=bool(hf_config.get("attention_bias", False)),
            o_bias=bool(hf_config.get("attention_bias", False)),
            qk_norm="per_head",
            dense_intermediate_size=int(hf_config.get("intermediate_size") or 0),
            dense_layers=qwen_dense_layers(hf_config, common["num_layers"]),
            sliding_windows=[int(window) if window else None] * common["num_layers"],
        )
