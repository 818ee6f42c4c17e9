"""`megatron-switch train` flags, with Megatron-LM's names, validated before any process starts.

Every check here runs in the launching process: a bad flag, layout, data path or checkpoint
directory fails with a message that says what to change, and no worker is spawned. `validate`
returns a `TrainingConfig`: every flag, with the values it derives (defaults that follow other
flags, the SwitchConfig, world and data-parallel sizes), frozen, built once and read by every rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import shutil
import socket
import tempfile
from typing import Any, Callable, List, Optional

from megatron_switch.arguments import CommandParser, add_switch_args
from megatron_switch.config import SwitchConfig, SwitchConfigError
from megatron_switch.parallel import LayoutError, validate_layout
from megatron_switch.training.t5_arguments import (
    add_t5_args, check_model_flags, check_t5_objective, t5_model_config, t5_switch_config)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="megatron-switch train",
        description="Megatron-style pretraining with Switch layers (--moe-switch --num-experts N): GPT, or the "
                    "paper's T5 encoder-decoder on span corruption (--model t5).")
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="Default: 4 x hidden size.")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="Default: --seq-length.")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default=None,
                   help="Default: LayerNorm for GPT; T5 has its own RMS norm.")
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
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false",
                   help="Skip a step whose loss or gradient norm is not finite (no update) instead of stopping "
                        "the run (the default, as in Megatron-LM).")
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
    g.add_argument("--master-port", type=int, default=None,
                   help="Local launch: the rendezvous port (default: MASTER_PORT, else a free port; the address "
                        "is printed as the ranks start).")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="How long a collective (and the start-up rendezvous) waits for a missing rank.")
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
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="Load this iteration of --load instead of the latest one.")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="On resume, follow this run's --lr/--min-lr/--lr-*-iters/--lr-decay-style/--weight-decay "
                        "instead of the checkpoint's.")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="On resume, keep the checkpoint's learning-rate schedule whatever the flags say. Without "
                        "either flag, a schedule that differs from the checkpoint's is an error.")
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
    g.add_argument("--plots-dir", default=None, help="Default: <save>/plots, or ./plots without --save (checked "
                                                         "writable before any process starts).")
    g.add_argument("--no-progress-bar", action="store_true")
    add_switch_args(p)
    add_t5_args(p)
    return p


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")  # a local launch meets there when they are set


# What validate derives beyond the flags (each set once, there).
DERIVED_FIELDS = ("switch", "world_size", "data_parallel_size")


def _training_config_type() -> type:
    fields = [(dest, Any) for dest in sorted({a.dest for a in build_parser()._actions if a.dest != "help"})]
    config = dataclasses.make_dataclass("TrainingConfig", [*fields, *((name, Any) for name in DERIVED_FIELDS)],
                                        frozen=True)
    config.__module__ = __name__
    config.__doc__ = ("Every `megatron-switch train` flag (Megatron-LM's names, as attributes) and what "
                      "`validate` derives from them (DERIVED_FIELDS), frozen: `dataclasses.replace` makes a "
                      "changed copy.")
    return config


TrainingConfig = _training_config_type()


def launcher_environment() -> str | None:
    """"torchrun" or "srun" when one of them started this process, None for a plain shell.

    torchrun sets all of RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (and
    TORCHELASTIC_RUN_ID); srun sets SLURM_PROCID inside a job step (SLURM_STEP_ID). Raises
    LaunchEnvironmentError for a partial set, such as a WORLD_SIZE left in the shell by another job,
    which would otherwise wait for ranks that never come. MASTER_ADDR and MASTER_PORT alone are no
    launcher's: a local launch meets at them (`master_port`)."""
    present = [v for v in LAUNCHER_VARIABLES if v in os.environ]
    if len(present) == len(LAUNCHER_VARIABLES) or "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and not present:
        return "srun"
    present = [v for v in present if v not in RENDEZVOUS_VARIABLES]  # alone, the local launcher's address
    if present:
        shown = " ".join(f"{v}={os.environ[v]}" for v in present)
        raise LaunchEnvironmentError(
            f"{shown} is set, but not all of {', '.join(LAUNCHER_VARIABLES)}: no launcher started this process "
            f"(these look left over from another job). Unset {' '.join(present)} to start local processes "
            f"with --nproc-per-node, or launch under torchrun or srun, which set all of them")
    return None


class LaunchEnvironmentError(ValueError):
    """The environment holds part of a launcher's variables; the message says which and what to do."""


