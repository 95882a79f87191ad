"""Quantized test checkpoints, made from a full-precision one.

    dequantized_checkpoint(src, dst, "int8")   every weight expertmesh quantizes replaced by
                                               dequant(quantize(w)): transformers on it is the
                                               reference a quantized expertmesh must equal
    fp8_checkpoint(src, dst, (bn, bk))         the DeepSeek-V3 / Qwen3 FP8 layout: weights in
                                               float8_e4m3fn, a weight_scale_inv per block,
                                               config.json's quantization_config

The dequantization here is written out on its own (not expertmesh's), so a scale applied on
the wrong axis or dropped by the layers shows up as a difference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expertmesh_kernels.quant import quantize_fp8_blocks, quantize_int8

_FULL_PRECISION = ("embed_tokens", "lm_head", "norm", ".gate.weight", "shared_expert_gate")


def quantized(name: str, tensor: torch.Tensor) -> bool:
    """Whether expertmesh holds this checkpoint tensor quantized."""
    return name.endswith(".weight") and tensor.dim() == 2 and not any(p in name for p in _FULL_PRECISION)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    if block is None:  # int8: one scale per row
        return q.float() * scale.float()[:, None]
    n, k = q.shape
    per_elem = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
    return q.float() * per_elem


def _tensors(src: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _copy_dir(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if not file.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(file, dst / file.name)


def dequantized_checkpoint(src: Path, dst: Path, kind: str, block: tuple[int, int] = (128, 128)) -> Path:
    _copy_dir(src, dst)
    tensors = {}
    for name, t in _tensors(src).items():
        if quantized(name, t):
            q, scale = quantize_int8(t) if kind == "int8" else quantize_fp8_blocks(t, block)
            t = dequantize(q, scale, None if kind == "int8" else block).to(t.dtype)
        tensors[name] = t.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def fp8_checkpoint(src: Path, dst: Path, block: tuple[int, int] = (128, 128), drop_scale: str | None = None) -> Path:
    """`drop_scale`: a weight whose weight_scale_inv is left out (a broken checkpoint)."""
    _copy_dir(src, dst)
    tensors = {}
    for name, t in _tensors(src).items():
        if quantized(name, t):
            q, scale = quantize_fp8_blocks(t, block)
            tensors[name] = q.contiguous()
            if name != drop_scale:
                tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = scale.contiguous()
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
