"""Autograd-aware collectives for the Switch layer, on any device and backend (gloo, NCCL).

Megatron-Core's own mappings allocate their outputs on `torch.cuda.current_device()`; these take
the device from the input, so the same code runs on CPU through gloo and on GPU through NCCL.
A group of size one (or None) makes each of them the identity.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def comm_device() -> torch.device:
    """Where tensors for the default backend live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_to_all(x: torch.Tensor, group: Group, out_splits: Optional[List[int]],
                in_splits: Optional[List[int]]) -> torch.Tensor:
    x = x.contiguous()
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits,
                           group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, out_splits, in_splits):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        return _all_to_all(x, group, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.in_splits, ctx.out_splits), None, None, None


def all_to_all(x: torch.Tensor, group: Group, out_splits: Optional[List[int]] = None,
               in_splits: Optional[List[int]] = None) -> torch.Tensor:
    """Rows of `x` split over the group's ranks (equally, or by `in_splits`); backward is the reverse."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, out_splits, in_splits)


def _gather_rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * group_size(group),) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _rows_of_rank(x: torch.Tensor, group: Group) -> torch.Tensor:
    rows = x.shape[0] // group_size(group)
    return x[group_rank(group) * rows:(group_rank(group) + 1) * rows].contiguous()


class _GatherRows(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: this rank's rows of a replicated gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _rows_of_rank(grad, ctx.group), None


class _ScatterRows(torch.autograd.Function):
    """Forward: this rank's rows of a replicated tensor. Backward: all-gather along dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _rows_of_rank(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.group), None


def gather_rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather along dim 0 of a tensor whose gradient will be replicated over the group."""
    return x if group_size(group) == 1 else _GatherRows.apply(x, group)


def scatter_rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's equal share of dim 0 of a tensor replicated over the group."""
    if group_size(group) == 1:
        return x
    if x.shape[0] % group_size(group):
        raise ValueError(f"cannot split {x.shape[0]} rows over {group_size(group)} ranks: make the "
                         f"sequence length divisible by the tensor-parallel size")
    return _ScatterRows.apply(x, group)


class _SumForward(torch.autograd.Function):
    """Forward: all-reduce (sum). Backward: identity (the gradient is already replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumBackward(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_forward(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum a per-rank partial over the group; each rank back-propagates its own share."""
    return x if group_size(group) == 1 else _SumForward.apply(x, group)


def sum_backward(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Use a replicated tensor on each rank; its gradients from all ranks are summed."""
    return x if group_size(group) == 1 else _SumBackward.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather along dim 0 of a tensor that carries no gradient (routing decisions, counts)."""
    return x if group_size(group) == 1 else _gather_rows(x.detach(), group)