def launch_world_size(args) -> int:
    launcher = launcher_environment()
    if launcher == "torchrun":
        return int(os.environ["WORLD_SIZE"])
    if launcher == "srun":
        return int(os.environ.get("SLURM_NTASKS", "1"))
    return args.nproc_per_node or 1


def _check_numbers(args, fail) -> None:
    """Ranges of the numeric flags (no 0 read as 'default', no negative rates)."""
    positive = ["num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                "train_iters", "log_interval", "eval_iters", "make_vocab_size_divisible_by",
                "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"]
    optional_positive = ["ffn_hidden_size", "max_position_embeddings", "global_batch_size", "lr_decay_iters",
                         "nproc_per_node", "save_interval", "eval_interval", "recompute_num_layers"]
    for name in positive + [n for n in optional_positive if getattr(args, n) is not None]:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr_warmup_iters", "ckpt_step"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")

    def finite(name: str, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = True):
        value = getattr(args, name)
        if value is None:
            return
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and \
            (value < high if high_open else value <= high)
        if not ok:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            fail(f"--{name.replace('_', '-')} must be in {bounds}, got {value}")

    finite("lr", 0.0)
    finite("min_lr", 0.0, args.lr, high_open=False)
    finite("weight_decay", 0.0)
    finite("clip_grad", 0.0)
    finite("hidden_dropout", 0.0, 1.0)
    finite("attention_dropout", 0.0, 1.0)
    finite("adam_beta1", 0.0, 1.0)
    finite("adam_beta2", 0.0, 1.0)
    finite("adam_eps", 0.0, low_open=True)
    finite("init_method_std", 0.0, low_open=True)
    finite("exit_duration_in_mins", 0.0, low_open=True)
    finite("distributed_timeout_minutes", 0.0, low_open=True)
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        fail(f"--master-port must be a port number (1-65535), got {args.master_port}")


def _check_save(args, fail) -> None:
    """--save: a directory we can write, with room for a checkpoint, holding no other run's checkpoints."""
    from megatron_switch.checkpoint.layout import holds_checkpoints, saved_iterations

    save = args.save
    if os.path.exists(save) and not os.path.isdir(save):
        fail(f"--save {save} exists and is not a directory: pass a directory path")
    problem = unwritable_directory(save)
    if problem:
        fail(f"--save {save} is not writable ({problem}): pass a directory this user can write")
    if holds_checkpoints(save) and not (args.load and os.path.samefile(args.load, save)):
        saved = saved_iterations(save)
        what = f"iterations {saved[0]}..{saved[-1]}" if saved else "a checkpoint tracker"
        fail(f"--save {save} already holds checkpoints ({what}) and would be overwritten: to continue that run "
             f"pass --load {save} too; otherwise choose an empty --save directory")
    needed = checkpoint_bytes(args)
    free = shutil.disk_usage(save).free
    if free < needed:
        fail(f"--save {save} has {_size(free)} free, one checkpoint of this model needs about {_size(needed)} "
             f"(weights, Adam's moments{', float32 masters' if args.bf16 else ''}): free space or pass another --save")


