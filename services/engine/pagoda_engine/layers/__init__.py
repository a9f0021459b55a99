"""Model building blocks: attention backends, sampler and friends."""
