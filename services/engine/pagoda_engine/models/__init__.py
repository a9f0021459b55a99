"""Model definitions (Llama, Qwen2, Qwen3), the architecture registry and the weight loader."""
