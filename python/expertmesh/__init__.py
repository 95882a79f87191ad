"""expertmesh: an inference server for mixture-of-experts language models."""

from expertmesh.errors import InvalidRequestError
from expertmesh.llm import LLM
from expertmesh.outputs import CompletionOutput, Logprob, RequestOutput
from expertmesh.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "InvalidRequestError"]
__version__ = "0.1.0"
