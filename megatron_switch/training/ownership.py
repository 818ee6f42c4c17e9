"""Which rank owns each parameter under `--use-distributed-optimizer` (ZeRO-1), and the broadcast
that brings every replica the owners' updated values.

A parameter is reduced over one group: dense parameters over data parallel, expert parameters
(`param.allreduce == False`) over expert-data parallel. Within that group exactly one rank owns it:
only the owner keeps its float32 master and Adam's state and updates it; afterwards each owner
broadcasts what it updated. Every rank of a group holds the same parameters (same TP rank, pipeline
stage and experts), so all of them compute the same owners from the parameters' sizes alone.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

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
