"""Load a Hugging Face checkpoint directory into an expertmesh model.

A checkpoint is a directory with config.json and safetensors weights: one model.safetensors,
or shards listed by model.safetensors.index.json, or (without an index) every *.safetensors
file in the directory. Tensors stream one at a time into the model's preallocated
parameters, cast to the requested dtype on the way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from expertmesh.models.decoder import MoeForCausalLM
from expertmesh.models.registry import get_model_class
from expertmesh.quant.apply import apply_quantization
from expertmesh.quant.config import QuantConfig, resolve_quantization

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(model_path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict, with clear errors for bad paths."""
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"model path {str(path)!r} is not a directory (expected a checkpoint directory)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model path {str(path)!r} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    return config


def resolve_dtype(dtype: str | torch.dtype, hf_config: dict[str, Any], device: torch.device) -> torch.dtype:
    """The dtype to run in. "auto" follows the checkpoint (dtype / torch_dtype in config.json),
    except that half types run as fp32 on the CPU, where fp32 is both faster and exact."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype == "auto":
        name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        resolved = DTYPES.get(str(name).removeprefix("torch."), torch.float32)
        return torch.float32 if device.type == "cpu" else resolved
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def weight_files(model_path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, in load order."""
    path = Path(model_path)
    index = path / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} lists shard {file.name!r}, which is not in {str(path)!r}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"model path {str(path)!r} has no weights: expected model.safetensors or shards with {_INDEX_FILE} "
            "(only safetensors is supported)"
        )
    return files


def iterate_weights(model_path: str | Path, show_progress: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, safetensors slice) for every tensor of every weight file: nothing is read until
    the model takes the part it holds (`slice[...]`, layers/weights.py), valid until the next."""
    files = weight_files(model_path)
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
                    bar.update(1)


def load_model(
    model_path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    shard: Callable[[MoeForCausalLM], None] | None = None,
    quantization: str | None = None,
) -> tuple[MoeForCausalLM, dict[str, Any]]:
    """Build the model config.json names and fill it from the checkpoint.

    `shard`, if given, runs between building and loading: it may make layers hold only part of
    their weights (parallel/apply.py), and loading then reads only those parts. Then layers
    quantize (quant/apply.py) as `quantization` ("int8", "fp8") or the checkpoint's
    quantization_config asks; the model's `quant_config` says which (None: full precision).
    Returns (model in eval mode, the config.json dict).
    """
    hf_config = read_hf_config(model_path)
    model_cls = get_model_class(hf_config)
    quant: QuantConfig | None = resolve_quantization(quantization, hf_config)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, hf_config, device)
    weight_files(model_path)  # fail on missing weight files before allocating the model
    with torch.device(device):
        model = model_cls(hf_config, dtype=torch_dtype)
        if shard is not None:
            shard(model)
        if quant is not None:
            apply_quantization(model, quant)
    model.quant_config = quant
    model.load_weights(iterate_weights(model_path, show_progress=show_progress))
    return model.eval(), hf_config
