"""The per-rank training loop: data, model, optimizer, steps, checkpoints, signals, reports.

The optimizer step (AdamW on float32 masters; gradients reduced by megatron-core's DDP on GPUs or
by the equivalent all-reduce on CPU; one global gradient norm) is `training.optimizer.Optimization`.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from typing import Dict, List

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_switch.ops.collectives import comm_device
from megatron_switch.checkpoint.layout import CheckpointError
from megatron_switch.compat import enable_cpu_support, seed_parallel_rng
from megatron_switch.data.check import DataError
from megatron_switch.data.sampler import TokenOutOfRange, rank_micro_batch_start
from megatron_switch.parallel import destroy_parallel, initialize_parallel
from megatron_switch.training.checkpointing import (
    CARRIED_COMMON,
    load_checkpoint,
    remove_incomplete_saves,
    save_checkpoint,
)
from megatron_switch.training.faults import fault_point
from megatron_switch.training.metrics import Reporter, SwitchStatsAccumulator
from megatron_switch.training.model import build_model
from megatron_switch.training.objectives import OBJECTIVES
from megatron_switch.training.optimizer import Optimization
from megatron_switch.training.resume import schedule_conflict, schedule_of_args
from megatron_switch.training.schedule import forward_backward
from megatron_switch.training.stall import Heartbeat, in_collective


def _seed_all(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def _datasets(args, tokenizer):
    """Every rank's datasets. The default corpus appears on every node (built once per filesystem);
    the index cache must be one directory for all ranks (megatron-core fills it on rank 0)."""
    from megatron_switch.data.corpus import cache_dir, default_corpus_on_every_node
    from megatron_switch.data.datasets import check_cache_shared

    data_path = args.data_path or [default_corpus_on_every_node(tokenizer, args.tokenizer_type)]
    eval_batches = (args.train_iters // args.eval_interval + 1) * args.eval_iters if args.eval_interval else 0
    sizes = (args.train_iters * args.global_batch_size, eval_batches * args.global_batch_size, 0)
    cache = args.data_cache_path or os.path.join(cache_dir(), "index-cache")
    check_cache_shared(cache)
    return OBJECTIVES[args.model].datasets(args, tokenizer, data_path, sizes, cache)


def _micro_batches(dataset, consumed: int, args, vocab_size: int | None = None) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at sample `consumed`
    (Megatron's sampler order: each group of micro x DP samples is split over the DP ranks); a token
    id outside the tokenizer's `vocab_size` (when given) is an error."""
    dp, dp_rank = args.data_parallel_size, parallel_state.get_data_parallel_rank()
    micro = args.micro_batch_size
    batches = []
    for m in range(args.global_batch_size // (micro * dp)):
        start = rank_micro_batch_start(consumed // (micro * dp) + m, micro, dp, dp_rank)
        batch = OBJECTIVES[args.model].micro_batch(dataset, start, micro, vocab_size)
        batches.append({k: v.to(comm_device()) for k, v in batch.items()})
    return batches


def _batches(dataset, consumed: int, args, vocab_size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Each step's micro-batches from sample `consumed` on, through --dataloader-type: `single`
    reads `_micro_batches`; `dali` a DALI pipeline that yields the same samples in the same order."""
    if args.dataloader_type == "dali":
        from megatron_switch.data.dali import DaliLoader

        return DaliLoader(dataset, consumed, args.micro_batch_size, args.global_batch_size,
                          args.data_parallel_size, parallel_state.get_data_parallel_rank(), comm_device())
    return (_micro_batches(dataset, c, args, vocab_size)
            for c in itertools.count(consumed, args.global_batch_size))


def _start_checkpoint_writer(ignore_exit_signals: bool) -> None:
    """dist_checkpointing's write-results queue (a multiprocessing Manager), forked from this rank now,
    before its process groups and thread pools exist (`start_checkpoint_write_results_queue` says why).
    SLURM delivers a job's signals to every process of a task: killed by SIGUSR1/SIGTERM (their
    default action), the Manager would break the save the signal asks for, so with
    --exit-signal-handler it starts with both ignored."""
    from megatron_switch.compat.megatron_core import start_checkpoint_write_results_queue

    signals = (signal.SIGTERM, signal.SIGUSR1) if ignore_exit_signals else ()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        start_checkpoint_write_results_queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _ExitSignal:
    def __init__(self, enabled: bool):
        self.received = False
        if enabled:  # (--exit-signal-handler needs --save: the checkpoint writer has started, ignoring them)
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class TrainingHalted(RuntimeError):
    """The run stopped on purpose (non-finite loss or gradient); the message says where and what next."""

    on_every_rank = True  # decided collectively: rank 0 reports it


# Errors a user can act on: a rank that raises one prints its message as one line, without a
# traceback (rank 0 only when every rank raised the same), and exits with this status, which the
# local launcher recognises (it then stops the other ranks without a word of its own).
REPORTED_ERROR_EXIT = 3
_REPORTED = (CheckpointError, TrainingHalted, TokenOutOfRange, DataError)


def train(args) -> None:
    """Entry point of one rank (under torchrun, srun or the local launcher)."""
    from megatron_switch.data.tokenizers import build_tokenizer

    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank == "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f" waiting for {os.environ.get('WORLD_SIZE')} ranks at {os.environ.get('MASTER_ADDR')}:"
              f"{os.environ.get('MASTER_PORT')} (at most --distributed-timeout-minutes "
              f"{args.distributed_timeout_minutes:g})", flush=True)
    if args.save:
        _start_checkpoint_writer(ignore_exit_signals=args.exit_signal_handler)
    initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        args.expert_model_parallel_size, args.num_experts if args.switch else None,
                        timeout_minutes=args.distributed_timeout_minutes)
    enable_cpu_support()
    heartbeat = Heartbeat(dist.get_rank(), dist.get_world_size(), args.distributed_timeout_minutes,
                          REPORTED_ERROR_EXIT).start()
    try:
        _train(args, build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_extra_ids), heartbeat)
    except _REPORTED as err:
        if dist.get_rank() == 0 or not getattr(err, "on_every_rank", False):
            where = "" if getattr(err, "on_every_rank", False) else f" (rank {dist.get_rank()})"
            print(f"megatron-switch train: error{where}: {err}", file=sys.stderr, flush=True)
        heartbeat.stop()
        destroy_parallel_quietly()
        sys.exit(REPORTED_ERROR_EXIT)
    except Exception as err:
        if not in_collective(err):
            raise
        # A collective that timed out or lost its peer: name the rank that stopped answering (or where
        # each rank waits); one rank reports, every rank ends with the reported-error status.
        message = heartbeat.report_collective_failure(err)
        if message:
            print(f"megatron-switch train: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(REPORTED_ERROR_EXIT)  # (no teardown: it would wait on the peer that is gone)
    finally:
        heartbeat.stop()
        destroy_parallel_quietly()


def destroy_parallel_quietly() -> None:
    """Tear the groups down, unless a peer is gone (then the process exits without it)."""
    try:
        destroy_parallel()
    except Exception:  # noqa: BLE001  (a torn-down or broken group raises several types)
        pass


def _nonfinite(loss, grad_norm: float) -> tuple[bool, bool]:
    """Collective: (loss not finite on some rank, gradient norm not finite), the same on every rank."""
    flags = torch.tensor([0.0 if loss is None or math.isfinite(float(loss)) else 1.0,
                          0.0 if math.isfinite(grad_norm) else 1.0], device=comm_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def _train(args, tokenizer, heartbeat: Heartbeat) -> None:
    _seed_all(args.seed)
    seed_parallel_rng(args.seed)
    train_ds, valid_ds, _ = _datasets(args, tokenizer)
    model = build_model(args, tokenizer.vocab_size).to(comm_device())
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    optimization = Optimization(model, args, megatron_ddp=args.ddp_impl == "megatron")
    optimizer, scheduler = optimization.optimizer, optimization.scheduler

    iteration, consumed, carried = 0, 0, {}
    if args.save and is_print_rank():
        for name in remove_incomplete_saves(args.save):
            print(f" removed {name} from {args.save}: an earlier run was stopped while saving it", flush=True)
    if args.load:
        common = load_checkpoint(args.load, model, optimization.checkpointed, scheduler,
                                 step=args.ckpt_step, schedule_check=lambda saved: schedule_conflict(saved, args),
                                 trust_checkpoint_code=args.trust_checkpoint_code)
        iteration, consumed = int(common["iteration"]), int(common["consumed_train_samples"])
        # An imported model's Hugging Face config: kept in every later checkpoint for `convert --to-hf`
        carried = {key: common[key] for key in CARRIED_COMMON if key in common}
        if is_print_rank():
            print(f" loaded checkpoint {args.load} at iteration {iteration}", flush=True)
    writer = {"schedule": schedule_of_args(args), "train_iters": args.train_iters, "seed": args.seed}

    def save(it: int) -> None:
        path = save_checkpoint(args.save, it, model, optimization.checkpointed, scheduler,
                               {"iteration": it, "consumed_train_samples": consumed, **carried}, writer)
        if is_print_rank():
            print(f" saved checkpoint {path}", flush=True)
    saved_at = iteration if args.load else None

    num_experts = args.switch.num_experts if args.switch else 1
    stats = SwitchStatsAccumulator(model, args.num_layers, num_experts)
    reporter = Reporter(args, stats.row_labels)
    exit_signal = _ExitSignal(args.exit_signal_handler)
    train_batches = _batches(train_ds, consumed, args, tokenizer.vocab_size)
    if args.dataloader_type == "dali" and is_print_rank():
        print(f" data loader: {train_batches.description()}", flush=True)
    start_time = time.time()
    interval_start, interval_losses, skipped = time.perf_counter(), [], 0
    model.train()
    while iteration < args.train_iters:
        heartbeat.iteration = iteration + 1
        batches = next(train_batches)
        optimization.zero_grad()
        loss = forward_backward(optimization.model, batches, args, forward_step=OBJECTIVES[args.model].forward_step)
        fault_point("step", dist.get_rank(), iteration + 1)
        grad_norm = optimization.gradient_norm()
        bad_loss, bad_norm = _nonfinite(loss, grad_norm)
        iteration += 1
        consumed += args.global_batch_size
        if bad_loss or bad_norm:
            what = " and ".join(w for w, bad in (("the loss", bad_loss), ("the gradient norm", bad_norm)) if bad)
            if args.check_for_nan_in_loss_and_grad:
                latest = f"iteration {saved_at}" if saved_at is not None else "none (nothing was saved)"
                raise TrainingHalted(
                    f"iteration {iteration}: {what} is not finite (grad norm {grad_norm}); stopped without "
                    f"saving, the latest checkpoint is {latest}. Lower --lr (now {args.lr:g}) or --clip-grad, "
                    f"check the data, or pass --no-check-for-nan-in-loss-and-grad to skip such steps instead")
            skipped += 1  # Megatron's skipped iteration: no update, no scheduler step
            if is_print_rank():
                print(f" iteration {iteration}: {what} is not finite; step skipped (no update), {skipped} so far",
                      flush=True)
        else:
            optimization.update(grad_norm)
            scheduler.step(increment=1)
            if loss is not None:
                interval_losses.append(float(loss))

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            lm = torch.tensor([sum(interval_losses), len(interval_losses)], dtype=torch.float64,
                              device=comm_device())
            dist.all_reduce(lm, group=parallel_state.get_data_parallel_group())
            table = stats.reduce()
            valid = None
            if args.eval_interval and valid_ds is not None and iteration % args.eval_interval == 0:
                valid = evaluate(model, valid_ds, iteration, args, tokenizer.vocab_size)
            elapsed = time.perf_counter() - interval_start
            steps = len(interval_losses) or args.log_interval
            tokens_per_s = (steps * args.global_batch_size * OBJECTIVES[args.model].tokens_per_sample(args)
                            / max(elapsed, 1e-9))
            reporter.log(iteration, float(lm[0] / lm[1]) if lm[1] else float("nan"), table,
                         optimizer.param_groups[0]["lr"], tokens_per_s, grad_norm, valid)
            stats.reset()
            interval_start, interval_losses = time.perf_counter(), []

        timed_out = (args.exit_duration_in_mins is not None
                     and (time.time() - start_time) / 60 > args.exit_duration_in_mins)
        stop = exit_signal.any_rank() if args.exit_signal_handler else False
        if args.save and (stop or timed_out or (args.save_interval and iteration % args.save_interval == 0)
                          or iteration == args.train_iters):
            save(iteration)
            saved_at = iteration
        if stop or timed_out:
            if is_print_rank():
                print(f" exiting at iteration {iteration} ({'signal' if stop else 'time limit'})", flush=True)
            break
    reporter.finish()


def evaluate(model, dataset, iteration: int, args, vocab_size: int) -> float:
    """Mean LM loss over --eval-iters global batches of the validation split (all ranks)."""
    model.eval()
    eval_index = (iteration // args.eval_interval - 1) * args.eval_iters
    losses = []
    eval_batches = _batches(dataset, eval_index * args.global_batch_size, args, vocab_size)
    with torch.no_grad():
        for k in range(args.eval_iters):
            fault_point("eval", dist.get_rank(), iteration)
            batches = next(eval_batches)
            loss = forward_backward(model, batches, args, forward_only=True,
                                    forward_step=OBJECTIVES[args.model].forward_step)
            if loss is not None:
                losses.append(float(loss))
    model.train()
    total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(total)
    return float(total[0] / total[1])


def is_print_rank() -> bool:
    return dist.get_rank() == 0
