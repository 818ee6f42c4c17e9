"""The `megatron-switch` command: train, preprocess, convert, plan, sbatch."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import List, Optional

from megatron_switch import QUIET_IMPORT_WARNINGS

# Spawned workers import megatron-core before any code of ours runs: tell them through the environment.
os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore:{m}" for m in QUIET_IMPORT_WARNINGS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_rank_entry(rank: int, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size))
    import torch

    # A user's OMP_NUM_THREADS wins; else each local rank gets its share of the cores.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    from megatron_switch.training.trainer import train

    train(args)


def train_main(argv: Optional[List[str]] = None) -> None:
    """Validate every flag here, then run: in place under torchrun/srun, else in local processes."""
    from megatron_switch.training.arguments import parse_args

    args = parse_args(argv)
    under_launcher = "WORLD_SIZE" in os.environ or "SLURM_PROCID" in os.environ
    if under_launcher:
        from megatron_switch.training.trainer import train

        return train(args)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(args.master_port or _free_port())
    if args.world_size == 1:
        return _local_rank_entry(0, args)
    import signal

    import torch.multiprocessing as mp

    if args.exit_signal_handler:
        # The workers save and exit on these signals; the launcher just waits for them.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    mp.start_processes(_local_rank_entry, args=(args,), nprocs=args.world_size, start_method="spawn")


def preprocess_main(argv: Optional[List[str]] = None) -> None:
    from megatron_switch.data.preprocess import DataError, preprocess
    from megatron_switch.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

    parser = argparse.ArgumentParser(prog="megatron-switch preprocess",
                                     description="Text or JSONL files -> Megatron indexed dataset (.bin/.idx).")
    parser.add_argument("--input", nargs="+", required=True, help="Text files (one document each) or JSONL.")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-keys", default="text")
    parser.add_argument("--tokenizer-type", default="ByteLevelTokenizer", choices=TOKENIZER_TYPES)
    parser.add_argument("--tokenizer-model", default=None)
    args = parser.parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        tokens = preprocess(args.input, args.output_prefix, tokenizer, args.json_keys)
    except (DataError, ValueError, OSError) as err:
        parser.error(str(err))
    print(f"wrote {tokens} tokens to {args.output_prefix}.bin/.idx")


# Each command lives beside what it drives; its module is imported only when the command runs.
COMMANDS = {
    "train": "megatron_switch.cli:train_main",
    "preprocess": "megatron_switch.cli:preprocess_main",
    "convert": "megatron_switch.checkpoint.convert:main",
    "plan": "megatron_switch.planning.cli:plan_main",
    "sbatch": "megatron_switch.planning.cli:sbatch_main",
}


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: megatron-switch {{{','.join(COMMANDS)}}} [flags]  (--help after a command)")
        sys.exit(2)
    import importlib

    module, function = COMMANDS[argv[0]].split(":")
    getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    main()
