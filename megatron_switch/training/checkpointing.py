"""Checkpoints through megatron's dist_checkpointing (torch_dist), saved atomically.

Layout, as Megatron-LM writes it: `<save>/iter_0000100/` (a torch_dist checkpoint) and
`<save>/latest_checkpointed_iteration.txt`. A save goes to `iter_0000100.tmp/` first; only a
complete save is renamed into place, and only then does the tracker file (itself replaced
atomically) point at it, so a killed save never becomes the latest.

Contents: the model's sharded state (global expert axis, so it reshards across TP/PP/EP), Adam's
moments and any float32 master weights (--bf16) sharded like their parameters, the LR scheduler, the iteration and consumed samples, and
each rank's RNG states (restored when the world size is unchanged).
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Dict, Sequence, Tuple

import numpy
import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_METADATA = {"non_homogeneous_layers": True}  # Switch and dense layers alternate


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_checkpoint(root: str) -> Tuple[int, str]:
    """(iteration, directory) named by the tracker file under `root`, checked to exist."""
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: no such directory")
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"--load {root}: no {TRACKER} (no complete checkpoint was saved there)")
    with open(tracker) as f:
        text = f.read().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}") from None
    path = checkpoint_dir(root, iteration)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"{tracker} names iteration {iteration}, but {path} is missing or "
                              f"incomplete (no metadata.json)")
    return iteration, path


def _optimizer_sharded_state(optimizer, model_sharded: Dict, params_in_optimizer_order: Sequence):
    """Adam's moments, and the float32 master weights where they are not the model's own
    parameters (--bf16), each sharded exactly like its model parameter."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    state = optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sharded, params_in_optimizer_order)
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    state["main_params"] = {
        index: make_sharded_optimizer_tensor(id_map[index], master, "optimizer.main_param")
        for index, (master, param) in enumerate(zip(masters, params_in_optimizer_order))
        if master is not param}
    return state


def init_optimizer_state(optimizer) -> None:
    """Give every parameter Adam's zero state, so a state dict has its full structure."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _rng_object(rank: int, world: int):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy.random.get_state()}
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _state(model, optimizer, params_in_optimizer_order, scheduler, common: Dict):
    model_sharded = model.sharded_state_dict(metadata=MODEL_METADATA)
    steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    return {
        "model": model_sharded,
        "optimizer": _optimizer_sharded_state(optimizer, model_sharded, params_in_optimizer_order),
        "optimizer_step": max(steps) if steps else 0.0,
        "scheduler": scheduler.state_dict(),
        "rng": _rng_object(dist.get_rank(), dist.get_world_size()),
        "world_size": dist.get_world_size(),
        **common,
    }


def save_checkpoint(root: str, iteration: int, model, optimizer, params_in_optimizer_order, scheduler,
                    common: Dict) -> str:
    """Collective: every rank calls it. Returns the final directory."""
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    init_optimizer_state(optimizer)
    dist_checkpointing.save(_state(model, optimizer, params_in_optimizer_order, scheduler, common), tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return final


def load_checkpoint(root: str, model, optimizer, params_in_optimizer_order, scheduler) -> Dict:
    """Collective. Restores model, optimizer, scheduler (and RNG when the world size matches);
    returns the checkpoint's common entries (iteration, consumed samples, ...)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    iteration, path = latest_checkpoint(root)
    init_optimizer_state(optimizer)
    template = _state(model, optimizer, params_in_optimizer_order, scheduler, {})
    try:
        loaded = dist_checkpointing.load(template, path)
    except (Exception, CheckpointException) as err:  # several types; say which checkpoint and why
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {reason}); "
                              f"it may be truncated or from another model: load an earlier iteration "
                              f"or start without --load") from None
    model.load_state_dict(loaded["model"])
    optimizer_state = loaded["optimizer"]
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for index, value in optimizer_state.pop("main_params").items():
            masters[index].copy_(value)
    for state in optimizer_state["state"].values():
        state["step"] = torch.tensor(loaded["optimizer_step"])
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(loaded["scheduler"])
    if loaded.get("world_size") == dist.get_world_size():
        rng = loaded["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        numpy.random.set_state(rng["numpy"])
    return {k: v for k, v in loaded.items() if k not in ("model", "optimizer", "scheduler", "rng")}
