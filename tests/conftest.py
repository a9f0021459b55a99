"""Shared fixtures: the default model (converted once per machine) and GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (fetched and converted on first use)."""
    from pagoda_client.fetch_model import DEFAULT_MODEL, fetch_model

    override = os.environ.get("PAGODA_TEST_MODEL_DIR")
    if override:
        return Path(override)
    return fetch_model(DEFAULT_MODEL)
