"""Whole models built on megatron-core with Switch layers: `t5` (the paper's encoder-decoder, as the
released Switch checkpoints compute it) and `t5_hf` (its correspondence with Hugging Face's
`SwitchTransformersForConditionalGeneration`: configs and weights)."""
