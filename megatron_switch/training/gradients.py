"""Gradient reduction across data-parallel replicas by hand: `--ddp-impl local`, a cross-check of
megatron-core's DistributedDataParallel (the default, on GPUs and CPUs), and for plain-PyTorch use.

The same arithmetic as megatron-core's DDP with `finalize_model_grads`:
- dense parameters: summed over the data-parallel group;
- expert parameters (`param.allreduce == False`): summed over the expert-data-parallel group;
- both scaled by 1 / data-parallel size (as Megatron's DDP does), so a step on DP replicas equals
  one process averaging their micro-batches;
- with sequence parallelism, parameters marked `sequence_parallel` (norms) are first summed over
  the tensor-parallel group, as Megatron's `finalize_model_grads` does;
- with tied embeddings and pipeline stages, the first stage's word embeddings and the last stage's
  copy (`shared_embedding`) are summed over the embedding group, so both copies get the same update.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _all_reduce_flat(grads, group) -> None:
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    copy_from_flat(flat, grads)


def copy_from_flat(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive pieces of the 1-D `flat` into `tensors` (the inverse of concatenating them)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def allreduce_gradients(params: Iterable[torch.nn.Parameter], sequence_parallel: bool = False) -> None:
    """Reduce `.grad` of every parameter in place, one bucket per group and dtype.

    A parameter without a gradient on this rank (an expert bank that received no token) gets a
    zero gradient first, so every rank contributes buckets of the same layout.
    """
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    reduce_gradients(params, [p.grad for p in params], sequence_parallel)


def reduce_gradients(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor],
                     sequence_parallel: bool = False) -> None:
    """Reduce `grads[i]`, the gradient of `params[i]` (any dtype, e.g. a float32 copy of a bf16
    parameter's), in place; the parameter's attributes (`allreduce`, `sequence_parallel`) say over
    which group. Every rank of a group must pass the same parameters in the same order."""
    if sequence_parallel:
        _all_reduce_flat([g for p, g in zip(params, grads) if getattr(p, "sequence_parallel", False)],
                         parallel_state.get_tensor_model_parallel_group())
    if parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        _all_reduce_flat([g for p, g in zip(params, grads) if getattr(p, "shared_embedding", False)],
                         parallel_state.get_embedding_group())
    dp = parallel_state.get_data_parallel_world_size()
    for dtype in dict.fromkeys(g.dtype for g in grads):  # first-seen order: the same on every rank
        dense = [g for p, g in zip(params, grads) if g.dtype == dtype and getattr(p, "allreduce", True)]
        expert = [g for p, g in zip(params, grads) if g.dtype == dtype and not getattr(p, "allreduce", True)]
        _all_reduce_flat(dense, parallel_state.get_data_parallel_group())
        _all_reduce_flat(expert, parallel_state.get_expert_data_parallel_group())
    if dp > 1:
        for g in grads:
            g.div_(dp)
