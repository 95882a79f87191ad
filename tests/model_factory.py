"""Small random-weight Hugging Face checkpoints for tests, built and saved by transformers.

    path = make_checkpoint(tmp_path, arch="mixtral", num_key_value_heads=1)
    hf = load_hf_model(path)          # the transformers reference, eager attention, fp32

Weights are drawn with a fixed seed, wider than HF's default init (std = initializer_range,
0.1 by default) and with norm weights and biases away from 1 / 0, so attention is peaky,
routing is decisive and a wrongly loaded tensor changes the logits visibly.
Checkpoints carry no tokenizer (conftest.add_default_tokenizer adds one).
"""

from __future__ import annotations

from pathlib import Path
import json
from typing import Any

import torch

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    num_experts_per_tok=2,
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=None,
)

# Per architecture: tiny sizes that still exercise what the architecture adds.
_DEFAULTS: dict[str, dict[str, Any]] = {
    # GQA 2, 8 experts, renormalised top-2.
    "mixtral": dict(num_key_value_heads=2, intermediate_size=96, num_local_experts=8),
    # GQA 4, shared expert, qkv bias, unnormalised top-2.
    "qwen2_moe": dict(
        num_key_value_heads=1, num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        intermediate_size=96, norm_topk_prob=False,
    ),
    # GQA 2, head_dim 32 != hidden / heads, per-head q/k norm, normalised top-2.
    "qwen3_moe": dict(
        num_key_value_heads=2, head_dim=32, num_experts=8, moe_intermediate_size=32, intermediate_size=96,
        norm_topk_prob=True,
    ),
    # MHA (GQA 1), full-width q/k norm, 4 experts.
    "olmoe": dict(num_key_value_heads=4, num_experts=4, intermediate_size=48, norm_topk_prob=False),
}


def _model_classes(arch: str):
    import transformers

    names = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    }
    if arch not in names:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    config_name, model_name = names[arch]
    return getattr(transformers, config_name), getattr(transformers, model_name)


@torch.no_grad()
def _randomize(model: torch.nn.Module, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            param.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            param.copy_(0.2 * noise)
        else:
            param.copy_(std * noise)


def make_checkpoint(
    tmp_path: str | Path,
    arch: str = "mixtral",
    *,
    name: str | None = None,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> Path:
    """Save a tiny random-weight `arch` checkpoint under tmp_path/name (default: arch).

    config_overrides go to the transformers config class (e.g. num_key_value_heads=1,
    sliding_window=4, tie_word_embeddings=True). max_shard_size (e.g. "40KB") splits the
    weights into shards with a model.safetensors.index.json. dtype is the saved dtype.
    Returns the checkpoint directory.
    """
    config_cls, model_cls = _model_classes(arch)
    kwargs = {**_COMMON, **_DEFAULTS[arch], **config_overrides}
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomize(model, float(kwargs["initializer_range"]), seed)
    model = model.to(dtype)
    out = Path(tmp_path) / (name or arch)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)
    return out


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers reference for a checkpoint: eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    return model.eval()


def add_default_tokenizer(path: Path) -> Path:
    """Give a checkpoint the built-in model's tokenizer files (its vocab must cover them)."""
    from expertmesh import default_model

    (path / "tokenizer.json").write_text(default_model._tokenizer_json())
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "chat_template": default_model.CHAT_TEMPLATE})
    )
    return path
