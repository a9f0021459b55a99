"""Pagoda's engine: token ids in, token ids out, over a paged KV cache with continuous batching."""

from pagoda_engine.config import EngineConfig
from pagoda_engine.llm import LLM, CompletionOutput, RequestOutput
from pagoda_engine.sampling_params import InvalidRequestError, SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "InvalidRequestError", "RequestOutput", "SamplingParams"]
