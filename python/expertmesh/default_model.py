"""The built-in tiny MoE: what `expertmesh generate` and `expertmesh serve` run with no --model.

It is a Mixtral-shaped checkpoint with random weights drawn from a fixed seed, so it is the
same on every machine; it produces word salad, not answers. It exists so that a new user sees
the whole path (tokenizer, scheduler, paged KV cache, MoE routing, sampling, serving) work at
once without downloading anything. It is written in the Hugging Face layout (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) on first use into the cache
directory and loaded from there like any other checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAME = "expertmesh-tiny-moe"
VERSION = 1
SEED = 20261123

CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": None,
    "eos_token_id": 0,
    "torch_dtype": "float32",
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_root() -> Path:
    """Where expertmesh keeps what it makes: $EXPERTMESH_CACHE, else ~/.cache/expertmesh."""
    env = os.environ.get("EXPERTMESH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expertmesh"


def _tokenizer_json() -> str:
    return resources.files("expertmesh.assets").joinpath("default_tokenizer.json").read_text()


def _weights(vocab_size: int) -> dict[str, torch.Tensor]:
    """Hub-layout Mixtral weights, normal(0, 0.02) like HF's init, norms at one."""
    import torch  # here, not at the top: the router needs only the path, and torch takes seconds to import

    gen = torch.Generator().manual_seed(SEED)
    c = CONFIG
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    w = {"model.embed_tokens.weight": normal(vocab_size, h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
        w[p + "self_attn.q_proj.weight"] = normal(nh * d, h)
        w[p + "self_attn.k_proj.weight"] = normal(nkv * d, h)
        w[p + "self_attn.v_proj.weight"] = normal(nkv * d, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, nh * d)
        w[p + "block_sparse_moe.gate.weight"] = normal(c["num_local_experts"], h)
        for e in range(c["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            w[q + "w1.weight"] = normal(i, h)
            w[q + "w3.weight"] = normal(i, h)
            w[q + "w2.weight"] = normal(h, i)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = normal(vocab_size, h)
    return w


def _write(target: Path) -> None:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    tokenizer_json = _tokenizer_json()
    tokenizer = Tokenizer.from_str(tokenizer_json)
    vocab_size = tokenizer.get_vocab_size()
    config = dict(CONFIG, vocab_size=vocab_size)
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (target / "tokenizer.json").write_text(tokenizer_json)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    save_file(_weights(vocab_size), str(target / "model.safetensors"), metadata={"format": "pt"})


def default_model_path() -> Path:
    """Return the built-in model's directory, writing it first if it is not there yet."""
    target = cache_root() / f"{NAME}-v{VERSION}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a private directory, then rename: concurrent first uses never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        _write(tmp / "model")
        try:
            os.replace(tmp / "model", target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
