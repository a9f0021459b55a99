"""Attention over the paged KV cache, behind one backend interface."""

from pagoda_engine.layers.attention.backend import AttentionBackend
from pagoda_engine.layers.attention.layer import Attention, select_backend
from pagoda_engine.layers.attention.metadata import AttentionMetadata

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "select_backend"]
