"""The decoder every supported MoE architecture shares, and its weight loading.

Llama-style pre-norm blocks: x + attn(norm(x)), then x + mlp(norm(x)), where mlp is a
FusedMoE (or a plain SwiGLU MLP in dense layers). Architecture files subclass
MoeForCausalLM, turn their HF config into a DecoderConfig and, if needed, rename their
checkpoint's weights or swap the MLP.

Parameter names follow the HF checkpoints (model.layers.N.self_attn.q_proj.weight, ...), so
loading is mostly a lookup. Experts are the exception: the checkpoint holds them per expert
(mlp.experts.J.{gate,up,down}_proj.weight) or fused (mlp.experts.{gate_up_proj,down_proj});
both land in FusedMoE's w_gate_up / w_down. An FP8 checkpoint adds a `weight_scale_inv` beside
each quantized weight; it loads into the layer's `weight_scale` (quant/format.py).

Legend: T tokens, H hidden, NH/NKV heads, D head dim, V vocab, S sampled rows, E experts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.layers.attention import Attention, AttentionMetadata
from expertmesh.layers.linear import Embedding, Linear
from expertmesh.layers.moe import FusedMoE
from expertmesh.layers.norm import RMSNorm
from expertmesh.layers.rotary import RotaryEmbedding, apply_rotary
from expertmesh.layers.weights import load
from expertmesh.models.arch_config import DecoderConfig

_EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")
_PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale)$")
_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)$")
_FUSED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class SelfAttentionBlock(nn.Module):
    """q/k/v projections, optional q/k norms, RoPE, paged attention, output projection."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        h, nh, nkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, d
        self.q_proj = Linear(h, nh * d, bias=cfg.qkv_bias, dtype=dtype)
        self.k_proj = Linear(h, nkv * d, bias=cfg.qkv_bias, dtype=dtype)
        self.v_proj = Linear(h, nkv * d, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = Linear(nh * d, h, bias=cfg.o_bias, dtype=dtype)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "per_head":
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(nh * d, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(nkv * d, cfg.rms_norm_eps, dtype)
        elif cfg.qk_norm is not None:
            raise ValueError(f"qk_norm must be None, 'per_head' or 'full', got {cfg.qk_norm!r}")
        self.clip_qkv = cfg.clip_qkv
        self.attn = Attention(nh, nkv, d, scale=d**-0.5, sliding_window=cfg.sliding_windows[layer_idx])

    def own_heads(self, q_heads: tuple[int, int], kv_heads: tuple[int, int], add_bias: bool) -> None:
        """Keep query heads [q_heads) and KV heads [kv_heads) (the group those queries read):
        q/k/v keep their rows, o_proj its columns, so the output is a partial sum;
        `add_bias` says whether this share adds o_proj's bias. A full-width q/k norm keeps its
        whole weight: it needs every head's statistics (whoever split the heads supplies them)."""
        d = self.head_dim
        (q0, q1), (k0, k1) = q_heads, kv_heads
        self.q_proj.own(rows=(q0 * d, q1 * d))
        self.k_proj.own(rows=(k0 * d, k1 * d))
        self.v_proj.own(rows=(k0 * d, k1 * d))
        self.o_proj.own(cols=(q0 * d, q1 * d), add_bias=add_bias)
        self.num_heads, self.num_kv_heads = q1 - q0, k1 - k0
        self.attn.num_heads, self.attn.num_kv_heads = self.num_heads, self.num_kv_heads

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, NH*D], [T, NKV*D] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (y.clamp(-self.clip_qkv, self.clip_qkv) for y in (q, k, v))
        q = q.view(t, self.num_heads, self.head_dim)  # [T, NH, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, NKV, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)  # [T, NKV, D]
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attn(q, k, v, kv_cache, meta)  # [T, NH, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))  # [T, H]


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): dense layers and Qwen2-MoE's shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, dtype=dtype)
        self.up_proj = Linear(hidden_size, intermediate_size, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype=dtype)

    def own(self, intermediate: tuple[int, int]) -> None:
        """Keep intermediate features [intermediate): the output is then a partial sum."""
        self.gate_proj.own(rows=intermediate)
        self.up_proj.own(rows=intermediate)
        self.down_proj.own(cols=intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, mlp: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = SelfAttentionBlock(cfg, layer_idx, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = mlp

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, meta)  # [T, H]
        return h + self.mlp(self.post_attention_layernorm(h))  # [T, H]


class DecoderStack(nn.Module):
    """Embedding, decoder layers and final norm (the HF `model.` prefix)."""

    def __init__(self, cfg: DecoderConfig, mlps: list[nn.Module], dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, mlp, dtype) for i, mlp in enumerate(mlps))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rotary.cos_sin(positions, h.dtype)  # [T, D/2] x2, shared by all layers
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(h, cos, sin, kv_cache, meta)
        return self.norm(h)  # [T, H]


