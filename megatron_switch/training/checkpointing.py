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

from megatron_switch.checkpoint.integrity import (
    check_entries,
    checksum_entries,
    corruption_message,
    last_good_iteration,
    model_differences,
    plan_entries,
    read_integrity,
    write_integrity,
)
from megatron_switch.checkpoint.layout import (
    TRACKER,
    CheckpointError,
    checkpoint_dir,
    checkpoint_format,
    latest_checkpoint,
    read_tracker,
    write_tracker,
)
from megatron_switch.training.faults import fault_point
from megatron_switch.training.ownership import piece_of

def model_metadata() -> dict:
    """Sharded-state-dict metadata, fresh per call: megatron-core adds the current data-parallel
    group to it in place. Switch and dense layers alternate, so layers are keyed one by one."""
    return {"non_homogeneous_layers": True}


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
    """(model_config, layout) of a built model: what a converter needs to lay it out again, and what
    a run that loads the checkpoint must agree with (the padded vocabulary included)."""
    from megatron.core import parallel_state

    from megatron_switch.layer import SwitchMLP
    from megatron_switch.specs.t5_model import SwitchT5Model

    config = model.config
    # The whole model's Switch settings (a pipeline stage may hold no Switch layer): recorded on the
    # model by the builder, else found on a layer of this stage.
    switch = next((m.switch_config for m in model.modules() if getattr(m, "switch_config", None) is not None),
                  None) or next((m.switch for m in model.modules() if isinstance(m, SwitchMLP)), None)
    described = {"num_layers": config.num_layers, "hidden_size": config.hidden_size,
                 "num_attention_heads": config.num_attention_heads, "ffn_hidden_size": config.ffn_hidden_size,
                 "gated_linear_unit": config.gated_linear_unit}
    vocab = next((m.vocab_size for m in model.modules() if isinstance(getattr(m, "vocab_size", None), int)), None)
    if vocab is not None:
        described["padded_vocab_size"] = vocab
    if switch is not None:
        described.update(num_experts=switch.num_experts, expert_interval=switch.expert_interval)
    encoder_decoder = next((m for m in model.modules() if isinstance(m, SwitchT5Model)), None)
    if encoder_decoder is not None:
        described.update(encoder_decoder.description())
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


