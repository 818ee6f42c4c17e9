"""`megatron-switch train --model t5`: the encoder-decoder's flags (Megatron-LM's names) and their checks.

Megatron-LM's T5 flags: --encoder-num-layers and --decoder-num-layers (default --num-layers),
--encoder-seq-length (sets --seq-length), --decoder-seq-length (default: the targets T5's span
corruption makes of the encoder length: 114 for 512), --vocab-extra-ids (the byte-level tokenizer's
sentinels; default 100 with --model t5, as T5), --position-embedding-type (relative for T5,
learned_absolute for GPT), --relative-attention-num-buckets, --relative-attention-max-distance,
--kv-channels. --feed-forward-proj relu|gated-gelu is T5's FFN (Hugging Face's name); with
--moe-switch the experts take the same activation and, like every T5 projection, no bias.

`check_model_flags` runs with the early checks (no torch); `check_t5_objective` last (it builds the
tokenizer and the span-corruption lengths).
"""

from __future__ import annotations

import argparse
import dataclasses

MODELS = ("gpt", "t5")
FEED_FORWARD_PROJ = {"relu": "relu", "gated-gelu": "geglu_tanh"}  # T5's FFN -> the experts' activation
POSITION_EMBEDDINGS = {"gpt": "learned_absolute", "t5": "relative"}
T5_SENTINELS = 100  # T5's <extra_id_0> .. <extra_id_99>
# flags only the encoder-decoder reads (dest -> flag)
T5_ONLY = {"encoder_num_layers": "--encoder-num-layers", "decoder_num_layers": "--decoder-num-layers",
           "encoder_seq_length": "--encoder-seq-length", "decoder_seq_length": "--decoder-seq-length",
           "relative_attention_num_buckets": "--relative-attention-num-buckets",
           "relative_attention_max_distance": "--relative-attention-max-distance",
           "kv_channels": "--kv-channels", "feed_forward_proj": "--feed-forward-proj"}


def add_t5_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="gpt",
                        help="gpt: decoder-only (the default); t5: the paper's encoder-decoder, trained with T5's "
                             "span corruption.")
    g = parser.add_argument_group("encoder-decoder (--model t5)")
    g.add_argument("--encoder-num-layers", type=int, default=None, help="Default: --num-layers.")
    g.add_argument("--decoder-num-layers", type=int, default=None, help="Default: --num-layers.")
    g.add_argument("--encoder-seq-length", type=int, default=None,
                   help="Encoder tokens per sample (sets --seq-length, as in Megatron-LM).")
    g.add_argument("--decoder-seq-length", type=int, default=None,
                   help="Decoder tokens per sample; default: the span-corruption targets of the encoder length.")
    g.add_argument("--vocab-extra-ids", type=int, default=None,
                   help=f"Sentinel ids added to the byte-level tokenizer (default {T5_SENTINELS} with --model t5, "
                        "else 0); a Hugging Face tokenizer brings its own <extra_id_N>.")
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope", "relative"), default=None,
                   help="Default and only choice: learned_absolute for GPT, relative for T5.")
    g.add_argument("--relative-attention-num-buckets", type=int, default=None, help="T5: 32.")
    g.add_argument("--relative-attention-max-distance", type=int, default=None, help="T5: 128.")
    g.add_argument("--kv-channels", type=int, default=None, help="Per-head width; default hidden / heads.")
    g.add_argument("--feed-forward-proj", choices=tuple(FEED_FORWARD_PROJ), default=None,
                   help="T5's FFN: relu (the released Switch models, default) or gated-gelu (T5 v1.1).")


