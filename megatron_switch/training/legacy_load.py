"""Megatron-LM's legacy per-rank files (`iter_N/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`, as
`megatron-switch convert --format torch` writes them) into a live run at the layout they were written
for: the model by checkpoint key, Adam's state and float32 masters by parameter name.

Every pickle is read through `checkpoint.safe_pickle`'s allow-list unless `trust_checkpoint_code`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from megatron_switch.checkpoint.layout import CheckpointError, inside
from megatron_switch.checkpoint.sharding import local_name, model_metadata
from megatron_switch.training.optimizer_state import OptimizerPieces
from megatron_switch.training.ownership import piece_of

TIED_EMBEDDING = "embedding.word_embeddings.weight"


@dataclasses.dataclass
class LegacyFile:
    """This rank's file after its model weights were copied into the model: its contents, its
    name, and `localize` (a global checkpoint key -> the key this file holds it under)."""

    state: dict
    file: str
    localize: Callable[[str], str]


def load_legacy_model(path: str, model, trust_checkpoint_code: bool = False) -> LegacyFile:
    """Copy this rank's legacy file of iteration directory `path` into `model`."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_switch.checkpoint.legacy import layout_of_args, rank_file
    from megatron_switch.parallel import Layout

    layout = Layout(parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size(),
                    parallel_state.get_expert_model_parallel_world_size())
    coord = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
             parallel_state.get_expert_model_parallel_rank())
    file = rank_file(path, layout, coord)
    state = read_legacy_file(path, file, layout, trust_checkpoint_code)
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
                    first_stage = first_stage or read_legacy_file(path, rank_file(path, layout, (coord[0], 0,
                                                                                                  coord[2])), layout,
                                                              trust_checkpoint_code)
                    value = first_stage["model"].get(TIED_EMBEDDING)
                    state["tied_from_first_stage"] = first_stage
            if value is None or tuple(value.shape) != tuple(sharded.data.shape):
                found = "missing" if value is None else f"shape {tuple(value.shape)}"
                raise CheckpointError(f"{file}: {localize(sharded.key)} is {found}, the model needs "
                                      f"{tuple(sharded.data.shape)}: the checkpoint is from another model or layout")
            sharded.data.copy_(value)
    return LegacyFile(state, file, localize)


def read_legacy_file(path: str, file: str, layout, trust_checkpoint_code: bool = False) -> dict:
    """Rank file `file` of iteration directory `path` (a file inside it), through the allow-list."""
    from megatron_switch.checkpoint.safe_pickle import load

    try:
        return load(inside(path, os.path.relpath(file, path), f"{path}: the rank file"),
                    trusted=trust_checkpoint_code)
    except FileNotFoundError:
        raise CheckpointError(f"legacy checkpoint {path}: no {os.path.relpath(file, path)} for this rank at "
                              f"{layout}; convert it to this layout with `megatron-switch convert "
                              f"--target-tp {layout.tp} --target-pp {layout.pp} --target-ep {layout.ep}`") from None
    except CheckpointError:  # outside the folder, refused by the allow-list or the archive's sizes: named there
        raise
    except Exception as err:  # noqa: BLE001  (zip and pickle raise several types)
        raise CheckpointError(f"checkpoint file {file} cannot be loaded ({type(err).__name__}); it may be "
                              f"truncated: load an earlier iteration or start without --load") from None


def load_legacy_optimizer(legacy: LegacyFile, pieces: OptimizerPieces, model_sharded: dict) -> None:
    """Adam's state and masters by parameter name; for the tied embedding copy of a later stage, the
    first stage's optimizer entry (it shares the embedding's state)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map as id_map_of,
    )

    file, localize = legacy.file, legacy.localize
    tied_source = legacy.state.get("tied_from_first_stage", {}).get("optimizer")
    adam, by_name = _optimizer_by_name(legacy.state["optimizer"])
    if tied_source is not None and TIED_EMBEDDING not in by_name:
        by_name[TIED_EMBEDDING] = _optimizer_by_name(tied_source)[1].get(TIED_EMBEDDING, (None, None))
    id_map = id_map_of(model_sharded, pieces.params)
    optimizer = pieces.optimizer
    current = optimizer.state_dict()
    with torch.no_grad():
        for index, (master, param, piece) in enumerate(zip(pieces.masters, pieces.params, pieces.pieces)):
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