class MoeForCausalLM(nn.Module):
    """Base of every architecture. Subclasses set `architecture` and `config_from_hf`."""

    architecture = ""

    @classmethod
    def config_from_hf(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        raise NotImplementedError

    def __init__(self, hf_config: dict[str, Any], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        cfg = self.config_from_hf(hf_config)
        self.config = cfg
        self._dtype = dtype
        self.quant_config: Any = None  # the QuantConfig its weights are held in (set by models/loader.py)
        self.model = DecoderStack(cfg, [self.make_mlp(cfg, i, dtype) for i in range(cfg.num_layers)], dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_mlp(self, cfg: DecoderConfig, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        if layer_idx in cfg.dense_layers:
            return DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size, dtype)
        return FusedMoE(cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.moe_intermediate_size,
                        cfg.renormalize, dtype)

    # Properties the model runner sizes the KV cache with.
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads this model's attention holds (all of them unless its heads were split)."""
        return self.model.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, H] after the final norm, for a flat batch of tokens [T]."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"kv_caches has {len(kv_caches)} entries, expected one per layer ({self.num_layers})")
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, H] -> [S, V] fp32
        return self.lm_head(hidden).float()

    # ---- weight loading -------------------------------------------------------------------

    def rename_weight(self, name: str) -> str:
        """Map a checkpoint name to this model's naming; architectures override."""
        return name

    def expected_weights(self) -> set[str]:
        """Every weight a checkpoint must provide, experts listed one projection at a time."""
        names = set()
        for name, param in self.named_parameters():  # tied lm_head appears once, as the embedding
            if name.endswith((".w_gate_up", ".w_down", "_scale")) and not name.endswith(".weight_scale"):
                continue
            if getattr(param, "from_checkpoint", True):  # not scales computed at load time
                names.add(name)
        for prefix, module in self.named_modules():
            if isinstance(module, FusedMoE):
                kinds = ("weight", "weight_scale") if module.format is not None and module.format.prequantized \
                    else ("weight",)
                names.update(f"{prefix}.experts.{e}.{p}.{kind}" for e in range(module.num_experts)
                             for p in _EXPERT_PARTS for kind in kinds)
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Copy (name, tensor or safetensors slice) pairs in, casting to the model dtype and
        reading only what each parameter holds; error on extra or missing ones."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        pending = self.expected_weights()
        for raw_name, tensor in weights:
            if raw_name.endswith("rotary_emb.inv_freq"):  # derived buffer some checkpoints store
                continue
            if raw_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied to the embedding; some tied checkpoints still store a copy
            name = self.rename_weight(raw_name)
            name = name.removesuffix("_inv") if name.endswith(".weight_scale_inv") else name
            if m := _PER_EXPERT.match(name):
                moe = self._moe_at(modules, m.group(1), raw_name)
                load_part = moe.load_expert_weight if m.group(4) == "weight" else moe.load_expert_scale
                load_part(int(m.group(2)), m.group(3), tensor)
                pending.discard(f"{m.group(1)}.experts.{m.group(2)}.{m.group(3)}.{m.group(4)}")
            elif m := _FUSED_EXPERTS.match(name):
                moe = self._moe_at(modules, m.group(1), raw_name)
                moe.load_fused_weight(m.group(2), tensor)
                pending.difference_update(f"{m.group(1)}.experts.{e}.{p}.weight" for e in range(moe.num_experts)
                                          for p in _FUSED_PARTS[m.group(2)])
            elif name in params:
                load(params[name], tensor, raw_name)  # only the part the parameter holds is read
                pending.discard(name)
            else:
                raise ValueError(f"checkpoint weight {raw_name!r} is not a weight of {self.architecture} (unexpected)")
        if pending:
            missing = sorted(pending)
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} weights of {self.architecture}: {shown}")

    def _moe_at(self, modules: dict[str, nn.Module], prefix: str, raw_name: str) -> FusedMoE:
        moe = modules.get(prefix)
        if not isinstance(moe, FusedMoE):
            raise ValueError(
                f"checkpoint weight {raw_name!r} is an expert weight, but {prefix} of {self.architecture} is not an MoE layer"
            )
        return moe
