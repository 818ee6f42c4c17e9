"""Checkpoint interchange: Hugging Face SwitchTransformers weights to and from Switch layers."""
