"""The `megatron-switch` command: train, preprocess, convert, plan, sbatch."""

from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

from megatron_switch.quiet import quiet_import_warnings


def _local_rank_entry(rank: int, args, address: str, port: int) -> None:
    # Each local rank leads its own process group, so that the launcher can end it together with the
    # helper processes it starts (dist_checkpointing's writer) and nothing is left behind.
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # ignored by the server this process was forked from
        signal.signal(sig, signal.SIG_DFL)
    quiet_import_warnings()  # a spawned process starts without the launcher's filters
    # The rendezvous travels as arguments: the rank server was started (with its environment) before the
    # launcher knew the port. The launcher holds the store (as torchrun's agent does): every rank is its client.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size), MASTER_ADDR=address,
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
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
    """End a rank server that no rank will be forked from (a flag refused after it started, or the job is
    over), so that it neither finishes its imports nor holds this command's output open after the end."""
    import multiprocessing.forkserver

    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class RendezvousError(RuntimeError):
    """The local launcher could not open its rendezvous store; the message says which port and what to do."""


def _rendezvous_entry(connection, address: str, port: Optional[int], world_size: int, timeout_minutes: float) -> None:
    """The job's rendezvous store (a TCPStore server, as torchrun's agent holds one) in a process of its
    own, forked from the rank server (which has imported torch: the launcher does not): on `port`, or with
    None on a port the system picks as the store binds it, so that no other process can take it between
    the choice and the bind. Sends ("port", N) or ("error", message), then serves until the launcher
    closes the connection (the job is over, or the launcher is gone)."""
    import datetime

    from torch.distributed import DistNetworkError, TCPStore

    os.setsid()  # (a Ctrl-C at the terminal goes to the ranks, through the launcher; the store ends after them)
    try:
        store = TCPStore(address, port or 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(minutes=timeout_minutes))
    except DistNetworkError as err:
        connection.send(("error", str(err)))
        return
    connection.send(("port", store.port))
    try:
        connection.recv()
    except EOFError:
        pass


def _start_rendezvous(context, address: str, port: Optional[int], world_size: int, timeout_minutes: float):
    """Start `_rendezvous_entry`; returns (its process, its end of the connection, the port)."""
    here, there = context.Pipe()
    keeper = context.Process(target=_rendezvous_entry, args=(there, address, port, world_size, timeout_minutes),
                             name="rendezvous store", daemon=True)
    keeper.start()
    there.close()
    try:
        kind, value = here.recv()
    except EOFError:
        keeper.join()
        kind, value = "error", f"its process {_describe_exit(keeper.exitcode)}"
    if kind == "error":
        keeper.join()
        given = f"--master-port/MASTER_PORT {port}" if port else "a free port"
        raise RendezvousError(f"the rendezvous store could not listen on {given} ({value}): pass another "
                              f"--master-port, or none (a free one is chosen)")
    return keeper, here, value


def launch_local(args, port: Optional[int] = None) -> int:
    """Start `args.world_size` local ranks and watch them: the first that fails (an error, a crash, a
    kill) ends the whole job at once, its process groups included, and is named; SIGINT, SIGTERM and
    SIGUSR1 are passed on to every rank. The ranks meet at this process's rendezvous store (`port`, or a
    free one). Returns the job's exit status."""
    import multiprocessing
    import multiprocessing.connection

    context = _start_rank_server()
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    keeper, keeper_connection, port = _start_rendezvous(context, address, port, args.world_size,
                                                        args.distributed_timeout_minutes)
    ranks = [context.Process(target=_local_rank_entry, args=(rank, args, address, port), name=f"rank {rank}")
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
            for sentinel in multiprocessing.connection.wait([*waiting, *([keeper.sentinel] if status == 0 else [])]):
                if sentinel not in waiting:  # the store, which serves until this launcher closes its connection
                    keeper.join()
                    print(f"megatron-switch train: the rendezvous store (pid {keeper.pid}) "
                          f"{_describe_exit(keeper.exitcode)}; stopping the {len(waiting)} rank(s)",
                          file=sys.stderr, flush=True)
                    status = 1
                    signal_all(signal.SIGKILL)
                    continue
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
        keeper_connection.close()
        keeper.join()
        _stop_rank_server()  # (else it tears its imports down, seconds on a busy machine, holding our output)
    return status


def train_main(argv: Optional[List[str]] = None) -> None:
    """Validate every flag here, then run: in place under torchrun/srun, else in local processes."""
    quiet_import_warnings()
    from megatron_switch.training.arguments import launcher_environment, master_port, parse_args

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
    try:
        status = launch_local(args, master_port(args))
    except RendezvousError as err:
        _stop_rank_server()
        print(f"megatron-switch train: error: {err}", file=sys.stderr)
        sys.exit(2)
    # Every rank has been joined and the rank server ends with this process's pipes: skip the interpreter's
    # teardown of torch (seconds on a busy machine, after the job's result is known).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def preprocess_main(argv: Optional[List[str]] = None) -> None:
    from megatron_switch.arguments import CommandParser
    from megatron_switch.data.preprocess import DataError, preprocess
    from megatron_switch.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

    parser = CommandParser(prog="megatron-switch preprocess",
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
    try:
        getattr(importlib.import_module(module), function)(argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of the output went away (`megatron-switch plan ... | head`): end quietly, as Unix tools
        # do, with SIGPIPE's status; what is left unflushed goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)


if __name__ == "__main__":
    main()
