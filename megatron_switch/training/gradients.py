"""Gradient reduction across data-parallel replicas, for CPU (gloo) and plain-PyTorch runs.

Megatron's DDP needs CUDA; this is the equivalent reduction for the CPU path:
- dense parameters: summed over the data-parallel group;
- expert parameters (`param.allreduce == False`): summed over the expert-data-parallel group;
- both scaled by 1 / data-parallel size (as Megatron's DDP does), so a step on DP replicas equals
  one process averaging their micro-batches;
- with sequence parallelism, parameters marked `sequence_parallel` (norms) are first summed over
  the tensor-parallel group, as Megatron's `finalize_model_grads` does.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _all_reduce_flat(grads, group) -> None:
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_gradients(params: Iterable[torch.nn.Parameter], sequence_parallel: bool = False) -> None:
    """Reduce `.grad` of every parameter in place, one bucket per group and dtype.

    A parameter without a gradient on this rank (an expert bank that received no token) gets a
    zero gradient first, so every rank contributes buckets of the same layout.
    """
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if sequence_parallel:
        _all_reduce_flat([p.grad for p in params if getattr(p, "sequence_parallel", False)],
                         parallel_state.get_tensor_model_parallel_group())
    dp = parallel_state.get_data_parallel_world_size()
    for dtype in {p.grad.dtype for p in params}:
        dense = [p.grad for p in params if p.grad.dtype == dtype and getattr(p, "allreduce", True)]
        expert = [p.grad for p in params if p.grad.dtype == dtype and not getattr(p, "allreduce", True)]
        _all_reduce_flat(dense, parallel_state.get_data_parallel_group())
        _all_reduce_flat(expert, parallel_state.get_expert_data_parallel_group())
    if dp > 1:
        for p in params:
            p.grad.div_(dp)
