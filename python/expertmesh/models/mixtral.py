"""Mixtral (MixtralForCausalLM): softmax top-k routing with renormalised weights.

Hub checkpoints name the MoE block `block_sparse_moe` and its expert projections w1 (gate),
w3 (up), w2 (down); transformers 5 keeps that layout when it saves. A config sliding_window
applies to every layer (HF rule: key j is visible from position i when i - j < window).
"""

from __future__ import annotations

import re
from typing import Any

from expertmesh.models.arch_config import DecoderConfig, check_activation, common_fields, require
from expertmesh.models.decoder import MoeForCausalLM

_EXPERT_PROJ = re.compile(r"\.experts\.(\d+)\.w([123])\.(weight|weight_scale_inv)$")
_W_TO_PART = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


class MixtralForCausalLM(MoeForCausalLM):
    architecture = "MixtralForCausalLM"

    @classmethod
    def config_from_hf(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        check_activation(hf_config)
        common = common_fields(hf_config)
        window = hf_config.get("sliding_window")
        return DecoderConfig(
            **common,
            num_experts=int(require(hf_config, "num_local_experts", "num_experts")),
            top_k=int(require(hf_config, "num_experts_per_tok")),
            moe_intermediate_size=int(require(hf_config, "intermediate_size")),
            renormalize=True,
            sliding_windows=[int(window) if window else None] * common["num_layers"],
        )

    def rename_weight(self, name: str) -> str:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        return _EXPERT_PROJ.sub(lambda m: f".experts.{m.group(1)}.{_W_TO_PART[m.group(2)]}.{m.group(3)}", name)
