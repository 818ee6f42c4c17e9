"""Hugging Face `SwitchTransformersSparseMLP` weights <-> a `SwitchMLP`.

Hugging Face keys (per MoE block, under any prefix):
  router.classifier.weight            [E, h]
  experts.expert_{i}.wi.weight        [f, h]        (ReLU/GELU experts)
  experts.expert_{i}.wi_0.weight, .wi_1.weight      (gated experts: act(wi_0 x) * wi_1 x)
  experts.expert_{i}.wo.weight        [h, f]
Hugging Face experts have no biases: importing zeroes ours, exporting refuses non-zero ones.
Under expert parallelism each rank imports or exports its own experts (global indices).
`read_huggingface_weights` reads a model folder's tensors: safetensors, or `pytorch_model*.bin`
through `safe_pickle` (tensors only): a crafted .bin runs no code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from megatron_switch.layer import SwitchMLP


class WeightMappingError(ValueError):
    """Weights that do not fit the layer; the message names the key and the shapes."""


_INDEX = "{}.index.json"


def _weight_files(folder: str, single: str) -> list[str] | None:
    """`single` in `folder`, or the shards its index names; None when neither is there."""
    if os.path.isfile(os.path.join(folder, single)):
        return [os.path.join(folder, single)]
    index = os.path.join(folder, _INDEX.format(single))
    if not os.path.isfile(index):
        return None
    try:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightMappingError(f"{index} is not a weight index ({type(err).__name__}: {err})") from None
    if any(os.path.basename(s) != s for s in shards):
        raise WeightMappingError(f"{index} names files outside its folder")
    return [os.path.join(folder, s) for s in shards]


def read_huggingface_weights(folder: str, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder: `model.safetensors` (or the shards of its index),
    else `pytorch_model.bin` (or its shards), each .bin read allowed tensors only (any pickle with
    `trusted`: a crafted file then runs code). Raises CheckpointCodeError for a .bin naming anything else."""
    from safetensors.torch import load_file

    from megatron_switch.checkpoint.safe_pickle import load_weights

    state: dict[str, torch.Tensor] = {}
    files = _weight_files(folder, "model.safetensors")
    if files is not None:
        for file in files:
            state.update(load_file(file))
        return state
    files = _weight_files(folder, "pytorch_model.bin")
    if files is None:
        raise WeightMappingError(f"{folder}: no model.safetensors, pytorch_model.bin or index of either")
    for file in files:
        state.update(load_weights(file, trusted=trusted))
    return state


def _take(state: Mapping[str, torch.Tensor], key: str, shape) -> torch.Tensor:
    if key not in state:
        raise WeightMappingError(f"missing key {key!r} in the Hugging Face state dict")
    tensor = state[key]
    if tuple(tensor.shape) != tuple(shape):
        raise WeightMappingError(f"{key}: shape {tuple(tensor.shape)}, the Switch layer needs {tuple(shape)}")
    return tensor


def import_huggingface_sparse_mlp(layer: SwitchMLP, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy a Hugging Face MoE block's router and this rank's experts into `layer` (any bank type:
    through the bank's `load_expert_weights`)."""
    experts, switch = layer.experts, layer.switch
    hidden, ffn = layer.router.weight.shape[1], experts.ffn
    with torch.no_grad():
        layer.router.weight.copy_(_take(state, f"{prefix}router.classifier.weight", (switch.num_experts, hidden)))
    for local in range(experts.num_local_experts):
        base = f"{prefix}experts.expert_{experts.first_expert + local}."
        if switch.gated:
            w1 = torch.cat([_take(state, base + "wi_0.weight", (ffn, hidden)),
                            _take(state, base + "wi_1.weight", (ffn, hidden))])
        else:
            w1 = _take(state, base + "wi.weight", (ffn, hidden))
        weights = {"weight1": w1, "weight2": _take(state, base + "wo.weight", (hidden, ffn))}
        if switch.expert_bias:
            weights.update(bias1=torch.zeros(experts.fc1_out), bias2=torch.zeros(hidden))
        experts.load_expert_weights(local, weights)


def export_huggingface_sparse_mlp(layer: SwitchMLP, prefix: str = "") -> dict[str, torch.Tensor]:
    """This rank's part of `layer` under Hugging Face's keys (the router on every rank)."""
    experts, switch = layer.experts, layer.switch
    state = {f"{prefix}router.classifier.weight": layer.router.weight.detach().clone()}
    for local in range(experts.num_local_experts):
        weights = experts.expert_weights(local)
        for name in ("bias1", "bias2"):
            if name in weights and torch.count_nonzero(weights[name]):
                raise WeightMappingError("Hugging Face Switch experts have no biases, and this layer's are "
                                         "non-zero: train with --switch-no-expert-bias to export")
        base = f"{prefix}experts.expert_{experts.first_expert + local}."
        if switch.gated:
            state[base + "wi_0.weight"], state[base + "wi_1.weight"] = weights["weight1"].chunk(2)
        else:
            state[base + "wi.weight"] = weights["weight1"]
        state[base + "wo.weight"] = weights["weight2"]
    return state
