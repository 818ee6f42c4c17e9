"""Checkpoints through megatron's dist_checkpointing (torch_dist), saved atomically; loads also
read Megatron's legacy per-rank files (`--ckpt-format torch`, as `megatron-switch convert` writes them).

Layout, as Megatron-LM writes it: `<save>/iter_0000100/` (a torch_dist checkpoint) and
`<save>/latest_checkpointed_iteration.txt`. A save goes to `iter_0000100.tmp/` first; only a
complete save is renamed into place, and only then does the tracker file (itself replaced
atomically) point at it, so a killed save never becomes the latest.

Contents: the model's sharded state (global expert axis, so it reshards across TP/PP/EP), Adam's
moments and any float32 master weights (--bf16) sharded like their parameters, the LR scheduler, the
iteration and consumed samples, the model shape and layout (for `megatron-switch convert`), and each
rank's RNG states (restored when the world size is unchanged).

With `--use-distributed-optimizer` each rank's optimizer holds only its pieces of the parameters
(`optimizer.param_pieces`: element ranges of the flattened parameters, or whole ones). It saves them
as the main data-parallel replica, each piece as rectangular blocks of the same global tensors
(`flat_range_blocks`), and nothing for the other pieces, so the global tensors are the same as
without it, and either kind of run (at any data-parallel size) loads the other's checkpoints, each
rank reading its own pieces.

Loading detects the format of the iteration directory, as Megatron-LM does: torch_dist (any layout:
it reshards) or legacy `mp_rank_*` files (the layout they were written for). A checkpoint without
optimizer state (`convert --no-optim`) restores the model and scheduler; Adam starts from zero.
Every pickle a load reads goes through `checkpoint.safe_pickle`'s allow-list unless
`trust_checkpoint_code` (`--trust-checkpoint-code`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
from collections.abc import Sequence

import numpy
import torch
import torch.distributed as dist

from megatron_switch.training.ownership import piece_of

TRACKER = "latest_checkpointed_iteration.txt"


def model_metadata() -> dict:
    """Sharded-state-dict metadata, fresh per call: megatron-core adds the current data-parallel
    group to it in place. Switch and dense layers alternate, so layers are keyed one by one."""
    return {"non_homogeneous_layers": True}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_checkpoint(root: str) -> tuple[int, str]:
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
    if checkpoint_format(path) is None:
        raise CheckpointError(f"{tracker} names iteration {iteration}, but {path} is missing or "
                              f"incomplete (no metadata.json, no mp_rank_* files)")
    return iteration, path


def checkpoint_format(path: str):
    """"torch_dist", "torch" (legacy mp_rank_* files) or None for what the directory holds."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return "torch_dist"
    if os.path.isdir(path) and any(n.startswith("mp_rank_") for n in os.listdir(path)):
        return "torch"
    return None


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


