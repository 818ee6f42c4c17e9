"""Megatron-LM model providers with Switch layers: the GPT provider wrapper (selects the Switch
spec through args.spec) and a T5 provider building megatron-core's T5Model with Switch stacks.
`launch.run` wraps the script's provider with the one for its script (`PROVIDERS`)."""

from __future__ import annotations

import copy
import functools
from typing import Callable

from megatron_switch.config import SwitchConfigError


def t5_model_provider(pre_process: bool = True, post_process: bool = True, add_encoder: bool = True,
                      add_decoder: bool = True, config=None, pg_collection=None):
    """Megatron-LM's T5 model-provider signature; returns a Switch T5Model."""
    from megatron.core.models.T5 import T5Model
    from megatron.training import get_args, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_switch.layer import SwitchMLP
    from megatron_switch.megatron_lm.arguments import (
        prepare_args,
        use_transformer_engine,
    )
    from megatron_switch.megatron_lm.stats import report_switch_stats
    from megatron_switch.specs.t5 import get_switch_t5_layer_specs

    args = get_args()
    if args.use_legacy_models:
        raise SwitchConfigError("--moe-switch builds megatron-core models: drop --use-legacy-models")
    if args.pipeline_model_parallel_size > 1:
        raise SwitchConfigError("Megatron-LM's T5 has no pipeline parallelism: use "
                                "--pipeline-model-parallel-size 1")
    switch = prepare_args(args)
    config = config or core_transformer_config_from_args(args)
    encoder_config = copy.deepcopy(config)
    encoder_config.num_layers = args.encoder_num_layers
    encoder_spec, decoder_spec = get_switch_t5_layer_specs(
        encoder_config, config, switch, use_transformer_engine=use_transformer_engine(args))
    print_rank_0(f"building Switch T5 model: {switch.num_experts} experts in layers "
                 f"{switch.expert_interval}, {2 * switch.expert_interval}, ... of each stack ...")
    model = T5Model(
        config=config, encoder_config=encoder_config,
        transformer_encoder_layer_spec=encoder_spec, transformer_decoder_layer_spec=decoder_spec,
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process, post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        relative_attention_num_buckets=args.relative_attention_num_buckets,
        relative_attention_max_distance=args.relative_attention_max_distance,
        add_encoder=add_encoder, add_decoder=add_decoder, pg_collection=pg_collection)
    # Encoder and decoder layers of one depth share a log slot: each adds half its value.
    slots = max(args.num_layers, args.encoder_num_layers)
    for module in model.modules():
        if isinstance(module, SwitchMLP):
            report_switch_stats(module, config, weight=0.5, num_slots=slots)
    return model


def _gpt_provider(model_provider: Callable) -> Callable:
    """Megatron-LM's GPT model provider, with --moe-switch selecting our spec via args.spec."""
    from megatron.training import get_args

    from megatron_switch.megatron_lm.arguments import SPEC, prepare_args

    @functools.wraps(model_provider)
    def provider(*args, **kwargs):
        margs = get_args()
        if margs.moe_switch:
            if margs.spec not in (None, SPEC):
                raise SwitchConfigError(
                    f"--moe-switch selects the Switch spec; drop --spec {' '.join(margs.spec)}")
            prepare_args(margs)
            margs.spec = list(SPEC)
        return model_provider(*args, **kwargs)

    return provider


def _t5_provider(model_provider: Callable) -> Callable:
    from megatron.training import get_args

    @functools.wraps(model_provider)
    def provider(*args, **kwargs):
        return (t5_model_provider if get_args().moe_switch else model_provider)(*args, **kwargs)

    return provider


PROVIDERS = {"pretrain_gpt.py": _gpt_provider, "pretrain_t5.py": _t5_provider}
