"""Training utilities on megatron-core that also run on CPU (gloo)."""