def _masters(optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _pieces(optimizer) -> list:
    """(start, end) of the flattened parameter each master holds; None: the whole parameter."""
    return getattr(optimizer, "param_pieces", None) or [None] * len(_masters(optimizer))


def _optimizer_sharded_state(optimizer, model_sharded: dict, params_in_optimizer_order: Sequence):
    """Adam's moments, and the float32 master weights of the bf16 parameters (--bf16), each sharded
    exactly like its model parameter. With a sharded optimizer, each rank saves its pieces, as the
    main data-parallel replica: whole parameters (the same tensors as without it), or element ranges
    of them (`optimizer.param_pieces`), as blocks of the same global tensors."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    state = optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sharded, params_in_optimizer_order)
    pieces = getattr(optimizer, "param_pieces", None)
    masters = _masters(optimizer)
    if pieces is not None:
        blocks = {}
        for index, (start, end) in enumerate(pieces):
            tensors = {name: state["state"][index][name] for name in ("exp_avg", "exp_avg_sq")}
            if params_in_optimizer_order[index].dtype != torch.float32:
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
        for index, (master, param) in enumerate(zip(masters, params_in_optimizer_order))
        if param.dtype != torch.float32}
    # Empty containers (fp32 masters) would be common state, and differ from rank 0's: leave them
    # out (loading restores them).
    return {key: value for key, value in state.items() if value != {}}


# Global tensor names (after "optimizer.") of what the plain optimizer's state dict holds.
_KEYS = {"exp_avg": "state.exp_avg", "exp_avg_sq": "state.exp_avg_sq", "main_param": "main_param"}


def _load_pieces(optimizer, loaded: dict, step: float) -> None:
    """Copy the loaded blocks into the state of each of this rank's pieces (where the checkpoint
    loader filled the views in place, this copies nothing new)."""
    with torch.no_grad():
        for index, master in enumerate(_masters(optimizer)):
            state = optimizer.state[master]
            state["step"].fill_(step)
            for name, blocks in loaded.get("pieces", {}).get(index, {}).items():
                target = (master if name == "main_param" else state[name]).view(-1)
                offset = 0
                for number in sorted(blocks):
                    target[offset:offset + blocks[number].numel()].copy_(blocks[number].reshape(-1))
                    offset += blocks[number].numel()


def _optimizer_step(optimizer) -> float:
    """Collective: Adam's step count, the same on every rank, also one whose optimizer holds no
    parameter (a data-parallel rank that owns none)."""
    from megatron_switch.comm import comm_device

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


def _rng_object(rank: int, world: int):
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if get_cuda_rng_tracker().is_initialized():  # megatron's named streams (tensor-parallel dropout)
        state["tracker"] = get_cuda_rng_tracker().get_states()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def model_description(model) -> tuple[dict, dict]:
    """(model_config, layout) of a built model: what a converter needs to lay it out again."""
    from megatron.core import parallel_state

    from megatron_switch.layer import SwitchMLP

    config = model.config
    switch = next((m.switch for m in model.modules() if isinstance(m, SwitchMLP)), None)
    described = {"num_layers": config.num_layers, "hidden_size": config.hidden_size,
                 "num_attention_heads": config.num_attention_heads, "ffn_hidden_size": config.ffn_hidden_size,
                 "gated_linear_unit": config.gated_linear_unit}
    if switch is not None:
        described.update(num_experts=switch.num_experts, expert_interval=switch.expert_interval)
    layout = {"tp": parallel_state.get_tensor_model_parallel_world_size(),
              "pp": parallel_state.get_pipeline_model_parallel_world_size(),
              "ep": parallel_state.get_expert_model_parallel_world_size()}
    return described, layout


def _state(model, optimizer, params_in_optimizer_order, scheduler, common: dict, with_optimizer: bool = True,
           with_rng: bool = True):
    model_sharded = model.sharded_state_dict(metadata=model_metadata())
    model_config, layout = model_description(model)
    state = {
        "model": model_sharded,
        "scheduler": scheduler.state_dict(),
        "model_config": model_config,
        "layout": layout,
        **common,
    }
    if with_optimizer:
        state["optimizer"] = _optimizer_sharded_state(optimizer, model_sharded, params_in_optimizer_order)
        state["optimizer_step"] = _optimizer_step(optimizer)
    if with_rng:
        state["rng"] = _rng_object(dist.get_rank(), dist.get_world_size())
        state["world_size"] = dist.get_world_size()
    return state


def save_checkpoint(root: str, iteration: int, model, optimizer, params_in_optimizer_order, scheduler,
                    common: dict) -> str:
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


def load_checkpoint(root: str, model, optimizer, params_in_optimizer_order, scheduler,
                    trust_checkpoint_code: bool = False) -> dict:
    """Collective. Restores model, optimizer (when the checkpoint has its state), scheduler (and RNG
    when the world size matches); returns the checkpoint's common entries (iteration, consumed
    samples, ...). Reads torch_dist at any layout and legacy per-rank files at their own."""
    _, path = latest_checkpoint(root)
    init_optimizer_state(optimizer)
    if checkpoint_format(path) == "torch":
        return _load_legacy(path, model, optimizer, params_in_optimizer_order, scheduler, trust_checkpoint_code)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megatron_switch.checkpoint.distcp import load_dist_checkpoint, read_common_state
    from megatron_switch.checkpoint.safe_pickle import CheckpointCodeError

    try:
        common = read_common_state(path, trusted=trust_checkpoint_code)
        template = _state(model, optimizer, params_in_optimizer_order, scheduler, {},
                          with_optimizer="optimizer" in common,
                          with_rng=common.get("world_size") == dist.get_world_size())
        loaded = load_dist_checkpoint(template, path, trusted=trust_checkpoint_code)
    except CheckpointCodeError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001  (several types; say which checkpoint and why)
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {reason}); "
                              f"it may be truncated or from another model: load an earlier iteration "
                              f"or start without --load") from None
    model.load_state_dict(loaded["model"])
    if "optimizer" in loaded and getattr(optimizer, "param_pieces", None) is not None:
        _load_pieces(optimizer, loaded["optimizer"], loaded["optimizer_step"])
    elif "optimizer" in loaded:
        optimizer_state = loaded["optimizer"]
        if optimizer_state.pop("layout", None) == "pieces":  # saved by a sharded run: groups without
            optimizer_state.pop("pieces", None)  # their parameters (the scheduler restores the learning rate)
            optimizer_state["param_groups"] = optimizer.state_dict()["param_groups"]
        optimizer_state.setdefault("state", {})
        masters = _masters(optimizer)
        with torch.no_grad():
            for index, value in optimizer_state.pop("main_params", {}).items():
                masters[index].copy_(value)
        for state in optimizer_state["state"].values():
            state["step"] = torch.tensor(loaded["optimizer_step"])
        optimizer.load_state_dict(optimizer_state)
    else:
        _without_optimizer_state(path, optimizer, params_in_optimizer_order)
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _restore_rng(loaded["rng"])
    return {k: v for k, v in loaded.items() if k not in ("model", "optimizer", "scheduler", "rng")}


def _without_optimizer_state(path: str, optimizer, params_in_optimizer_order) -> None:
    """A checkpoint without optimizer state: Adam starts from zero, and float32 master weights
    (--bf16) start from the loaded model, not from the initialisation they were copied from."""
    with torch.no_grad():
        for master, param, piece in zip(_masters(optimizer), params_in_optimizer_order, _pieces(optimizer)):
            if param.dtype != torch.float32:
                master.copy_(piece_of(param, piece))
    if dist.get_rank() == 0:
        print(f" checkpoint {path} has no optimizer state: Adam's moments start from zero", flush=True)


def _restore_rng(rng: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    numpy.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if "tracker" in rng:
        get_cuda_rng_tracker().set_states(rng["tracker"])


def load_model_weights(root: str, model, trust_checkpoint_code: bool = False) -> int:
    """Collective. Only the model's weights (inference, evaluation) from a checkpoint root or an
    iter_XXXXXXX directory of either format; returns its iteration."""
    path = root if checkpoint_format(root) else latest_checkpoint(root)[1]
    if checkpoint_format(path) == "torch":
        return int(_load_legacy_model(path, model, trust_checkpoint_code)[0]["iteration"])
    from megatron_switch.checkpoint.distcp import load_dist_checkpoint, read_common_state

    common = read_common_state(path, trusted=trust_checkpoint_code)
    loaded = load_dist_checkpoint({"model": model.sharded_state_dict(metadata=model_metadata())}, path,
                                  trusted=trust_checkpoint_code)
    model.load_state_dict(loaded["model"])
    return int(common["iteration"])


def _load_legacy_model(path: str, model, trust_checkpoint_code: bool = False):
    """(file contents, file name, localize) after copying this rank's legacy file into `model`."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_switch.checkpoint.legacy import layout_of_args, rank_file
    from megatron_switch.checkpoint.safe_pickle import CheckpointCodeError, load
    from megatron_switch.checkpoint.sharding import Layout, local_name

    layout = Layout(parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size(),
                    parallel_state.get_expert_model_parallel_world_size())
    coord = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
             parallel_state.get_expert_model_parallel_rank())
    file = rank_file(path, layout, coord)
    try:
        state = load(file, trusted=trust_checkpoint_code)
    except FileNotFoundError:
        raise CheckpointError(f"legacy checkpoint {path}: no {os.path.relpath(file, path)} for this rank at "
                              f"{layout}; convert it to this layout with `megatron-switch convert "
                              f"--target-tp {layout.tp} --target-pp {layout.pp} --target-ep {layout.ep}`") from None
    except CheckpointCodeError:
        raise
    except Exception as err:  # noqa: BLE001  (zip and pickle raise several types)
        raise CheckpointError(f"checkpoint file {file} cannot be loaded ({type(err).__name__}); it may be "
                              f"truncated: load an earlier iteration or start without --load") from None
    saved = layout_of_args(state["args"])
    if saved != layout:
        raise CheckpointError(f"legacy checkpoint {path} was written for {saved}, this run is {layout}: convert "
                              f"it with `megatron-switch convert --target-tp {layout.tp} --target-pp {layout.pp} "
                              f"--target-ep {layout.ep}` (or load a torch_dist checkpoint, which reshards)")

    def localize(key: str) -> str:
        return local_name(key, layout, model.config.num_layers)

    with torch.no_grad():
        for sharded in nested_values(model.sharded_state_dict(metadata=model_metadata())):
            if not isinstance(sharded, ShardedTensor):
                continue
            value = state["model"].get(localize(sharded.key))
            if value is None or tuple(value.shape) != tuple(sharded.data.shape):
                found = "missing" if value is None else f"shape {tuple(value.shape)}"
                raise CheckpointError(f"{file}: {localize(sharded.key)} is {found}, the model needs "
                                      f"{tuple(sharded.data.shape)}: the checkpoint is from another model or layout")
            sharded.data.copy_(value)
    return state, file, localize


