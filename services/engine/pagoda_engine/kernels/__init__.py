"""Triton kernels for the GPU path.

Nothing is imported here on purpose: CPU machines without Triton can still import the package, and each
caller imports the one module it needs.

- ``kv_cache``: store a step's K/V into the paged cache, and the tile loader the attention kernels share.
- ``decode_attention``: one query token per sequence over a long paged context (split-KV).
- ``prefill_attention``: causal varlen prefill whose earlier tokens already sit in the paged cache.
- ``fused_ops``, ``sampling``: RMSNorm/rotary/SiLU and the sampler's fused draw.
- ``skinny_gemm``: linear layers over a few rows (decode), reading the weight once at full bandwidth.
- ``sm_count``: the SM count grids are sized by.
- ``compile_watch``: which kernels compile inside a block (warm-up must leave none for serving).
"""
