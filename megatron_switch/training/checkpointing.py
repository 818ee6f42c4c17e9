"""Live checkpoints of a training run through megatron's dist_checkpointing (torch_dist), saved
atomically and verified on load; loads also read Megatron's legacy per-rank files
(`training.legacy_load`). The on-disk layout (iteration directories, tracker, format detection) is
`checkpoint.layout`'s; the optimizer's sharded state is `training.optimizer_state`'s.

A save goes to `iter_0000100.tmp/` first; only a complete save (with its integrity.json: a checksum
of every byte range and the writer's identity) is renamed into place, and only then does the tracker
(itself replaced atomically) point at it, so a killed save never becomes the latest.

Contents: the model's sharded state (global expert axis, so it reshards across TP/PP/EP), the
optimizer's state (`OptimizerPieces`), the LR scheduler, the iteration and consumed samples, the
model shape and layout (for `megatron-switch convert`), and each rank's RNG states (restored when
the world size is unchanged).

Loading verifies the recorded checksums, then detects the format of the iteration directory, as
Megatron-LM does: torch_dist (any layout: it reshards) or legacy `mp_rank_*` files (the layout they
were written for). A checkpoint without optimizer state (`convert --no-optim`) restores the model and
scheduler; Adam starts from zero. Every pickle a load reads goes through `checkpoint.safe_pickle`'s
allow-list unless `trust_checkpoint_code` (`--trust-checkpoint-code`).
"""

from __future__ import annotations

import os
import random
import shutil

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
from megatron_switch.checkpoint.sharding import model_metadata
from megatron_switch.training.faults import fault_point
from megatron_switch.training.legacy_load import load_legacy_model, load_legacy_optimizer
from megatron_switch.training.optimizer_state import (
    OptimizerPieces,
    init_optimizer_state,
    load_optimizer_state,
    optimizer_sharded_state,
    optimizer_step,
    without_optimizer_state,
)

# Common entries a run keeps from the checkpoint it loaded, in every checkpoint it saves: the
# Hugging Face config of an imported model (`convert --to-hf` exports with it).
CARRIED_COMMON = ("huggingface_config",)


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


def _state(model, pieces: OptimizerPieces, scheduler, common: dict, with_optimizer: bool = True,
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
        state["optimizer"] = optimizer_sharded_state(pieces, model_sharded)
        state["optimizer_step"] = optimizer_step(pieces.optimizer)
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


def save_checkpoint(root: str, iteration: int, model, pieces: OptimizerPieces, scheduler, common: dict,
                    writer: dict | None = None) -> str:
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
        init_optimizer_state(pieces.optimizer)
        state = _state(model, pieces, scheduler, common)
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


def load_checkpoint(root: str, model, pieces: OptimizerPieces, scheduler, step: int | None = None,
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
    init_optimizer_state(pieces.optimizer)
    if checkpoint_format(path) == "torch":
        return _load_legacy(path, model, pieces, scheduler, schedule_check, trust_checkpoint_code)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megatron_switch.checkpoint.distcp import load_dist_checkpoint, read_common_state

    try:
        common = read_common_state(path, trusted=trust_checkpoint_code)
    except CheckpointError:  # a file outside the checkpoint, a global off the allow-list, sizes: named there
        raise
    except Exception as err:  # noqa: BLE001  (pickle, zip and I/O raise several types)
        raise CheckpointError(f"checkpoint {path}: its common state cannot be read ({type(err).__name__}); it may "
                              f"be truncated: load an earlier iteration (--ckpt-step N) or start without --load"
                              ) from None
    check_same_model(path, common.get("model_config") or {}, model, trust_checkpoint_code)
    try:
        template = _state(model, pieces, scheduler, {},
                          with_optimizer="optimizer" in common,
                          with_rng=common.get("world_size") == dist.get_world_size())
        loaded = load_dist_checkpoint(template, path, trusted=trust_checkpoint_code)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001  (several types; say which checkpoint and why)
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {reason}); "
                              f"it may be truncated or from another model: load an earlier iteration "
                              f"or start without --load") from None
    _check_schedule(schedule_check, loaded.get("scheduler"), path)
    model.load_state_dict(loaded["model"])
    if "optimizer" in loaded:
        load_optimizer_state(pieces, loaded["optimizer"], loaded["optimizer_step"])
    else:
        without_optimizer_state(path, pieces)
    if "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    elif dist.get_rank() == 0:
        print(f" checkpoint {path} has no learning-rate schedule state (an imported model): the schedule "
              f"starts at its first step", flush=True)
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
        return int(load_legacy_model(path, model, trust_checkpoint_code).state["iteration"])
    from megatron_switch.checkpoint.distcp import load_dist_checkpoint, read_common_state

    common = read_common_state(path, trusted=trust_checkpoint_code)
    loaded = load_dist_checkpoint({"model": model.sharded_state_dict(metadata=model_metadata())}, path,
                                  trusted=trust_checkpoint_code)
    model.load_state_dict(loaded["model"])
    return int(common["iteration"])


def _load_legacy(path: str, model, pieces: OptimizerPieces, scheduler, schedule_check=None,
                 trust_checkpoint_code: bool = False) -> dict:
    """This rank's `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt` into the model, optimizer and
    scheduler; returns the progress it records."""
    legacy = load_legacy_model(path, model, trust_checkpoint_code)
    _check_schedule(schedule_check, legacy.state.get("opt_param_scheduler"), path)
    if "optimizer" in legacy.state:
        load_legacy_optimizer(legacy, pieces, model.sharded_state_dict(metadata=model_metadata()))
    else:
        without_optimizer_state(path, pieces)
    if legacy.state.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(legacy.state["opt_param_scheduler"])
    return {"iteration": legacy.state["iteration"],
            "consumed_train_samples": getattr(legacy.state["args"], "consumed_train_samples", 0)}
