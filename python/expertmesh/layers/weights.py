"""Parameters that hold part of a checkpoint tensor, and reading exactly that part.

A layer that keeps only a slice of its full weight (its share under tensor or expert
parallelism: `Linear.own`, `FusedMoE.own`, ...) reallocates the parameter at the slice's shape
and records where the slice sits (`hold`). Loading then reads only that slice from the
checkpoint (`read`): `source` is a tensor or a safetensors slice (`safe_open(...).get_slice`),
which reads just the requested rows from disk. Layers know which part they hold; who decides
the split (parallel/apply.py) never touches loading.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def empty_parameter(shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device), requires_grad=False)


def hold(param: nn.Parameter, full_shape: tuple[int, ...], index: tuple[slice, ...]) -> nn.Parameter:
    """Mark `param` as holding full_tensor[index] of a tensor of `full_shape`."""
    param.held_full_shape = tuple(full_shape)  # type: ignore[attr-defined]
    param.held_index = index  # type: ignore[attr-defined]
    return param


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return getattr(param, "held_full_shape", tuple(param.shape))


def source_shape(source: Any) -> tuple[int, ...]:
    """Shape of a checkpoint tensor: a torch tensor or a safetensors slice."""
    return tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)


def read(source: Any, index: tuple[slice, ...] | None = None) -> torch.Tensor:
    """source[index] as a tensor, reading only that part when source is a safetensors slice."""
    if index is None:
        return source[:] if hasattr(source, "get_shape") else source
    return source[index]


@torch.no_grad()
def load(param: torch.Tensor, source: Any, what: str) -> None:
    """Copy the part of checkpoint tensor `source` that `param` holds (all of it by default),
    casting to the parameter's dtype; a shape that is not the full tensor's is an error.
    A parameter with a `weight_loader` (a quantized weight or its scales) fills itself."""
    want = full_shape(param)
    if source_shape(source) != want:
        raise ValueError(f"checkpoint weight {what!r} has shape {source_shape(source)}, expected {want}")
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        loader(source, what)
        return
    param.copy_(read(source, getattr(param, "held_index", None)))
