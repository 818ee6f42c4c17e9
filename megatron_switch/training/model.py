"""Build the model of a run (GPT, or T5 with --model t5), with an initialisation that does not depend on the layout.

Every parameter is drawn from a generator seeded by (seed, its global name) at its full,
unsharded shape, and this rank keeps its tensor-parallel slice; Switch layers draw each expert by
(seed, layer, expert) themselves. So 1 process, TP x EP and PP runs start from the same weights.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_switch.initialization import seeded_generator, switch_init_method, truncated_normal_
from megatron_switch.layer import SwitchMLP
from megatron_switch.parallel import padded_vocab_size
from megatron_switch.specs import get_switch_gpt_layer_spec
from megatron_switch.specs.t5_model import T5Settings, build_switch_t5


def run_config_fields(args) -> dict:
    """TransformerConfig fields that are not the architecture: parallelism, precision, recomputation,
    initialisation (the same for every model)."""
    init = (switch_init_method(args.switch_init_scale or 0.1) if args.init_method == "switch" else None)
    extra = dict(init_method=init, output_layer_init_method=init) if init else {}
    return dict(
        init_method_std=args.init_method_std, use_cpu_initialization=True,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, **extra)


def transformer_config(args) -> TransformerConfig:
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, normalization=args.normalization,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout, **run_config_fields(args))


class _GPTModel(GPTModel):
    """megatron-core's GPTModel, except that with tied embeddings and PP > 1 the last stage's copy of
    the word embeddings is not synchronised by megatron's all-reduce (which moves it to CUDA first):
    `init_dense_parameters` draws it from the embedding's own seed, so both copies start equal on
    any device. Their gradients are summed over the embedding group at every step."""

    def setup_embeddings_and_output_layer(self) -> None:
        embd_group, self.embd_group = self.embd_group, None  # not in a group: no start-up all-reduce
        try:
            super().setup_embeddings_and_output_layer()
        finally:
            self.embd_group = embd_group


def global_name(name: str, layer_offset: int) -> str:
    return re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + layer_offset}.", name)


def init_dense_parameters(model: torch.nn.Module, args, depth: int | None = None) -> None:
    """Draw every non-Switch parameter at its full shape from (seed, global name); keep this rank's
    tensor-parallel slice. Norm weights 1, biases 0, weights N(0, std) (output projections scaled
    by 1/sqrt(2 L), L = depth or --num-layers, as Megatron does) or the paper's truncated normal with
    --init-method switch."""
    switch_params = {id(p) for m in model.modules() if isinstance(m, SwitchMLP) for p in m.parameters()}
    offset = get_transformer_layer_offset(model.config)
    tp, tp_rank = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_tensor_model_parallel_rank())
    for name, param in model.named_parameters():
        if id(param) in switch_params:
            continue
        gname = global_name(name, offset)
        if getattr(param, "shared_embedding", False):  # the last stage's copy of tied embeddings
            gname = "embedding.word_embeddings.weight"
        shape = list(param.shape)
        sharded = getattr(param, "tensor_model_parallel", False)
        if sharded:
            shape[param.partition_dim] *= tp
        if param.dim() == 1:
            full = torch.ones(shape) if "norm" in gname and gname.endswith("weight") else torch.zeros(shape)
        else:
            generator = seeded_generator(args.seed, zlib.crc32(gname.encode()))
            full = torch.empty(shape)
            if args.init_method == "switch":
                truncated_normal_(full, args.switch_init_scale or 0.1, generator=generator)
            else:
                std = args.init_method_std
                if gname.endswith(("linear_proj.weight", "linear_fc2.weight")):
                    std /= math.sqrt(2.0 * (depth or args.num_layers))
                full.normal_(0.0, std, generator=generator)
        if sharded:
            full = full.chunk(tp, dim=param.partition_dim)[tp_rank]
        with torch.no_grad():
            param.copy_(full)


def padded_vocab(args, vocab_size: int) -> int:
    return padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)


def build_model(args, vocab_size: int) -> torch.nn.Module:
    """The run's model: GPT, or the encoder-decoder with --model t5."""
    return build_t5_model(args, vocab_size) if args.model == "t5" else build_gpt_model(args, vocab_size)


def t5_settings(args, vocab_size: int) -> T5Settings:
    """The Switch T5 the flags describe (`--model t5`)."""
    return T5Settings(
        vocab_size=padded_vocab(args, vocab_size), d_model=args.hidden_size, num_heads=args.num_attention_heads,
        d_kv=args.kv_channels or args.hidden_size // args.num_attention_heads, d_ff=args.ffn_hidden_size,
        encoder_layers=args.encoder_num_layers, decoder_layers=args.decoder_num_layers,
        relative_attention_num_buckets=args.relative_attention_num_buckets,
        relative_attention_max_distance=args.relative_attention_max_distance, activation=args.feed_forward_proj,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights, dropout=args.hidden_dropout,
        switch=args.switch)


def build_t5_model(args, vocab_size: int) -> torch.nn.Module:
    """Switch T5 (specs.t5_model: as the released checkpoints compute it), initialised as GPT is:
    the layout-independent draw of every dense parameter, the Switch layers' own per-expert draw."""
    settings = t5_settings(args, vocab_size)
    model = build_switch_t5(settings, **run_config_fields(args))
    model.switch_config = args.switch
    init_dense_parameters(model, args, depth=max(settings.encoder_layers, settings.decoder_layers))
    return model


def build_gpt_model(args, vocab_size: int) -> torch.nn.Module:
    config = transformer_config(args)
    switch = args.switch  # None: a dense GPT
    model = _GPTModel(
        config=config, transformer_layer_spec=get_switch_gpt_layer_spec(config, switch),
        vocab_size=padded_vocab(args, vocab_size),
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="learned_absolute")
    model.switch_config = args.switch  # the whole model's (checkpoints record it from any stage)
    init_dense_parameters(model, args)
    return model
