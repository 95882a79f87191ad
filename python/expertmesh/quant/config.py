"""Which quantization a model runs with: the user's --quantization and the checkpoint's own.

    --quantization int8   weight-only int8, one scale per output channel, quantized at load
    --quantization fp8    e4m3 weights with 128x128 block scales, quantized at load
    (checkpoint)          config.json's quantization_config {"quant_method": "fp8",
                          "weight_block_size": [bn, bk], "fmt": "e4m3",
                          "activation_scheme": "dynamic"}: the DeepSeek-V3 / Qwen3 FP8 layout
                          (weight in float8_e4m3fn, weight_scale_inv per block), loaded as is

A checkpoint that is already quantized runs in its own format: asking for another one, or a
quantization_config expertmesh cannot serve, is an InvalidRequestError naming what was found
and what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from expertmesh.errors import InvalidRequestError
from expertmesh.quant.format import WeightFormat

METHODS = ("int8", "fp8")
_CHECKPOINT_SUPPORTED = ("quant_method 'fp8' with weight_block_size [bn, bk], fmt 'e4m3' and "
                         "activation_scheme 'dynamic' (the DeepSeek-V3 / Qwen3 FP8 layout)")


@dataclass(frozen=True)
class QuantConfig:
    format: WeightFormat
    skip: tuple[str, ...] = ()  # module names (or their parts) left in full precision

    @property
    def method(self) -> str:
        return self.format.kind

    def skips(self, module_name: str) -> bool:
        return any(part in module_name for part in self.skip)


def check_method(value: object) -> None:
    if value is not None and value not in METHODS:
        raise InvalidRequestError(f"quantization must be one of {list(METHODS)} (or unset), got {value!r}",
                                  param="quantization", value=value)


def resolve_quantization(requested: str | None, hf_config: dict[str, Any]) -> QuantConfig | None:
    """The QuantConfig for a checkpoint's config.json and the user's choice (None: neither)."""
    check_method(requested)
    stored = hf_config.get("quantization_config")
    if stored is None:
        return None if requested is None else QuantConfig(WeightFormat(requested))
    found = _checkpoint_format(stored)
    if requested is not None and requested != found.kind:
        raise InvalidRequestError(
            f"the checkpoint is already quantized ({found.kind}, block {list(found.block)}); it cannot be served "
            f"as quantization={requested!r}: drop the option or pass {found.kind!r}",
            param="quantization", value=requested)
    skip = stored.get("modules_to_not_convert") or stored.get("ignored_layers") or []
    return QuantConfig(found, tuple(str(s) for s in skip))


def _checkpoint_format(stored: object) -> WeightFormat:
    def refuse(what: str, value: object) -> InvalidRequestError:
        return InvalidRequestError(f"config.json quantization_config has {what}={value!r}; expertmesh serves "
                                   f"{_CHECKPOINT_SUPPORTED}", param="quantization_config", value=value)

    if not isinstance(stored, dict):
        raise refuse("type", type(stored).__name__)
    method = stored.get("quant_method")
    if method != "fp8":
        raise refuse("quant_method", method)
    if str(stored.get("fmt", "e4m3")) != "e4m3":
        raise refuse("fmt", stored.get("fmt"))
    if stored.get("activation_scheme", "dynamic") != "dynamic":
        raise refuse("activation_scheme", stored.get("activation_scheme"))
    block = stored.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b >= 1 for b in block)):
        raise refuse("weight_block_size", block)
    return WeightFormat("fp8", (block[0], block[1]), prequantized=True)
