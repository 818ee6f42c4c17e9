"""The per-rank training loop: data, model, optimizer, steps, checkpoints, signals, reports.

The optimizer step (AdamW on float32 masters; gradients reduced by megatron-core's DDP on GPUs or
by the equivalent all-reduce on CPU; one global gradient norm) is `training.optimizer.Optimization`.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections.abc import Iterator
from typing import Dict, List

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_switch.comm import comm_device
from megatron_switch.compat import apply_cpu_shims, seed_parallel_rng
from megatron_switch.data.sampler import collate, rank_micro_batch_start
from megatron_switch.parallel import destroy_parallel, initialize_parallel
from megatron_switch.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_switch.training.metrics import Reporter, SwitchStatsAccumulator
from megatron_switch.training.model import build_model
from megatron_switch.training.optimizer import Optimization
from megatron_switch.training.schedule import forward_backward


def _seed_all(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def _datasets(args, tokenizer):
    from megatron_switch.data.corpus import cache_dir, default_corpus
    from megatron_switch.data.datasets import build_gpt_datasets

    data_path = args.data_path
    if not data_path:
        if dist.get_rank() == 0:
            default_corpus(tokenizer, args.tokenizer_type)
        dist.barrier()
        data_path = [default_corpus(tokenizer, args.tokenizer_type)]
    eval_batches = (args.train_iters // args.eval_interval + 1) * args.eval_iters if args.eval_interval else 0
    sizes = (args.train_iters * args.global_batch_size, eval_batches * args.global_batch_size, 0)
    cache = args.data_cache_path or os.path.join(cache_dir(), "index-cache")
    return build_gpt_datasets(data_path, args.split, args.seq_length, args.seed, sizes, tokenizer, cache)


def _micro_batches(dataset, consumed: int, args) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at sample `consumed`
    (Megatron's sampler order: each group of micro x DP samples is split over the DP ranks)."""
    dp, dp_rank = args.data_parallel_size, parallel_state.get_data_parallel_rank()
    micro = args.micro_batch_size
    batches = []
    for m in range(args.global_batch_size // (micro * dp)):
        start = rank_micro_batch_start(consumed // (micro * dp) + m, micro, dp, dp_rank)
        batches.append({k: v.to(comm_device()) for k, v in collate(dataset, start, micro).items()})
    return batches


def _batches(dataset, consumed: int, args) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Each step's micro-batches from sample `consumed` on, through --dataloader-type: `single`
    reads `_micro_batches`; `dali` a DALI pipeline that yields the same samples in the same order."""
    if args.dataloader_type == "dali":
        from megatron_switch.data.dali import DaliLoader

        return DaliLoader(dataset, consumed, args.micro_batch_size, args.global_batch_size,
                          args.data_parallel_size, parallel_state.get_data_parallel_rank(), comm_device())
    return (_micro_batches(dataset, c, args) for c in itertools.count(consumed, args.global_batch_size))


def _start_checkpoint_writer_ignoring(signals) -> None:
    """SLURM delivers a job's signals to every process of a task. dist_checkpointing keeps a spawned
    multiprocessing Manager alive between saves; killed by SIGUSR1/SIGTERM (their default action), it
    breaks the save the signal asks for. Start it now with the signals ignored (SIG_IGN survives exec)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # (megatron-core 0.16 names it _get_write_results_queue, 0.19 get_write_results_queue)
    start = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _ExitSignal:
    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            _start_checkpoint_writer_ignoring((signal.SIGTERM, signal.SIGUSR1))
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(args) -> None:
    """Entry point of one rank (under torchrun, srun or the local launcher)."""
    from megatron_switch.data.tokenizers import build_tokenizer

    initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        args.expert_model_parallel_size, args.num_experts if args.switch else None)
    apply_cpu_shims()
    try:
        _train(args, build_tokenizer(args.tokenizer_type, args.tokenizer_model))
    finally:
        destroy_parallel()


def _train(args, tokenizer) -> None:
    _seed_all(args.seed)
    seed_parallel_rng(args.seed)
    train_ds, valid_ds, _ = _datasets(args, tokenizer)
    model = build_model(args, tokenizer.vocab_size).to(comm_device())
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    optimization = Optimization(model, args, megatron_ddp=args.ddp_impl == "megatron")
    optimizer = optimization.optimizer
    model_params_in_optimizer_order = optimization.params_in_optimizer_order
    scheduler = optimization.scheduler

    iteration, consumed = 0, 0
    if args.load:
        common = load_checkpoint(args.load, model, optimizer, model_params_in_optimizer_order, scheduler,
                                 trust_checkpoint_code=args.trust_checkpoint_code)
        iteration, consumed = int(common["iteration"]), int(common["consumed_train_samples"])
        if is_print_rank():
            print(f" loaded checkpoint {args.load} at iteration {iteration}", flush=True)

    def save(it: int) -> None:
        path = save_checkpoint(args.save, it, model, optimizer, model_params_in_optimizer_order, scheduler,
                               {"iteration": it, "consumed_train_samples": consumed})
        if is_print_rank():
            print(f" saved checkpoint {path}", flush=True)

    num_experts = args.switch.num_experts if args.switch else 1
    stats = SwitchStatsAccumulator(model, args.num_layers, num_experts)
    reporter = Reporter(args)
    exit_signal = _ExitSignal(args.exit_signal_handler)
    train_batches = _batches(train_ds, consumed, args)
    if args.dataloader_type == "dali" and is_print_rank():
        print(f" data loader: {train_batches.description()}", flush=True)
    start_time = time.time()
    interval_start, interval_losses = time.perf_counter(), []
    model.train()
    while iteration < args.train_iters:
        batches = next(train_batches)
        optimization.zero_grad()
        loss = forward_backward(optimization.model, batches, args)
        grad_norm = optimization.step()
        scheduler.step(increment=1)
        iteration += 1
        consumed += args.global_batch_size
        if loss is not None:
            interval_losses.append(float(loss))

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            lm = torch.tensor([sum(interval_losses), len(interval_losses)], dtype=torch.float64,
                              device=comm_device())
            dist.all_reduce(lm, group=parallel_state.get_data_parallel_group())
            table = stats.reduce()
            valid = None
            if args.eval_interval and valid_ds is not None and iteration % args.eval_interval == 0:
                valid = evaluate(model, valid_ds, iteration, args)
            elapsed = time.perf_counter() - interval_start
            steps = len(interval_losses) or args.log_interval
            tokens_per_s = steps * args.global_batch_size * args.seq_length / max(elapsed, 1e-9)
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
        if stop or timed_out:
            if is_print_rank():
                print(f" exiting at iteration {iteration} ({'signal' if stop else 'time limit'})", flush=True)
            break
    reporter.finish()


def evaluate(model, dataset, iteration: int, args) -> float:
    """Mean LM loss over --eval-iters global batches of the validation split (all ranks)."""
    model.eval()
    eval_index = (iteration // args.eval_interval - 1) * args.eval_iters
    losses = []
    eval_batches = _batches(dataset, eval_index * args.global_batch_size, args)
    with torch.no_grad():
        for k in range(args.eval_iters):
            batches = next(eval_batches)
            loss = forward_backward(model, batches, args, forward_only=True)
            if loss is not None:
                losses.append(float(loss))
    model.train()
    total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(total)
    return float(total[0] / total[1])


def is_print_rank() -> bool:
    return dist.get_rank() == 0
