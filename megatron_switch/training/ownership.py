"""Which rank updates which parameters under `--use-distributed-optimizer` (ZeRO-1).

A parameter is reduced over one group: dense parameters over data parallel, expert parameters
(`param.allreduce == False`) over expert-data parallel. Every rank of a group holds the same
parameters (same TP rank, pipeline stage and experts). Two ways to split them within the group:

- With megatron-core's DDP (`ddp_shard_pieces`): DDP's distributed-optimizer mode lays each group's
  parameters out in contiguous buckets, each split into equal shards, one per rank; the gradient is
  reduce-scattered (rank r receives the reduced shard r) and, after the step, the parameters are
  all-gathered from the shards. A rank updates the *pieces* (flattened element ranges) of the
  parameters that fall in its shards: the communication of megatron-core's DistributedOptimizer.
- With the local reduction (`ParameterOwners`): gradients are all-reduced; each parameter is owned
  whole by one rank, chosen from the parameters' sizes alone, which updates it and broadcasts it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_switch.training.gradients import copy_from_flat


def assign_owners(numels: Sequence[int], ranks: int) -> List[int]:
    """Owner (a rank in 0..ranks-1) of each of the parameters with these sizes: largest first,
    each to the rank holding the fewest elements so far (ties: the lower rank, then the earlier
    parameter). Deterministic; the loads differ by at most the largest parameter."""
    loads = [0] * ranks
    owners = [0] * len(numels)
    for index in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += numels[index]
    return owners


def piece_of(tensor: torch.Tensor, piece: Optional[Tuple[int, int]]) -> torch.Tensor:
    """Elements start..end (`piece`) of the flattened `tensor`, a view where the tensor is contiguous;
    the tensor itself, in its shape, for None or a piece that is all of it."""
    if piece is None or tuple(piece) == (0, tensor.numel()):
        return tensor
    return tensor.reshape(-1)[piece[0]:piece[1]]


def ddp_shard_pieces(ddp) -> List[Tuple[torch.nn.Parameter, int, int]]:
    """(param, start, end) for each piece of a parameter inside this rank's shard of a bucket of
    `ddp` (megatron-core's DistributedDataParallel built with use_distributed_optimizer): elements
    start..end of the flattened parameter, whose reduced gradient this rank receives and whose
    updated values it sends to the others."""
    pieces = []
    for buffer in [*ddp.buffers, *ddp.expert_parallel_buffers]:
        size, rank = dist.get_world_size(buffer.data_parallel_group), dist.get_rank(buffer.data_parallel_group)
        for bucket in buffer.buckets:
            shard = bucket.grad_data.numel() // size
            low = bucket.offset + rank * shard
            for param in bucket.params_list:
                begin, finish, _ = buffer.param_index_map[param]
                start, end = max(begin, low), min(finish, low + shard)
                if start < end:
                    pieces.append((param, start - begin, end - begin))
    return pieces


def reduction_group(param: torch.nn.Parameter) -> dist.ProcessGroup:
    """The group a parameter's gradient is reduced over and its owner is chosen from."""
    if getattr(param, "allreduce", True):
        return parallel_state.get_data_parallel_group()
    return parallel_state.get_expert_data_parallel_group()


class ParameterOwners:
    """The owner of each of `params` (a model's trainable parameters, in the same order on every
    rank): `owned` lists this rank's (in model order), `broadcast()` sends each owner's parameters
    to its group."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.owner: List[int] = [0] * len(self.params)  # rank within the parameter's reduction group
        # (group, indices of its parameters): dense, then experts, each balanced on its own.
        self._groups: List[Tuple[dist.ProcessGroup, List[int]]] = []
        for dense in (True, False):
            indices = [i for i, p in enumerate(self.params) if getattr(p, "allreduce", True) == dense]
            if not indices:
                continue
            group = reduction_group(self.params[indices[0]])
            self._groups.append((group, indices))
            owners = assign_owners([self.params[i].numel() for i in indices], dist.get_world_size(group))
            for i, owner in zip(indices, owners):
                self.owner[i] = owner
        mine = {i for group, indices in self._groups for i in indices if self.owner[i] == dist.get_rank(group)}
        self.owned: List[torch.nn.Parameter] = [p for i, p in enumerate(self.params) if i in mine]

    @torch.no_grad()
    def broadcast(self) -> None:
        """Collective over each group: every owner sends its parameters' current values (one flat
        bucket per owner and dtype), so all replicas end identical to the owners'."""
        for group, indices in self._groups:
            if dist.get_world_size(group) == 1:
                continue
            me = dist.get_rank(group)
            for owner in range(dist.get_world_size(group)):
                params = [self.params[i] for i in indices if self.owner[i] == owner]
                for dtype in dict.fromkeys(p.dtype for p in params):  # first-seen order: the same on every rank
                    bucket = [p for p in params if p.dtype == dtype]
                    if owner == me:
                        flat = torch.cat([p.reshape(-1) for p in bucket])
                    else:
                        flat = torch.empty(sum(p.numel() for p in bucket), dtype=dtype, device=bucket[0].device)
                    dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
                    if owner != me:
                        copy_from_flat(flat, bucket)
