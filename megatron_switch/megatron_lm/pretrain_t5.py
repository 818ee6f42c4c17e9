"""`python -m megatron_switch.megatron_lm.pretrain_t5 [--megatron-path DIR] <Megatron-LM flags>
--moe-switch --num-experts N`: Megatron-LM's pretrain_t5.py with Switch layers every k-th layer
of the encoder and the decoder (see launch.py).

`t5_model_provider` builds megatron-core's T5Model from Megatron-LM's args as pretrain_t5.py's
own provider does (mcore models; Megatron-LM's T5 has no pipeline parallelism), with the stacks
from `get_switch_t5_layer_specs`.
"""

from __future__ import annotations

import copy

from megatron_switch.megatron_lm.launch import main


def t5_model_provider(pre_process: bool = True, post_process: bool = True, add_encoder: bool = True,
                      add_decoder: bool = True, config=None, pg_collection=None):
    """Megatron-LM's T5 model-provider signature; returns a Switch T5Model."""
    from megatron.core.models.T5 import T5Model
    from megatron.training import get_args, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_switch.config import SwitchConfigError
    from megatron_switch.layer import SwitchMLP
    from megatron_switch.megatron_lm.arguments import (
        prepare_args,
        use_transformer_engine,
    )
    from megatron_switch.megatron_lm.stats import report_switch_stats
    from megatron_switch.t5 import get_switch_t5_layer_specs

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


if __name__ == "__main__":
    main("pretrain_t5.py")
