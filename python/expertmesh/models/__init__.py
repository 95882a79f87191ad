"""Model definitions (one file per architecture), the registry, and the checkpoint loader."""

from expertmesh.models.loader import load_model, read_hf_config
from expertmesh.models.registry import get_model_class, supported_architectures

__all__ = ["get_model_class", "load_model", "read_hf_config", "supported_architectures"]
