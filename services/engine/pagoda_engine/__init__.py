"""Pagoda's engine: token ids in, token ids out, over a paged KV cache with continuous batching."""
