"""The optimizer's state as checkpoints see it: Adam's moments and float32 master weights, each
sharded exactly like its model parameter, from whole parameters or from distributed-optimizer pieces.

`OptimizerPieces` is what a checkpoint saves and restores of the step: the torch optimizer, the
model parameter of each of its masters, and, with `--use-distributed-optimizer`, the element range
of the flattened parameter each master holds (the state of the other elements is another rank's).
Such a rank saves its pieces as the main data-parallel replica, each piece as rectangular blocks of
the same global tensors (`flat_range_blocks`), and nothing for the other pieces, so the global
tensors are the same as without it, and either kind of run (at any data-parallel size) loads the
other's checkpoints, each rank reading its own pieces.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_switch.checkpoint.layout import CheckpointError
from megatron_switch.training.ownership import piece_of


@dataclasses.dataclass(frozen=True)
class OptimizerPieces:
    """`optimizer` (a torch optimizer whose param_groups hold the masters), `params` (the model
    parameter of each master, in param_groups order) and `ranges` ((start, end) of the flattened
    parameter each master holds under --use-distributed-optimizer; None: every master whole)."""

    optimizer: torch.optim.Optimizer
    params: Sequence[torch.nn.Parameter]
    ranges: Sequence[tuple[int, int]] | None = None

    @property
    def masters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def pieces(self) -> list[tuple[int, int] | None]:
        """The range of each master; None where it holds its whole parameter."""
        return list(self.ranges) if self.ranges is not None else [None] * len(self.params)


def _main_data_parallel_replica(sharded):
    """The same shard of the same tensor, as the main copy over data parallel: megatron's replica_id
    is (tied-embedding copy, TP rank, DP rank) with DP rank over data parallel (dense) or
    expert-data parallel (experts); only that last component becomes 0."""
    replica_id = sharded.replica_id
    assert isinstance(replica_id, tuple) and len(replica_id) == 3, (sharded.key, replica_id)
    return dataclasses.replace(sharded, replica_id=(*replica_id[:-1], 0))


def flat_range_blocks(shape: Sequence[int], start: int, end: int) -> list:
    """Elements start..end of a row-major tensor of `shape` as rectangular blocks, each a
    contiguous run of those elements: [(offset, block_shape, flat_start)], at most 2 * ndim - 1."""
    if start >= end:
        return []
    if not shape:
        return [((), (), start)]
    inner = math.prod(shape[1:])
    first, last = start // inner, (end - 1) // inner
    if first == last:  # inside one row: the row's own blocks
        return [((first, *offset), (1, *block), first * inner + flat)
                for offset, block, flat in flat_range_blocks(shape[1:], start - first * inner, end - first * inner)]
    whole_start = -(-start // inner) * inner
    whole_end = end // inner * inner
    blocks = flat_range_blocks(shape, start, whole_start)  # the partial first row
    if whole_end > whole_start:
        blocks.append(((whole_start // inner, *[0] * (len(shape) - 1)),
                       ((whole_end - whole_start) // inner, *shape[1:]), whole_start))
    return blocks + flat_range_blocks(shape, whole_end, end)  # the partial last row


def _piece_blocks(sharded, key: str, flat: torch.Tensor, start: int, end: int) -> dict:
    """`flat` (elements start..end of the model parameter `sharded` describes) as ShardedTensors of
    the global tensor `key`, one per block (numbered in element order), as the main data-parallel
    replica."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not isinstance(sharded, ShardedTensor) or tuple(sharded.local_shape) != tuple(sharded.data.shape):
        raise CheckpointError(f"{sharded.key}: the distributed optimizer's checkpoint needs a plain sharded "
                              f"tensor per parameter; run without --use-distributed-optimizer")
    main = _main_data_parallel_replica(sharded)
    prepended = sharded.global_offset[:sharded.prepend_axis_num]
    local_offset = sharded.global_offset[sharded.prepend_axis_num:]
    return {number: ShardedTensor(key, flat[first - start:first - start + math.prod(block)].view(block), flat.dtype,
                                  tuple(block), sharded.global_shape,
                                  (*prepended, *(a + b for a, b in zip(local_offset, offset))), None,
                                  main.replica_id, sharded.prepend_axis_num)
            for number, (offset, block, first) in enumerate(flat_range_blocks(sharded.local_shape, start, end))}


