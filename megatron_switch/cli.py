"""The `megatron-switch` command: train, preprocess, convert, plan, sbatch."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import List, Optional

from megatron_switch.quiet import quiet_import_warnings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_rank_entry(rank: int, args) -> None:
    # Each local rank leads its own process group, so that the launcher can end it together with the
    # helper processes it starts (dist_checkpointing's writer) and nothing is left behind.
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # ignored by the server this process was forked from
        signal.signal(sig, signal.SIG_DFL)
    quiet_import_warnings()  # a spawned process starts without the launcher's filters
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size))
    import torch

    # A user's OMP_NUM_THREADS wins; else each local rank gets its share of the cores.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    from megatron_switch.training.trainer import train

    train(args)


REPORTED_ERROR_EXIT = 3  # training.trainer's: a rank that printed its own one-line error


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


RANK_IMPORTS = "megatron_switch.training.preload"  # megatron-core, then the trainer


def _start_rank_server():
    """Start the forkserver the local ranks are forked from (if it is not running), and return its
    multiprocessing context. The server begins importing what the ranks need (`RANK_IMPORTS`) at once.

    Fresh interpreters (not forks of this one, whose state the ranks need not share), from a server
    that imported the trainer once: each rank starts from that import instead of repeating it. (It has
    run no tensor operation, so the forked ranks start with clean thread pools.)"""
    import multiprocessing
    import multiprocessing.forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([RANK_IMPORTS])
    # The server reports each rank's exit status, so it must outlive a SIGTERM or SIGUSR1 sent to this
    # process group (a user's kill, a scheduler): it starts with both ignored (an ignored signal stays
    # ignored across exec), and each rank restores the defaults first thing.
    ignored = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for sig, handler in ignored.items():
            signal.signal(sig, handler)
    return context


def _stop_rank_server() -> None:
    """End a rank server that no rank will be forked from (a flag refused after it started), so that it
    neither finishes its imports nor holds this command's output open after the error."""
    import multiprocessing.forkserver

    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def launch_local(args) -> int:
    """Start `args.world_size` local ranks and watch them: the first that fails (an error, a crash, a
    kill) ends the whole job at once, its process groups included, and is named; SIGINT, SIGTERM and
    SIGUSR1 are passed on to every rank. Returns the job's exit status."""
    import multiprocessing
    import multiprocessing.connection

    context = _start_rank_server()
    ranks = [context.Process(target=_local_rank_entry, args=(rank, args), name=f"rank {rank}")
             for rank in range(args.world_size)]

    def signal_all(sig: int) -> None:
        for process in ranks:
            if process.pid is None:
                continue
            try:
                os.killpg(process.pid, sig)  # the rank and everything it started
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(process.pid, sig)  # not its own group yet (just started)
                except ProcessLookupError:
                    pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: signal_all(signum))
    for process in ranks:
        process.start()
    waiting = {process.sentinel: rank for rank, process in enumerate(ranks)}
    status = 0
    try:
        while waiting:
            for sentinel in multiprocessing.connection.wait(list(waiting)):
                rank = waiting.pop(sentinel)
                ranks[rank].join()
                code = ranks[rank].exitcode
                if code != 0 and status == 0:
                    status = code if code > 0 else 128 - code
                    if waiting and code != REPORTED_ERROR_EXIT:  # (a reported error has said it all)
                        print(f"megatron-switch train: rank {rank} (pid {ranks[rank].pid}) {_describe_exit(code)}; "
                              f"stopping the other {len(waiting)} rank(s)", file=sys.stderr, flush=True)
                    signal_all(signal.SIGKILL)
    finally:
        signal_all(signal.SIGKILL)  # helpers a finished rank left behind
        for process in ranks:
            process.join()
    return status


def train_main(argv: Optional[List[str]] = None) -> None:
    """Validate every flag here, then run: in place under torchrun/srun, else in local processes."""
    quiet_import_warnings()
    from megatron_switch.training.arguments import launcher_environment, parse_args

    def start_rank_imports() -> None:
        # The flags that need no torch are good: a local launch starts its ranks' imports now, beside
        # the checks that import torch (the expert backend's), instead of after them.
        if launcher_environment() is None:
            _start_rank_server()

    try:
        args = parse_args(argv, light_checks_passed=start_rank_imports)
    except SystemExit:
        _stop_rank_server()
        raise
    if launcher_environment() is not None:
        import megatron_switch.training.preload  # noqa: F401
        from megatron_switch.training.trainer import train

        return train(args)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(args.master_port or _free_port())
    sys.exit(launch_local(args))


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
    quiet_import_warnings()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: megatron-switch {{{','.join(COMMANDS)}}} [flags]  (--help after a command)")
        sys.exit(2)
    import importlib

    module, function = COMMANDS[argv[0]].split(":")
    getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    main()
