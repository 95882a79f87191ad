"""expertmesh: an inference server for mixture-of-experts language models.

The top-level names are imported lazily (PEP 562), so `import expertmesh.sdk` (an HTTP client)
does not pull in torch and the engine; `from expertmesh import LLM` still works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from expertmesh.errors import InvalidRequestError
    from expertmesh.llm import LLM
    from expertmesh.outputs import CompletionOutput, Logprob, RequestOutput
    from expertmesh.sampling_params import SamplingParams

_LAZY = {
    "LLM": "expertmesh.llm",
    "SamplingParams": "expertmesh.sampling_params",
    "RequestOutput": "expertmesh.outputs",
    "CompletionOutput": "expertmesh.outputs",
    "Logprob": "expertmesh.outputs",
    "InvalidRequestError": "expertmesh.errors",
}

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "InvalidRequestError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'expertmesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
