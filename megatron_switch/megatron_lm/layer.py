"""`SwitchTransformerLayer`: the TransformerLayer that Megatron-LM's `--spec megatron_switch.spec
get_switch_gpt_layer_spec` builds for every layer, reading the Switch settings from Megatron-LM's
parsed arguments (Megatron-LM glue: the layer core never imports this)."""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from megatron_switch.layer import SwitchMLP
from megatron_switch.specs.gpt import dense_layer_spec, layer_norms, layer_spec_for


class SwitchTransformerLayer(TransformerLayer):
    """A TransformerLayer that chooses its MLP from its global layer number and Megatron-LM's args.

    For Megatron-LM's `--spec megatron_switch.spec get_switch_gpt_layer_spec`, which hands one
    uncalled spec object to GPTModel for every layer: the layer reads the Switch settings from
    Megatron-LM's parsed arguments (`megatron_switch.megatron_lm.arguments.layer_settings`) and
    builds the dense layer, or the Switch one at layers k, 2k, ... Its Switch statistics go to
    Megatron-LM's MoE log.
    """

    def __init__(self, config: TransformerConfig, submodules=None, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None,
                 vp_stage: Optional[int] = None):
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.utils import get_pg_rank

        from megatron_switch.megatron_lm.arguments import layer_settings
        from megatron_switch.megatron_lm.stats import report_switch_stats

        if submodules is not None:
            raise ValueError("SwitchTransformerLayer builds its own submodules; use "
                             "get_switch_gpt_layer_spec(config, switch) for explicit layer specs")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        switch, use_te, normalization, qk_layernorm = layer_settings()
        dense = dense_layer_spec(use_te, normalization, qk_layernorm)
        global_number = layer_number + get_transformer_layer_offset(
            config, vp_stage, get_pg_rank(pg_collection.pp))
        spec = layer_spec_for(dense, switch, layer_norms(dense, use_te)[1], global_number)
        super().__init__(config, spec.submodules, layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)
        if isinstance(self.mlp, SwitchMLP):
            report_switch_stats(self.mlp, config)