def _gather_checksums(path: str) -> list:
    """Collective: checksums of every byte range of iteration directory `path` (just written by
    this job), each rank hashing its share; the full list on every rank, in plan order."""
    entries = plan_entries(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = checksum_entries(path, entries[rank::world])
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    done = [None] * len(entries)
    for r, share in enumerate(shares):
        done[r::world] = share
    return done


def remove_incomplete_saves(root: str) -> list[str]:
    """Rank 0 at start: delete `iter_*.tmp` directories an interrupted earlier run left in `root`."""
    removed = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name.startswith("iter_") and name.endswith(".tmp") and os.path.isdir(os.path.join(root, name)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    return removed


def save_checkpoint(root: str, iteration: int, model, optimizer, params_in_optimizer_order, scheduler,
                    common: dict, writer: dict | None = None) -> str:
    """Collective: every rank calls it. Returns the final directory.

    Writes `iter_N.tmp/` (the sharded state, then integrity.json: checksums of every byte and the
    writer's identity, `writer` added to it), renames it to `iter_N/`, then points the tracker at it.
    A failure on any rank removes the `.tmp` directory and raises CheckpointError: the tracker still
    names the previous checkpoint."""
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    try:
        if dist.get_rank() == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        init_optimizer_state(optimizer)
        state = _state(model, optimizer, params_in_optimizer_order, scheduler, common)
        dist_checkpointing.save(state, tmp)
        fault_point("save", dist.get_rank(), iteration)
        dist.barrier()
        entries = _gather_checksums(tmp)
        if dist.get_rank() == 0:
            identity = {"iteration": iteration, "format": "torch_dist", "model_config": state["model_config"],
                        "layout": {**state["layout"], "world_size": dist.get_world_size()},
                        "written_by": "megatron-switch train", **(writer or {})}
            write_integrity(tmp, entries, identity)
        dist.barrier()
    except Exception as err:  # noqa: BLE001  (a full disk surfaces as OSError or as torch's RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_failure(root, iteration, tmp, err)) from None
    if dist.get_rank() == 0:
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        write_tracker(root, iteration)
    dist.barrier()
    return final


def _save_failure(root: str, iteration: int, tmp: str, err: Exception) -> str:
    reason = (getattr(err, "strerror", None) or str(err).strip().splitlines()[-1] if str(err).strip()
              else type(err).__name__)[:300]
    try:
        free = shutil.disk_usage(root).free
        disk = f"; the file system holding it has {free / 2**20:.1f} MiB free" if free < 256 << 20 else ""
    except OSError:
        disk = ""
    try:
        previous = f"iteration {read_tracker(root)}" if os.path.isfile(os.path.join(root, TRACKER)) else "none"
    except (OSError, CheckpointError):
        previous = "unknown (the tracker cannot be read)"
    return (f"saving iteration {iteration} to {root} failed ({type(err).__name__}: {reason}){disk}; removed the "
            f"partial {os.path.basename(tmp)}; the latest checkpoint is still {previous}. Free space or fix {root}, "
            f"then resume with --load {root}")


def verify_collectively(path: str) -> None:
    """Collective: check `path`'s recorded checksums, each rank its share; on damage, find the newest
    earlier iteration that verifies and raise CheckpointError naming both."""
    def problems_of(directory: str) -> list:
        record = read_integrity(directory)
        entries = [] if record is None else record["entries"]
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = check_entries(directory, entries[rank::world])
        shares = [None] * world
        dist.all_gather_object(shares, mine)
        return [line for share in shares for line in share]

    problems = problems_of(path)
    if problems:
        raise on_every_rank(CheckpointError(corruption_message(path, problems, last_good_iteration(path, problems_of))))


def on_every_rank(err: Exception) -> Exception:
    """Mark an error every rank raises alike (a collective decision): only rank 0 reports it."""
    err.on_every_rank = True
    return err


def load_checkpoint(root: str, model, optimizer, params_in_optimizer_order, scheduler, step: int | None = None,
                    schedule_check=None, trust_checkpoint_code: bool = False) -> dict:
    """Collective. Verifies the checkpoint's checksums, then restores model, optimizer (when the
    checkpoint has its state), scheduler (and RNG when the world size matches); returns the
    checkpoint's common entries (iteration, consumed samples, ...). Reads torch_dist at any layout and
    legacy per-rank files at their own. `step`: that iteration instead of the tracker's (--ckpt-step).
    `schedule_check(saved scheduler state)` returns an error message when the run's learning-rate
    schedule conflicts with the checkpoint's (`training.resume`), raised before anything is restored.
    Pickled objects are read through `checkpoint.safe_pickle`'s allow-list unless `trust_checkpoint_code`."""
    _, path = latest_checkpoint(root, step)
    verify_collectively(path)
    fault_point("load", dist.get_rank())
    init_optimizer_state(optimizer)
    if checkpoint_format(path) == "torch":
        return _load_legacy(path, model, optimizer, params_in_optimizer_order, scheduler, schedule_check,
                            trust_checkpoint_code)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megatron_switch.checkpoint.distcp import load_dist_checkpoint, read_common_state
    from megatron_switch.checkpoint.safe_pickle import CheckpointCodeError

    try:
        common = read_common_state(path, trusted=trust_checkpoint_code)
    except CheckpointCodeError:
        raise
    except Exception as err:  # noqa: BLE001  (pickle, zip and I/O raise several types)
        raise CheckpointError(f"checkpoint {path}: its common state cannot be read ({type(err).__name__}); it may "
                              f"be truncated: load an earlier iteration (--ckpt-step N) or start without --load"
                              ) from None
    check_same_model(path, common.get("model_config") or {}, model, trust_checkpoint_code)
    try:
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
    _check_schedule(schedule_check, loaded["scheduler"], path)
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


def _check_schedule(schedule_check, saved: dict | None, path: str) -> None:
    problem = schedule_check(saved) if schedule_check is not None and saved is not None else None
    if problem:
        raise on_every_rank(CheckpointError(f"resuming from {path}: {problem}"))


def check_same_model(path: str, saved: dict, model, trust_checkpoint_code: bool = False) -> None:
    """CheckpointError naming each flag whose value differs between the checkpoint and this run's model
    (shape, experts, padded vocabulary): megatron would otherwise pad or cut some tensors silently."""
    current, layout = model_description(model)
    saved = dict(saved)
    if "padded_vocab_size" not in saved and "padded_vocab_size" in current:  # written before it was recorded
        from megatron_switch.checkpoint.distcp import read_metadata

        stored = read_metadata(path, trusted=trust_checkpoint_code).state_dict_metadata
        shapes = {k: tuple(stored[k].size) for k in ("embedding.word_embeddings.weight", "output_layer.weight")
                  if k in stored}
        if shapes:
            saved["padded_vocab_size"] = next(iter(shapes.values()))[0]
    differences = model_differences(saved, current, layout["tp"])
    if differences:
        raise on_every_rank(CheckpointError(f"checkpoint {path} holds another model than this run builds: "
                                            f"{'; '.join(differences)}. Pass the checkpoint's values, or load "
                                            f"a checkpoint of this model"))


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
    from megatron_switch.checkpoint.sharding import local_name
    from megatron_switch.parallel import Layout

    layout = Layout(parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size(),
                    parallel_state.get_expert_model_parallel_world_size())
    coord = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
             parallel_state.get_expert_model_parallel_rank())
    file = rank_file(path, layout, coord)
    state = _read_legacy_file(path, file, layout, trust_checkpoint_code)
    saved = layout_of_args(state["args"])
    if saved != layout:
        raise CheckpointError(f"legacy checkpoint {path} was written for {saved}, this run is {layout}: convert "
                              f"it with `megatron-switch convert --target-tp {layout.tp} --target-pp {layout.pp} "
                              f"--target-ep {layout.ep}` (or load a torch_dist checkpoint, which reshards)")

    def localize(key: str) -> str:
        return local_name(key, layout, model.config.num_layers)

    first_stage = None  # the first stage's file, for the tied output copy a later stage holds
    with torch.no_grad():
        for sharded in nested_values(model.sharded_state_dict(metadata=model_metadata())):
            if not isinstance(sharded, ShardedTensor):
                continue
            value = state["model"].get(localize(sharded.key))
            if value is None and sharded.key == TIED_EMBEDDING and coord[1] > 0:
                # The last stage's copy of tied embeddings: Megatron-LM's own files hold it as
                # output_layer.weight; files written by `convert` keep it once, in the first stage.
                value = state["model"].get("output_layer.weight")
                if value is None:
                    first_stage = first_stage or _read_legacy_file(path, rank_file(path, layout, (coord[0], 0,
                                                                                                  coord[2])), layout,
                                                              trust_checkpoint_code)
                    value = first_stage["model"].get(TIED_EMBEDDING)
                    state["tied_from_first_stage"] = first_stage
            if value is None or tuple(value.shape) != tuple(sharded.data.shape):
                found = "missing" if value is None else f"shape {tuple(value.shape)}"
                raise CheckpointError(f"{file}: {localize(sharded.key)} is {found}, the model needs "
                                      f"{tuple(sharded.data.shape)}: the checkpoint is from another model or layout")
            sharded.data.copy_(value)
    return state, file, localize


TIED_EMBEDDING = "embedding.word_embeddings.weight"


def _read_legacy_file(path: str, file: str, layout, trust_checkpoint_code: bool = False) -> dict:
    from megatron_switch.checkpoint.safe_pickle import CheckpointCodeError, load

    try:
        return load(file, trusted=trust_checkpoint_code)
    except FileNotFoundError:
        raise CheckpointError(f"legacy checkpoint {path}: no {os.path.relpath(file, path)} for this rank at "
                              f"{layout}; convert it to this layout with `megatron-switch convert "
                              f"--target-tp {layout.tp} --target-pp {layout.pp} --target-ep {layout.ep}`") from None
    except CheckpointCodeError:
        raise
    except Exception as err:  # noqa: BLE001  (zip and pickle raise several types)
        raise CheckpointError(f"checkpoint file {file} cannot be loaded ({type(err).__name__}); it may be "
                              f"truncated: load an earlier iteration or start without --load") from None


def _load_legacy(path: str, model, optimizer, params_in_optimizer_order, scheduler, schedule_check=None,
                 trust_checkpoint_code: bool = False) -> dict:
    """This rank's `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`: model by checkpoint key, Adam's
    state and float32 masters by parameter name, scheduler, progress."""
    state, file, localize = _load_legacy_model(path, model, trust_checkpoint_code)
    _check_schedule(schedule_check, state.get("opt_param_scheduler"), path)
    if "optimizer" in state:
        tied_source = state.get("tied_from_first_stage", {}).get("optimizer")
        _load_legacy_optimizer(file, state["optimizer"], optimizer, params_in_optimizer_order,
                               model.sharded_state_dict(metadata=model_metadata()), localize, tied_source)
    else:
        _without_optimizer_state(path, optimizer, params_in_optimizer_order)
    if state.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    return {"iteration": state["iteration"],
            "consumed_train_samples": getattr(state["args"], "consumed_train_samples", 0)}


def _optimizer_by_name(saved: dict) -> tuple[dict, dict]:
    """(Adam state dict, {parameter name: (its Adam state, its float32 master or None)}) of a legacy
    file's `optimizer` entry."""
    from megatron_switch.checkpoint.legacy import optimizer_parts

    adam, saved_masters = optimizer_parts(saved)
    by_name = {}
    for g, group in enumerate(adam["param_groups"]):
        for j, (index, name) in enumerate(zip(group["params"], group["param_names"])):
            master = saved_masters[g][j] if saved_masters is not None else None
            by_name[name] = (adam["state"].get(index), master)
    return adam, by_name


def _load_legacy_optimizer(file, saved, optimizer, params_in_optimizer_order, model_sharded, localize,
                           tied_source=None) -> None:
    """Adam's state and masters by parameter name; `tied_source`: the first stage's optimizer entry,
    for the tied embedding copy of a later stage (it shares the embedding's state)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map as id_map_of,
    )

    adam, by_name = _optimizer_by_name(saved)
    if tied_source is not None and TIED_EMBEDDING not in by_name:
        by_name[TIED_EMBEDDING] = _optimizer_by_name(tied_source)[1].get(TIED_EMBEDDING, (None, None))
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
