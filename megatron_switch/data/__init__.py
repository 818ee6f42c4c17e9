"""Data: tokenizers, preprocessing into Megatron's indexed .bin/.idx format, the embedded default
corpus, and GPT datasets through megatron.core.datasets."""
