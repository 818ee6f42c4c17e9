"""Megatron ModuleSpecs for Switch T5 (the paper's encoder-decoder): megatron-core's `T5Model`
with a Switch MLP every k-th layer of each stack.

`get_switch_t5_layer_specs(encoder_config, decoder_config, switch)` returns the encoder and decoder
`TransformerBlockSubmodules`: layers k, 2k, ... (1-based, counted in each stack) are Switch layers,
as in Switch-Base/-Large (every 2nd FFN of encoder and decoder). Dense parts are megatron-core's
T5 layer specs: Transformer Engine where usable, otherwise the local ones with `SDPAttention`
(self and cross attention) so the model also runs on CPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

from megatron.core.models.T5 import t5_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.config import SwitchConfig
from megatron_switch.experts import transformer_engine_available
from megatron_switch.specs.gpt import layer_norms, layer_spec_for, with_sdp_attention


def _dense_t5_layer_specs(use_transformer_engine: bool) -> Tuple[ModuleSpec, ModuleSpec]:
    if use_transformer_engine:
        return (t5_spec.encoder_model_with_transformer_engine_default_spec(),
                t5_spec.decoder_model_with_transformer_engine_default_spec())
    return (with_sdp_attention(t5_spec.encoder_model_with_local_spec()),
            with_sdp_attention(t5_spec.decoder_model_with_local_spec()))


def _stack(dense: ModuleSpec, switch: SwitchConfig, num_layers: int,
           use_transformer_engine: bool) -> TransformerBlockSubmodules:
    final_norm, switch_norm = layer_norms(dense, use_transformer_engine)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec_for(dense, switch, switch_norm, n) for n in range(1, num_layers + 1)],
        layer_norm=final_norm)


def get_switch_t5_layer_specs(
    encoder_config: TransformerConfig,
    decoder_config: TransformerConfig,
    switch: Optional[SwitchConfig],
    *,
    use_transformer_engine: Optional[bool] = None,
) -> Tuple[TransformerBlockSubmodules, TransformerBlockSubmodules]:
    """(encoder, decoder) block specs for `T5Model(config=decoder_config, encoder_config=...,
    transformer_encoder_layer_spec=encoder, transformer_decoder_layer_spec=decoder, ...)`.

    Each stack has its config's num_layers layers; layers k, 2k, ... of each are Switch layers
    (k = switch.expert_interval; switch None: every layer dense). use_transformer_engine: None picks TE
    when it is usable.
    Megatron's T5 has no pipeline split of a stack, so every layer of a stack is built here.
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    encoder_dense, decoder_dense = _dense_t5_layer_specs(use_transformer_engine)
    return (_stack(encoder_dense, switch, encoder_config.num_layers, use_transformer_engine),
            _stack(decoder_dense, switch, decoder_config.num_layers, use_transformer_engine))
