"""Shared fixtures: small random-weight checkpoints with a tokenizer, and a private cache dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_factory import add_default_tokenizer, make_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the built-in model the tests make out of the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EXPERTMESH_CACHE", str(tmp_path_factory.mktemp("expertmesh-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory) -> Path:
    """A 2-layer Mixtral (8 experts, top-2, GQA 2) with the default tokenizer's vocabulary."""
    path = make_checkpoint(
        tmp_path_factory.mktemp("mixtral"),
        arch="mixtral",
        vocab_size=652,
        initializer_range=0.1,
        max_position_embeddings=512,
    )
    return add_default_tokenizer(path)