def _load_legacy(path: str, model, optimizer, params_in_optimizer_order, scheduler,
                 trust_checkpoint_code: bool = False) -> dict:
    """This rank's `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`: model by checkpoint key, Adam's
    state and float32 masters by parameter name, scheduler, progress."""
    state, file, localize = _load_legacy_model(path, model, trust_checkpoint_code)
    if "optimizer" in state:
        _load_legacy_optimizer(file, state["optimizer"], optimizer, params_in_optimizer_order,
                               model.sharded_state_dict(metadata=model_metadata()), localize)
    else:
        _without_optimizer_state(path, optimizer, params_in_optimizer_order)
    if state.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    return {"iteration": state["iteration"],
            "consumed_train_samples": getattr(state["args"], "consumed_train_samples", 0)}


def _load_legacy_optimizer(file, saved, optimizer, params_in_optimizer_order, model_sharded, localize) -> None:
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map as id_map_of,
    )

    from megatron_switch.checkpoint.legacy import optimizer_parts

    adam, saved_masters = optimizer_parts(saved)
    by_name = {}
    for g, group in enumerate(adam["param_groups"]):
        for j, (index, name) in enumerate(zip(group["params"], group["param_names"])):
            master = saved_masters[g][j] if saved_masters is not None else None
            by_name[name] = (adam["state"].get(index), master)
    id_map = id_map_of(model_sharded, params_in_optimizer_order)
    current = optimizer.state_dict()
    with torch.no_grad():
        for index, (master, param, piece) in enumerate(zip(_masters(optimizer), params_in_optimizer_order,
                                                            _pieces(optimizer))):
            key = localize(id_map[index].key)
            if key not in by_name or by_name[key][0] is None:
                raise CheckpointError(f"{file}: no optimizer state for {key}: the checkpoint is from another "
                                      f"model; convert it with --no-optim to load the weights only")
            moments, saved_master = by_name[key]
            current["state"][index] = {name: piece_of(value, piece) if name != "step" else value
                                       for name, value in moments.items()}
            if param.dtype != torch.float32:
                if saved_master is None:
                    raise CheckpointError(f"{file}: no float32 master weight for {key} (saved without --bf16?)")
                master.copy_(piece_of(saved_master, piece))
    for group, saved_group in zip(current["param_groups"], adam["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k not in ("params", "param_names")})
    optimizer.load_state_dict(current)
