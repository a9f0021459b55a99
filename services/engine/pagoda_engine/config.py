"""EngineConfig: every knob of the engine in one place; service flags and env vars map onto it."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Knobs of one engine. Fields left ``None`` or ``"auto"`` are resolved from the model and device."""

    model: str
    # "auto" (safetensors checkpoint) or "dummy" (random weights of the config, for benchmarks).
    load_format: str = "auto"
    # "auto" keeps the checkpoint's dtype; or "float32", "bfloat16", "float16".
    dtype: str = "auto"
    # The KV cache's element type: "auto" is the model's dtype; "fp8" (alias "fp8_e4m3") stores float8
    # e4m3 with a scale of 1 (vLLM's fp8 without calibrated scales): half the bytes of bf16, so twice the
    # tokens in the same memory, at 3 mantissa bits per element. Decode attention reads half the bytes but
    # is not faster yet: widening the tiles bounds it (bench/RESULTS.md, sixth session).
    kv_cache_dtype: str = "auto"
    # "auto" is CUDA when present, else CPU.
    device: str = "auto"
    seed: int = 0
    # Tokens per KV-cache block: the unit of paging and of prefix-cache reuse.
    block_size: int = 16
    # Longest prompt + output; None: the model's max_position_embeddings.
    max_model_len: int | None = None
    # Sequences and tokens one step may process (decodes count one token each).
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # KV cache size: an explicit block count wins; else a fraction of the GPU memory left after a
    # warm-up pass; on CPU, ``cpu_kv_cache_gib``.
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # No CUDA graphs: every decode step runs eagerly.
    enforce_eager: bool = False
    # Largest decode batch captured in a CUDA graph; bigger batches run eagerly.
    max_cuda_graph_batch_size: int = 256
    # Processes (one per GPU, or CPU processes with gloo) one copy of the model is split over.
    tensor_parallel_size: int = 1
    # "auto" (Triton on CUDA, else torch), "torch" (the reference) or "triton".
    attention_backend: str = "auto"
    # Decode attention that gives a sequence bitwise the same output whatever batch it runs in: 15% slower
    # decode attention at 256 sequences. Attention only: the linear layers' kernels still change with the
    # number of rows (unlike vLLM's VLLM_BATCH_INVARIANT, which covers them too), so tokens may still
    # change with the batch. CUDA graphs match eager steps either way.
    batch_invariant: bool = False
    # Caps a request may ask for.
    max_logprobs: int = 20
    max_n: int = 16

    # ---- service: the gRPC server around the engine (python -m pagoda_engine) ----
    # Loopback by default: the engine is internal, reached through the tokenizer service.
    host: str = "127.0.0.1"
    port: int = 50051
    # Prometheus metrics over HTTP on this port; 0: off.
    metrics_port: int = 0
    # Sequences allowed to wait for their first prefill, counting those admitted but not yet seen by the
    # engine core and every sample of a request; beyond it Generate answers RESOURCE_EXHAUSTED.
    max_waiting_requests: int = 1024
    # On SIGTERM/SIGINT, how long in-flight requests may run before they are aborted.
    drain_grace_seconds: float = 30.0
    # Longest the engine core may go without finishing a step while it has requests: past it the engine is
    # stuck (a wedged GPU, a stopped process), so its streams end UNAVAILABLE and the service stops; 0: never.
    engine_step_timeout_s: float = 60.0
    # Largest gRPC message sent or received (a prompt of 1M token ids is about 5 MiB).
    max_message_bytes: int = 64 * 1024 * 1024
    # TLS: PEM certificate chain and private key. With a client CA as well, callers (the tokenizer service)
    # must present a certificate that CA signed (mutual TLS): the engine's way of knowing who calls it.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        self.model = os.path.expanduser(self.model)
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors or dummy, got {self.load_format!r}")
        if not (0 < self.port < 65536 and 0 <= self.metrics_port < 65536):
            raise ValueError(f"port must be in [1, 65535] and metrics_port in [0, 65535], got {self.port}, "
                             f"{self.metrics_port}")
        # Written so that NaN fails too: every comparison with it is false.
        if (self.max_waiting_requests < 1 or not 0 <= self.drain_grace_seconds < math.inf
                or self.max_message_bytes < 1 or not 0 <= self.engine_step_timeout_s < math.inf):
            raise ValueError("max_waiting_requests and max_message_bytes must be >= 1, drain_grace_seconds and "
                             "engine_step_timeout_s finite and >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be auto, fp8 or fp8_e4m3, got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}")
        if self.max_n > self.max_waiting_requests:
            # A request of n samples waits as n sequences: one of more than the cap could never be admitted.
            raise ValueError(f"max_n ({self.max_n}) must be <= max_waiting_requests ({self.max_waiting_requests})")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
