"""OLMoE (OlmoeForCausalLM).

Differences from Mixtral: RMSNorm over the whole q projection (NH*D) and the whole k
projection (NKV*D) before the heads split; optional clip_qkv clamps q, k, v after those
norms; routing weights renormalised only with norm_topk_prob; no sliding window.
"""

from __future__ import annotations

from typing import Any

from expertmesh.models.arch_config import DecoderConfig, check_activation, common_fields, require
from expertmesh.models.decoder import MoeForCausalLM


class OlmoeForCausalLM(MoeForCausalLM):
    architecture = "OlmoeForCausalLM"

    @classmethod
    def config_from_hf(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        check_activation(hf_config)
        clip = hf_config.get("clip_qkv")
        return DecoderConfig(
            **common_fields(hf_config),
            num_experts=int(require(hf_config, "num_experts", "num_local_experts")),
            top_k=int(require(hf_config, "num_experts_per_tok")),
            moe_intermediate_size=int(require(hf_config, "intermediate_size")),
            renormalize=bool(hf_config.get("norm_topk_prob", False)),
            qkv_bias=bool(hf_config.get("attention_bias", False)),
            o_bias=bool(hf_config.get("attention_bias", False)),
            qk_norm="full",
            clip_qkv=float(clip) if clip is not None else None,
        )
