"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from typing import Any

from expertmesh.models.decoder import MoeForCausalLM
from expertmesh.models.mixtral import MixtralForCausalLM
from expertmesh.models.olmoe import OlmoeForCausalLM
from expertmesh.models.qwen2_moe import Qwen2MoeForCausalLM
from expertmesh.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[MoeForCausalLM]] = {
    cls.architecture: cls
    for cls in (MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM)
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(hf_config: dict[str, Any]) -> type[MoeForCausalLM]:
    """The class for the first architecture in config.json we support, or a clear error."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"unsupported architecture {names or '(config.json lists none)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
