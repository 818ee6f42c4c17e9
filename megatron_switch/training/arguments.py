"""`megatron-switch train` flags, with Megatron-LM's names, validated before any process starts.

Every check here runs in the launching process: a bad flag, layout, data path or checkpoint
directory fails with a message that says what to change, and no worker is spawned.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import List, Optional

from megatron_switch.arguments import add_switch_args
from megatron_switch.config import SwitchConfig, SwitchConfigError
from megatron_switch.parallel import LayoutError, validate_layout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-switch train",
        description="Megatron-style GPT pretraining with Switch layers (--moe-switch --num-experts N).")
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="Default: 4 x hidden size.")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="Default: --seq-length.")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--init-method", choices=("normal", "switch"), default="normal",
                   help="normal: Megatron's N(0, std); switch: the paper's truncated normal with "
                        "--switch-init-scale, for every weight of the model.")
    g = p.add_argument_group("batch and optimisation")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="Default: micro x data-parallel.")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root"),
                   default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Default: --train-iters.")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true", help=argparse.SUPPRESS)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="Activation recomputation, as megatron-core does it: full layers, or selective "
                        "(the attention core).")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--ddp-impl", choices=("megatron", "local"), default="megatron",
                   help="Gradient reduction: megatron-core's DistributedDataParallel (the default, on GPU "
                        "and CPU) or a plain bucketed all-reduce of float32-accumulated gradients (the same "
                        "arithmetic, as a cross-check).")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="With --ddp-impl megatron: start each bucket's reduction during backward.")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard the float32 master weights and Adam's state over data-parallel ranks "
                        "(ZeRO-1; after megatron's DDP: reduce-scattered gradients, all-gathered parameters).")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="Start this many local processes (ignored under torchrun or srun).")
    g.add_argument("--master-port", type=int, default=None)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Indexed dataset prefixes (optionally weighted); default: the embedded corpus.")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-type", default="ByteLevelTokenizer",
                   choices=("ByteLevelTokenizer", "HuggingFaceTokenizer"))
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--dataloader-type", choices=("single", "dali"), default="single",
                   help="single: the samples read in the main process; dali: an NVIDIA DALI pipeline "
                        "(same samples and order; on GPU it prefetches to the device). Needs nvidia-dali-cuda120.")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--ckpt-format", choices=("torch_dist", "torch"), default="torch_dist",
                   help="Saves are torch_dist; --load reads torch_dist and legacy mp_rank_* files.")
    g.add_argument("--trust-checkpoint-code", action="store_true",
                   help="--load: unpickle the checkpoint's Python objects without the allow-list (the globals "
                        "megatron-switch and Megatron-LM checkpoints hold): a crafted checkpoint then runs "
                        "code. Only for a checkpoint whose source you trust.")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="On SIGTERM or SIGUSR1, save a checkpoint and exit cleanly.")
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--plots-dir", default=None, help="Default: <save>/plots, or ./plots without --save.")
    g.add_argument("--no-progress-bar", action="store_true")
    add_switch_args(p)
    return p


def launch_world_size(args) -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    return args.nproc_per_node or 1


def validate(args, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill defaults, check every combination; parser.error (exit 2) with the fix otherwise."""
    fail = parser.error
    world = launch_world_size(args)
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.fp16:
        fail("--fp16 is not supported: use --bf16 (the paper's selective precision keeps routers in float32)")
    if args.num_experts is not None and not args.moe_switch:
        fail("--num-experts without --moe-switch: this trainer's mixture of experts is the Switch "
             "layer; add --moe-switch")
    if args.overlap_grad_reduce and args.ddp_impl != "megatron":
        fail("--overlap-grad-reduce needs --ddp-impl megatron (the local reduction runs after backward): "
             "drop one of them")
    if args.fp8_format and not args.moe_switch:
        fail("--fp8-format: this trainer runs the Switch experts' GEMMs in FP8 (the dense layers stay "
             "bf16); add --moe-switch --num-experts N, or drop --fp8-format")
    try:
        args.switch = SwitchConfig.from_args(args) if args.moe_switch else None
        validate_layout(world, tp, pp, ep, args.num_experts if args.moe_switch else None)
        if args.switch is not None:
            from megatron_switch.experts import check_fp8_shapes, resolve_expert_backend

            resolve_expert_backend(args.switch)  # a backend or FP8 this machine cannot run fails here
            check_fp8_shapes(args.hidden_size, args.switch.expert_ffn_hidden_size or args.ffn_hidden_size,
                             args.switch)
    except (SwitchConfigError, LayoutError) as err:
        fail(str(err))
    dp = world // (tp * pp)
    args.world_size, args.data_parallel_size = world, dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
             f"{args.micro_batch_size} x data-parallel size {dp}: use a multiple of "
             f"{args.micro_batch_size * dp}")
    if args.num_layers % pp:
        fail(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if args.num_attention_heads % tp or args.hidden_size % args.num_attention_heads:
        fail(f"--num-attention-heads {args.num_attention_heads} must divide --hidden-size "
             f"{args.hidden_size} and be divisible by --tensor-model-parallel-size {tp}")
    if args.ffn_hidden_size % tp:
        fail(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    if args.seq_length > args.max_position_embeddings:
        fail(f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}")
    if args.recompute_granularity == "full" and (args.recompute_method is None or args.recompute_num_layers is None):
        fail("--recompute-granularity full needs --recompute-method uniform|block and --recompute-num-layers N "
             "(as in Megatron-LM; e.g. --recompute-method uniform --recompute-num-layers 1)")
    if args.recompute_granularity != "full" and (args.recompute_method or args.recompute_num_layers):
        fail("--recompute-method and --recompute-num-layers go with --recompute-granularity full")
    if args.recompute_num_layers is not None and not 1 <= args.recompute_num_layers <= args.num_layers // pp:
        fail(f"--recompute-num-layers must be between 1 and the layers per pipeline stage ({args.num_layers // pp})")
    if args.sequence_parallel:
        if tp == 1:
            fail("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if args.seq_length % tp:
            fail(f"--seq-length {args.seq_length} is not divisible by --tensor-model-parallel-size {tp}")
    if args.ckpt_format != "torch_dist":
        fail("--ckpt-format torch (Megatron's legacy per-rank files) is not written by the trainer: "
             "train with torch_dist and convert with `megatron-switch convert --format torch`; --load "
             "reads legacy files without this flag")
    if args.save_interval is not None and not args.save:
        fail("--save-interval needs --save DIR")
    if args.exit_signal_handler and not args.save:
        fail("--exit-signal-handler needs --save DIR (it saves a checkpoint before exiting)")
    for name in ("train_iters", "micro_batch_size", "log_interval", "seq_length"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.load is not None:
        from megatron_switch.training.checkpointing import CheckpointError, latest_checkpoint

        try:
            latest_checkpoint(args.load)
        except CheckpointError as err:
            fail(str(err))
    if args.data_path:
        from megatron_switch.data.datasets import check_prefixes, parse_data_path
        from megatron_switch.data.preprocess import DataError

        try:
            check_prefixes(parse_data_path(args.data_path)[0])
        except DataError as err:
            fail(str(err))
    if args.dataloader_type == "dali":
        from megatron_switch.data.dali import DaliUnavailableError, require_dali

        try:
            require_dali()
        except DaliUnavailableError as err:
            fail(str(err))
    if args.tokenizer_type == "HuggingFaceTokenizer" and not args.tokenizer_model:
        fail("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH (a local directory)")
    if args.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        fail("--tensorboard-dir needs the tensorboard package: pip install tensorboard")
    return args


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    return validate(parser.parse_args(argv), parser)