def optimizer_sharded_state(pieces: OptimizerPieces, model_sharded: dict) -> dict:
    """Adam's moments, and the float32 master weights of the bf16 parameters (--bf16), each sharded
    exactly like its model parameter. With a sharded optimizer, each rank saves its pieces, as the
    main data-parallel replica: whole parameters (the same tensors as without it), or element ranges
    of them, as blocks of the same global tensors."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    state = pieces.optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sharded, pieces.params)
    masters = pieces.masters
    if pieces.ranges is not None:
        blocks = {}
        for index, (start, end) in enumerate(pieces.ranges):
            tensors = {name: state["state"][index][name] for name in ("exp_avg", "exp_avg_sq")}
            if pieces.params[index].dtype != torch.float32:
                tensors["main_param"] = masters[index]
            blocks[index] = {name: _piece_blocks(id_map[index], f"optimizer.{_KEYS[name]}.{id_map[index].key}",
                                                 tensor.reshape(-1), start, end)
                             for name, tensor in tensors.items()}
        # Common state, the same on every rank: the layout, and the groups' hyperparameters (for
        # `megatron-switch convert`; which parameters each group holds differs from rank to rank).
        groups = [{k: v for k, v in group.items() if k != "params"} for group in state["param_groups"]]
        return {"layout": "pieces", "param_groups": groups, "pieces": blocks}
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    state["main_params"] = {
        index: make_sharded_optimizer_tensor(id_map[index], master, "optimizer.main_param")
        for index, (master, param) in enumerate(zip(masters, pieces.params))
        if param.dtype != torch.float32}
    # Empty containers (fp32 masters) would be common state, and differ from rank 0's: leave them
    # out (loading restores them).
    return {key: value for key, value in state.items() if value != {}}


# Global tensor names (after "optimizer.") of what the plain optimizer's state dict holds.
_KEYS = {"exp_avg": "state.exp_avg", "exp_avg_sq": "state.exp_avg_sq", "main_param": "main_param"}


def load_optimizer_state(pieces: OptimizerPieces, loaded: dict, step: float) -> None:
    """Restore the optimizer from a loaded `optimizer_sharded_state` (either kind, into either kind)."""
    optimizer = pieces.optimizer
    if pieces.ranges is not None:
        _load_pieces(pieces, loaded, step)
        return
    if loaded.pop("layout", None) == "pieces":  # saved by a sharded run: groups without
        loaded.pop("pieces", None)  # their parameters (the scheduler restores the learning rate)
        loaded["param_groups"] = optimizer.state_dict()["param_groups"]
    loaded.setdefault("state", {})
    masters = pieces.masters
    with torch.no_grad():
        for index, value in loaded.pop("main_params", {}).items():
            masters[index].copy_(value)
    for state in loaded["state"].values():
        state["step"] = torch.tensor(step)
    optimizer.load_state_dict(loaded)


def _load_pieces(pieces: OptimizerPieces, loaded: dict, step: float) -> None:
    """Copy the loaded blocks into the state of each of this rank's pieces (where the checkpoint
    loader filled the views in place, this copies nothing new)."""
    with torch.no_grad():
        for index, master in enumerate(pieces.masters):
            state = pieces.optimizer.state[master]
            state["step"].fill_(step)
            for name, blocks in loaded.get("pieces", {}).get(index, {}).items():
                target = (master if name == "main_param" else state[name]).view(-1)
                offset = 0
                for number in sorted(blocks):
                    target[offset:offset + blocks[number].numel()].copy_(blocks[number].reshape(-1))
                    offset += blocks[number].numel()


def optimizer_step(optimizer) -> float:
    """Collective: Adam's step count, the same on every rank, also one whose optimizer holds no
    parameter (a data-parallel rank that owns none)."""
    from megatron_switch.ops.collectives import comm_device

    steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    step = torch.tensor([max(steps, default=0.0)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    return float(step.item())


def init_optimizer_state(optimizer) -> None:
    """Give every parameter Adam's zero state, so a state dict has its full structure."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                # A fused AdamW keeps its step count on the parameter's device.
                step = torch.tensor(0.0, device=p.device if group.get("fused") else "cpu")
                optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def without_optimizer_state(path: str, pieces: OptimizerPieces) -> None:
    """A checkpoint without optimizer state: Adam starts from zero, and float32 master weights
    (--bf16) start from the loaded model, not from the initialisation they were copied from."""
    with torch.no_grad():
        for master, param, piece in zip(pieces.masters, pieces.params, pieces.pieces):
            if param.dtype != torch.float32:
                master.copy_(piece_of(param, piece))
    if dist.get_rank() == 0:
        print(f" checkpoint {path} has no optimizer state: Adam's moments start from zero", flush=True)
