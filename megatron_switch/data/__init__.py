"""Data: tokenizers, preprocessing into Megatron's indexed .bin/.idx format, the embedded default
corpus, and GPT datasets through megatron.core.datasets."""

# The byte-level tokenizer's vocabulary: bytes 0-255, end of document 256, padding 257 (tokenizers.py).
BYTE_LEVEL_VOCAB_SIZE = 258