def unwritable_directory(path: str) -> str | None:
    """Why `path` (created if missing) cannot take a file, or None: a file is written, synced and removed."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-") as probe:
            probe.write(b"megatron-switch")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        return err.strerror or str(err)
    return None


def _check_output_directories(args, fail) -> None:
    """--plots-dir (default <save>/plots, or ./plots without --save) and --tensorboard-dir: writable, or
    refused here instead of by rank 0 after the ranks started."""
    args.plots_dir = args.plots_dir or os.path.join(args.save or ".", "plots")
    for flag, path in (("--plots-dir", args.plots_dir), ("--tensorboard-dir", args.tensorboard_dir)):
        problem = unwritable_directory(path) if path else None
        if problem:
            default = " (the default: ./plots without --save, <save>/plots with it)" if flag == "--plots-dir" else ""
            fail(f"{flag} {path}{default} is not writable ({problem}): pass {flag} with a directory this user "
                 f"can write, or start from one")


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def checkpoint_bytes(args) -> int:
    """About the size of one checkpoint of this run: every parameter once (all layers, all experts), with
    Adam's two float32 moments, and float32 masters under --bf16; plus 10% for metadata."""
    from megatron_switch.data import BYTE_LEVEL_VOCAB_SIZE
    from megatron_switch.parallel import padded_vocab_size

    h, f, layers = args.hidden_size, args.ffn_hidden_size, args.num_layers
    vocab = padded_vocab_size(BYTE_LEVEL_VOCAB_SIZE + args.vocab_extra_ids, args.make_vocab_size_divisible_by, 1)
    output_copies = 2 if args.untie_embeddings_and_output_weights else 1
    embeddings = vocab * h * output_copies + args.max_position_embeddings * h
    dense_ffn, attention = 2 * h * f, 4 * h * h
    stacks = (args.encoder_num_layers, args.decoder_num_layers) if args.model == "t5" else (layers,)
    if args.model == "t5":  # two stacks; the decoder's layers also attend to the encoder
        layers = sum(stacks)
        attention = (4 * h * h * layers + 4 * h * h * args.decoder_num_layers) / layers
    switch_layers = 0
    if args.switch is not None:
        switch_layers = sum(n // args.switch.expert_interval for n in stacks)
        expert_f = args.switch.expert_ffn_hidden_size or f
        experts = args.switch.num_experts
        expert_ffn = (3 if args.switch.gated else 2) * h * expert_f * experts + h * experts
    params = embeddings + layers * attention + (layers - switch_layers) * dense_ffn
    if switch_layers:
        params += switch_layers * expert_ffn
    per_param = (2 if args.bf16 else 4) + 8 + (4 if args.bf16 else 0)
    return int(params * per_param * 1.1)


def _check_load(args, fail) -> None:
    """--load: what it points at, and (when the checkpoint records them) its model and schedule."""
    from megatron_switch.checkpoint.integrity import model_differences, writer_of
    from megatron_switch.checkpoint.layout import CheckpointError, latest_checkpoint
    from megatron_switch.data import BYTE_LEVEL_VOCAB_SIZE
    from megatron_switch.parallel import padded_vocab_size
    from megatron_switch.training.resume import schedule_conflict

    try:
        _, path = latest_checkpoint(args.load, args.ckpt_step)
        writer = writer_of(path)
    except CheckpointError as err:
        fail(str(err))
    if writer is None:
        return
    current = {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
               "num_attention_heads": args.num_attention_heads, "ffn_hidden_size": args.ffn_hidden_size}
    vocab = BYTE_LEVEL_VOCAB_SIZE + args.vocab_extra_ids if args.tokenizer_type == "ByteLevelTokenizer" else None
    if vocab is not None:
        current["padded_vocab_size"] = padded_vocab_size(vocab, args.make_vocab_size_divisible_by,
                                                         args.tensor_model_parallel_size)
    if args.switch is not None:
        current.update(num_experts=args.switch.num_experts, expert_interval=args.switch.expert_interval)
    if args.model == "t5":
        current.update(t5_model_config(args))
    differences = model_differences(writer.get("model_config", {}), current, args.tensor_model_parallel_size, vocab)
    if differences:
        fail(f"--load {path} holds another model than these flags build: {'; '.join(differences)}")
    if "schedule" in writer:
        conflict = schedule_conflict(writer["schedule"], args)
        if conflict:
            fail(f"resuming from {path}: {conflict}")


def master_port(args) -> int | None:
    """The port a local launch meets at: --master-port, else MASTER_PORT, else None (the launcher's
    rendezvous store binds a port the system picks)."""
    if args.master_port is not None:
        return args.master_port
    return int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None


def _check_port_free(port: int, given_as: str, fail) -> None:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            fail(f"{given_as} {port} is in use on this machine: pass another port, or drop it (a free one is "
                 f"chosen)")


def validate(args, parser: argparse.ArgumentParser,
             light_checks_passed: Optional[Callable[[], None]] = None) -> TrainingConfig:
    """Fill defaults, check every combination; parser.error (exit 2) with the fix otherwise. Returns
    the parsed namespace `args` as a frozen TrainingConfig.

    Flag, layout, data and path checks come first and need neither torch nor megatron-core (an
    answer in well under 2 s); the checks that do (expert backend, FP8, DALI, a Hugging Face
    tokenizer) come last, after `light_checks_passed()` is called (the local launcher starts its
    ranks' imports there)."""
    fail = parser.error
    try:
        world = launch_world_size(args)
    except LaunchEnvironmentError as err:
        fail(str(err))
    _check_numbers(args, fail)
    check_model_flags(args, fail)
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
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        fail("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler contradict each other: "
             "pass one")
    try:
        args.switch = SwitchConfig.from_args(args) if args.moe_switch else None
        validate_layout(world, tp, pp, ep, args.num_experts if args.moe_switch else None)
    except (SwitchConfigError, LayoutError) as err:
        fail(str(err))
    if args.switch is not None and args.model == "t5":
        args.switch = t5_switch_config(args, fail)
    elif args.switch is not None and args.switch.expert_interval > args.num_layers:
        fail(f"--moe-layer-freq {args.switch.expert_interval} puts Switch layers at {args.switch.expert_interval}, "
             f"{2 * args.switch.expert_interval}, ..., but --num-layers is {args.num_layers}: no layer would be a "
             f"Switch layer; use --moe-layer-freq {args.num_layers} or less (or drop --moe-switch for a dense model)")
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
    if args.num_attention_heads % tp or (args.hidden_size % args.num_attention_heads and args.model == "gpt"):
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
    if args.ckpt_step is not None and not args.load:
        fail("--ckpt-step needs --load DIR")
    if (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler) and not args.load:
        fail("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler apply when resuming: "
             "add --load DIR, or drop them")

    from megatron_switch.data.check import DataError, check_enough_tokens, parse_data_path, parse_split

    try:
        split = parse_split(args.split)
        if args.data_path and args.model == "gpt":  # T5's windows are checked with its objective (below)
            check_enough_tokens(parse_data_path(args.data_path)[0], args.seq_length)
    except DataError as err:
        fail(str(err))
    if args.eval_interval and split[1] == 0:
        fail(f"--eval-interval {args.eval_interval} asks for evaluation, but --split {args.split} gives the "
             f"validation set no data: give it a share (e.g. --split 969,30,1), or drop --eval-interval")
    if args.tokenizer_type == "HuggingFaceTokenizer":
        if not args.tokenizer_model:
            fail("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH (a local directory)")
        if not os.path.exists(args.tokenizer_model):
            fail(f"--tokenizer-model {args.tokenizer_model}: no such file or directory (a local Hugging Face "
                 f"tokenizer folder, as tokenizer.save_pretrained(DIR) writes it)")
    if args.lr_warmup_iters and args.lr_warmup_iters >= args.lr_decay_iters:
        fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be fewer than the decay iterations "
             f"({args.lr_decay_iters}: --lr-decay-iters, default --train-iters): lower --lr-warmup-iters "
             "or train longer")
    if args.load is not None:
        _check_load(args, fail)
    if args.save:
        _check_save(args, fail)
    _check_output_directories(args, fail)
    if launcher_environment() is None:
        environment_port = os.environ.get("MASTER_PORT")
        if args.master_port is None and environment_port is not None and \
                not (environment_port.isdigit() and 1 <= int(environment_port) <= 65535):
            fail(f"MASTER_PORT={environment_port} is not a port number (1-65535): set another, or unset it "
                 f"(a free one is chosen)")
        if master_port(args) is not None:
            _check_port_free(master_port(args), "--master-port" if args.master_port is not None else "MASTER_PORT",
                             fail)
    if args.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        fail("--tensorboard-dir needs the tensorboard package: pip install tensorboard")

    # Last: checks that import torch, megatron-core or other large packages.
    if light_checks_passed is not None:
        light_checks_passed()
    if args.switch is not None:
        from megatron_switch.experts import check_fp8_shapes, resolve_expert_backend

        try:
            resolve_expert_backend(args.switch)  # a backend or FP8 this machine cannot run fails here
            check_fp8_shapes(args.hidden_size, args.switch.expert_ffn_hidden_size or args.ffn_hidden_size,
                             args.switch)
        except SwitchConfigError as err:
            fail(str(err))
    if args.model == "t5":
        check_t5_objective(args, fail)
    if args.dataloader_type == "dali":
        from megatron_switch.data.dali import DaliUnavailableError, require_dali

        try:
            require_dali()
        except DaliUnavailableError as err:
            fail(str(err))
    if args.tokenizer_type == "HuggingFaceTokenizer":
        from megatron_switch.data.tokenizers import build_tokenizer

        try:
            build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_extra_ids)
        except ValueError as err:
            fail(str(err))
    return TrainingConfig(**vars(args))


def parse_args(argv: Optional[List[str]] = None,
               light_checks_passed: Optional[Callable[[], None]] = None) -> TrainingConfig:
    parser = build_parser()
    return validate(parser.parse_args(argv), parser, light_checks_passed)
