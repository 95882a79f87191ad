"""Quantization applied to a built model: which layers hold quantized weights.

`apply_quantization` runs after the model is built and split (parallel/apply.py) and before its
weights load (models/loader.load_model): every expert stack and every dense linear layer --
attention projections, dense and shared-expert MLPs -- holds its weight in the chosen format.
The router (FusedMoE.gate), Qwen2-MoE's one-row shared_expert_gate, the embedding and lm_head
stay in full precision: they are a small share of the bytes and decide which experts run and
which token wins, and a checkpoint's modules_to_not_convert adds to that list.
"""

from __future__ import annotations

from torch import nn

from expertmesh.layers.linear import Linear
from expertmesh.layers.moe import FusedMoE
from expertmesh.quant.config import QuantConfig

_FULL_PRECISION = ("lm_head", ".gate", "shared_expert_gate")  # name suffixes kept unquantized


def apply_quantization(model: nn.Module, config: QuantConfig) -> None:
    for name, module in model.named_modules():
        if config.skips(name):
            continue
        if isinstance(module, FusedMoE):
            module.quantize(config.format)
        elif isinstance(module, Linear) and not name.endswith(_FULL_PRECISION):
            module.quantize(config.format)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (quantized values and their scales included; a tied
    weight counted once)."""
    seen, total = set(), 0
    for p in model.parameters():  # parameters() yields a shared parameter once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
