"""Megatron ModuleSpecs with Switch layers: GPT (`gpt.get_switch_gpt_layer_spec`) and T5
(`t5.get_switch_t5_layer_specs`), each a Switch MLP at layers k, 2k, ... and megatron-core's dense
layers elsewhere (Transformer Engine where usable, local layers with SDPA attention otherwise).
Megatron-LM's `--spec megatron_switch.spec get_switch_gpt_layer_spec` is the `megatron_switch.spec`
face over these."""

from megatron_switch.specs.gpt import (
    SDPAttention,
    TorchNorm,
    dense_layer_spec,
    get_switch_gpt_layer_spec,
    layer_norms,
    layer_spec_for,
    switch_mlp_spec,
    with_sdp_attention,
)
from megatron_switch.specs.t5 import get_switch_t5_layer_specs

__all__ = ["SDPAttention", "TorchNorm", "dense_layer_spec", "get_switch_gpt_layer_spec", "get_switch_t5_layer_specs",
           "layer_norms", "layer_spec_for", "switch_mlp_spec", "with_sdp_attention"]
