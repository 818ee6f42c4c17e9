"""Megatron ModuleSpecs for Switch GPT models: SwitchMLP every k-th layer, dense MLP elsewhere.

`get_switch_gpt_layer_spec(config, switch)` returns the `TransformerBlockSubmodules` of this
pipeline stage (layer numbers are global, so the Switch layers sit at the same depth for any
pipeline split). With Transformer Engine installed (and a GPU) the dense parts come from Megatron's
TE spec; otherwise from its local spec, with an attention core on PyTorch's
`scaled_dot_product_attention` that also runs on CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_switch.config import SwitchConfig
from megatron_switch.layer import SwitchMLP


class _QuietSwitchMLPSpec(logging.Filter):
    """TransformerLayer warns about every MLP spec it does not know, and SwitchMLP is one by design
    (its settings travel in the spec's params); drop that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_QuietSwitchMLPSpec())


class SDPAttention(DotProductAttention):
    """Megatron's DotProductAttention on torch's scaled_dot_product_attention (CPU and GPU).

    Inputs [s, b, n, d] (n heads on this TP rank, GQA groups expanded here); output [s, b, n * d].
    `attention_mask` follows Megatron: True marks a position that must not be attended.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale, **kwargs)
        self.sdpa_scale = softmax_scale or 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None if attention_mask is None else ~attention_mask
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.sdpa_scale,
            dropout_p=self.dropout_p if self.training else 0.0)
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


def transformer_engine_available() -> bool:
    """TE is usable only when it is installed and a GPU is present (TE cannot build modules on CPU)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def _dense_layer_spec(use_transformer_engine: bool, normalization: Optional[str],
                      qk_layernorm: bool) -> ModuleSpec:
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules, core_attention=SDPAttention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=attention))


def switch_mlp_spec(switch: SwitchConfig, layer_number: int) -> ModuleSpec:
    """The `mlp` entry of a TransformerLayer spec for a Switch layer."""
    return ModuleSpec(module=SwitchMLP, params={"switch": switch, "layer_number": layer_number})


def get_switch_gpt_layer_spec(
    config: TransformerConfig,
    switch: SwitchConfig,
    *,
    normalization: Optional[str] = None,
    qk_layernorm: bool = False,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage: layers k, 2k, ... (1-based, global) are Switch layers.

    use_transformer_engine: None picks TE when it is usable (see `transformer_engine_available`).
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    normalization = normalization or config.normalization
    dense = _dense_layer_spec(use_transformer_engine, normalization, qk_layernorm)
    final_norm = dense.submodules.input_layernorm
    switch_norm = dense.submodules.pre_mlp_layernorm
    if use_transformer_engine:
        # TE's dense spec fuses the norms into its linears; a Switch MLP needs a norm of its own.
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = switch_norm = TENorm
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    layer_specs = []
    for index in range(get_num_layers_to_build(config, vp_stage, pp_rank)):
        layer_number = offset + index + 1
        spec = dense
        if switch.is_switch_layer(layer_number):
            spec = dataclasses.replace(dense, submodules=dataclasses.replace(
                dense.submodules, pre_mlp_layernorm=switch_norm,
                mlp=switch_mlp_spec(switch, layer_number)))
        layer_specs.append(spec)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)
