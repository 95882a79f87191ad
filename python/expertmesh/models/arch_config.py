"""The architecture facts a decoder needs, read once from an HF config.json dict.

Each architecture file turns its HF config into a DecoderConfig; the shared decoder
(decoder.py) builds layers from it. Fields an architecture lacks keep their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from expertmesh.layers.rotary import rope_theta_from_hf_config


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    # MoE
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    renormalize: bool
    # Variants
    qkv_bias: bool = False
    o_bias: bool = False  # Llama-style attention_bias puts a bias on o_proj too
    qk_norm: str | None = None  # None, "per_head" (Qwen3: over D) or "full" (OLMoE: over NH*D)
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-clip, clip] after the norms
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (gated by a sigmoid)
    dense_intermediate_size: int = 0  # size of the plain MLP in dense layers
    dense_layers: frozenset[int] = frozenset()  # layers with a plain MLP instead of MoE
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer; None = full

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_heads} must be a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"sliding_windows has {len(self.sliding_windows)} entries, expected {self.num_layers}")


def require(config: dict[str, Any], key: str, *aliases: str) -> Any:
    """config[key] (or the first alias present), with an error naming the key if absent."""
    for name in (key, *aliases):
        if config.get(name) is not None:
            return config[name]
    names = " or ".join(repr(n) for n in (key, *aliases))
    raise ValueError(f"config.json has no {names}, which the {config.get('architectures')} architecture needs")


def common_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The fields every Llama-style decoder reads the same way."""
    hidden = int(require(config, "hidden_size"))
    num_heads = int(require(config, "num_attention_heads"))
    return dict(
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(require(config, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta_from_hf_config(config),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def check_activation(config: dict[str, Any]) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"hidden_act={act!r} is not supported; only 'silu' is")


def qwen_dense_layers(config: dict[str, Any], num_layers: int) -> frozenset[int]:
    """Qwen-MoE rule: a layer is MoE unless listed in mlp_only_layers or off the sparse step."""
    only = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    return frozenset(i for i in range(num_layers) if i in only or (i + 1) % step != 0)
