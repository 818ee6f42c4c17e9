"""Megatron ModuleSpecs for Switch GPT models: SwitchMLP every k-th layer, dense MLP elsewhere.

`get_switch_gpt_layer_spec(config, switch)` returns the `TransformerBlockSubmodules` of this
pipeline stage (layer numbers are global, so the Switch layers sit at the same depth for any
pipeline split). Where Transformer Engine is usable (`experts.transformer_engine_available`) the
dense parts come from Megatron's TE spec; otherwise from its local spec, with an attention core on
PyTorch's `scaled_dot_product_attention` that also runs on CPU. The per-layer choice
(`layer_spec_for`), the dense layer spec and the norms are shared with the T5 specs (t5.py) and with
Megatron-LM's `--spec` face (`megatron_switch.spec`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_switch.config import SwitchConfig
from megatron_switch.experts import transformer_engine_available
from megatron_switch.layer import SwitchMLP


class SDPAttention(DotProductAttention):
    """Megatron's DotProductAttention on torch's scaled_dot_product_attention (CPU and GPU).

    Inputs [s, b, n, d] (n heads on this TP rank, GQA groups expanded here); output [s, b, n * d].
    `attention_mask` follows Megatron: True marks a position that must not be attended.
    `attention_bias` (T5's relative position bias, [1 or b, n, s_q, s_k]) is added to the scaled
    scores; masked (and, for a causal core without a mask, future) positions get -inf.
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
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention does not support packed sequences")
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None if attention_mask is None else ~attention_mask
        if attention_bias is not None:  # a float mask: the bias where attending is allowed, else -inf
            if causal:
                mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
                causal = False
            bias = attention_bias.to(q.dtype)
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.sdpa_scale,
            dropout_p=self.dropout_p if self.training else 0.0)
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


class TorchNorm:
    """megatron-core's `WrappedTorchNorm` (torch's LayerNorm or RMSNorm, used when neither Transformer
    Engine nor apex is installed), also under sequence parallelism, which megatron's wrapper refuses:
    each TP rank normalises its own sequence shard, so its weight gradient is a partial sum; the
    parameters are marked `sequence_parallel`, as megatron's fused norms mark theirs, and the
    gradient reduction (megatron-core's DDP, or --ddp-impl local) sums them over the TP group."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps)
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"--normalization {config.normalization} with --sequence-parallel: use LayerNorm or "
                             f"RMSNorm (or install Transformer Engine)")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def dense_layer_spec(use_transformer_engine: bool, normalization: Optional[str],
                      qk_layernorm: bool) -> ModuleSpec:
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    layer = with_sdp_attention(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm))
    norms = {name: TorchNorm for name in ("input_layernorm", "pre_mlp_layernorm")
             if getattr(layer.submodules, name) is WrappedTorchNorm}
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, **norms))


def with_sdp_attention(layer: ModuleSpec) -> ModuleSpec:
    """A local TransformerLayer spec whose attention cores (self and, if present, cross) are
    `SDPAttention`, so that it also runs on CPU."""
    changes = {}
    for name in ("self_attention", "cross_attention"):
        attention = getattr(layer.submodules, name)
        if isinstance(attention, ModuleSpec) and attention.submodules is not None:
            changes[name] = dataclasses.replace(attention, submodules=dataclasses.replace(
                attention.submodules, core_attention=SDPAttention))
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, **changes))


def layer_norms(dense: ModuleSpec, use_transformer_engine: bool) -> Tuple[object, object]:
    """(final block norm, Switch layers' pre-MLP norm) that go with the dense layer spec `dense`.

    TE's dense specs fuse the norms into their linears; a Switch MLP needs a norm of its own."""
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm, TENorm
    return dense.submodules.input_layernorm, dense.submodules.pre_mlp_layernorm


def switch_mlp_spec(switch: SwitchConfig, layer_number: int) -> ModuleSpec:
    """The `mlp` entry of a TransformerLayer spec for a Switch layer."""
    return ModuleSpec(module=SwitchMLP, params={"switch": switch, "layer_number": layer_number})


def layer_spec_for(dense: ModuleSpec, switch: Optional[SwitchConfig], switch_norm, layer_number: int) -> ModuleSpec:
    """The spec of global layer `layer_number` (1-based): `dense`, or with a Switch MLP (and its
    pre-MLP norm) when `switch.is_switch_layer(layer_number)`. switch None: a dense model."""
    if switch is None or not switch.is_switch_layer(layer_number):
        return dense
    return dataclasses.replace(dense, submodules=dataclasses.replace(
        dense.submodules, pre_mlp_layernorm=switch_norm, mlp=switch_mlp_spec(switch, layer_number)))


def get_switch_gpt_layer_spec(
    config: TransformerConfig,
    switch: Optional[SwitchConfig],
    *,
    normalization: Optional[str] = None,
    qk_layernorm: bool = False,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage: layers k, 2k, ... (1-based, global) are Switch layers
    (switch None: every layer dense, the baseline the planner and benchmarks compare with).

    use_transformer_engine: None picks TE when it is usable (see `transformer_engine_available`).
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    dense = dense_layer_spec(use_transformer_engine, normalization or config.normalization, qk_layernorm)
    final_norm, switch_norm = layer_norms(dense, use_transformer_engine)
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    layer_specs = [layer_spec_for(dense, switch, switch_norm, offset + index + 1)
                   for index in range(get_num_layers_to_build(config, vp_stage, pp_rank))]
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)