def check_model_flags(args, fail) -> None:
    """Early (no torch): fill the model's defaults, refuse what the chosen model does not have."""
    position = args.position_embedding_type or POSITION_EMBEDDINGS[args.model]
    if position != POSITION_EMBEDDINGS[args.model]:
        fail(f"--position-embedding-type {position} with --model {args.model}: this trainer's {args.model.upper()} "
             f"uses {POSITION_EMBEDDINGS[args.model]} positions; drop the flag")
    args.position_embedding_type = position
    if args.model == "gpt":
        given = [flag for dest, flag in T5_ONLY.items() if getattr(args, dest) is not None]
        if given:
            fail(f"{', '.join(given)} describe an encoder-decoder: add --model t5, or drop them")
        args.normalization = args.normalization or "LayerNorm"
        args.vocab_extra_ids = args.vocab_extra_ids or 0
        return
    if args.normalization not in (None, "RMSNorm"):
        fail(f"--normalization {args.normalization} with --model t5: T5 normalizes with an RMS norm without bias "
             "(T5LayerNorm); drop the flag")
    args.normalization = "RMSNorm"
    for dest in ("encoder_num_layers", "decoder_num_layers"):
        setattr(args, dest, getattr(args, dest) or args.num_layers)
    if args.encoder_seq_length is not None:
        args.seq_length = args.encoder_seq_length
    args.encoder_seq_length = args.seq_length
    args.relative_attention_num_buckets = args.relative_attention_num_buckets or 32
    args.relative_attention_max_distance = args.relative_attention_max_distance or 128
    args.feed_forward_proj = args.feed_forward_proj or "relu"
    if args.vocab_extra_ids is None:
        args.vocab_extra_ids = T5_SENTINELS if args.tokenizer_type == "ByteLevelTokenizer" else 0
    for dest in ("encoder_num_layers", "decoder_num_layers", "decoder_seq_length", "kv_channels",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
        value = getattr(args, dest)
        if value is not None and value < 1:
            fail(f"{T5_ONLY[dest]} must be >= 1, got {value}")
    if args.vocab_extra_ids < 0:
        fail(f"--vocab-extra-ids must be >= 0, got {args.vocab_extra_ids}")
    if args.pipeline_model_parallel_size > 1:
        fail("--pipeline-model-parallel-size with --model t5: megatron-core's T5 splits no stack over pipeline "
             "stages; use tensor and expert parallelism (--tensor-model-parallel-size, --expert-model-parallel-size)")
    if args.dataloader_type == "dali":
        fail("--dataloader-type dali reads GPT samples; span corruption (--model t5) reads through "
             "--dataloader-type single")
    if args.recompute_granularity:
        fail(f"--recompute-granularity {args.recompute_granularity} with --model t5: megatron-core's recomputed "
             "forward (layers or attention core) reuses T5's relative position bias from outside the recomputed "
             "region, and its gradient cannot pass twice; drop the flag (or lower --micro-batch-size)")
    if args.hidden_dropout != args.attention_dropout:
        fail(f"--hidden-dropout {args.hidden_dropout} and --attention-dropout {args.attention_dropout}: T5 has one "
             "dropout rate (dropout_rate) for both; give them the same value")
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads:
        fail(f"--num-attention-heads {args.num_attention_heads} does not divide --hidden-size {args.hidden_size}: "
             "pass --kv-channels (T5's d_kv) or change the head count")


def t5_switch_config(args, fail):
    """The Switch settings T5 needs: the experts' activation is the FFN's, and they have no bias."""
    switch = args.switch
    expected = FEED_FORWARD_PROJ[args.feed_forward_proj]
    if args.switch_expert_activation is not None and args.switch_expert_activation != expected:
        fail(f"--switch-expert-activation {args.switch_expert_activation} with --feed-forward-proj "
             f"{args.feed_forward_proj}: T5's experts compute its FFN ({expected}); drop --switch-expert-activation")
    for stack in ("encoder", "decoder"):
        layers = getattr(args, f"{stack}_num_layers")
        if switch.expert_interval > layers:
            fail(f"--moe-layer-freq {switch.expert_interval} puts no Switch layer in the {layers}-layer {stack} "
                 f"(--{stack}-num-layers): use --moe-layer-freq {layers} or less")
    return dataclasses.replace(switch, activation=expected, expert_bias=False)


def check_t5_objective(args, fail) -> None:
    """Last (imports torch): the tokenizer's sentinels, the span-corruption lengths and the data."""
    from megatron_switch.data.check import DataError, check_enough_tokens, parse_data_path
    from megatron_switch.data.span_corruption import SpanCorruption, SpanCorruptionError
    from megatron_switch.data.tokenizers import build_tokenizer

    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_extra_ids)
        objective = SpanCorruption.for_tokenizer(tokenizer, args.encoder_seq_length, args.decoder_seq_length)
    except (ValueError, SpanCorruptionError) as err:
        fail(str(err))
    args.decoder_seq_length = objective.decoder_length
    if args.sequence_parallel and args.decoder_seq_length % args.tensor_model_parallel_size:
        fail(f"--decoder-seq-length {args.decoder_seq_length} is not divisible by --tensor-model-parallel-size "
             f"{args.tensor_model_parallel_size} (--sequence-parallel): pass --decoder-seq-length "
             f"{-(-args.decoder_seq_length // args.tensor_model_parallel_size) * args.tensor_model_parallel_size}")
    if args.data_path:
        try:
            check_enough_tokens(parse_data_path(args.data_path)[0], objective.tokens_length - 1)
        except DataError as err:
            fail(str(err))


def t5_model_config(args) -> dict:
    """What a T5 checkpoint records of the encoder-decoder (`SwitchT5Model.description`), from the flags."""
    interval = args.switch.expert_interval if args.switch is not None else 0
    return {"model": "t5", "num_layers": args.decoder_num_layers, "encoder_num_layers": args.encoder_num_layers,
            "decoder_num_layers": args.decoder_num_layers,
            "kv_channels": args.kv_channels or args.hidden_size // args.num_attention_heads,
            "feed_forward_proj": args.feed_forward_proj,
            "relative_attention_num_buckets": args.relative_attention_num_buckets,
            "relative_attention_max_distance": args.relative_attention_max_distance,
            "encoder_expert_interval": interval, "decoder_expert_interval": interval}
