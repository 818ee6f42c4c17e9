"""Hugging Face `SwitchTransformersSparseMLP` weights <-> a `SwitchMLP`.

Hugging Face keys (per MoE block, under any prefix):
  router.classifier.weight            [E, h]
  experts.expert_{i}.wi.weight        [f, h]        (ReLU/GELU experts)
  experts.expert_{i}.wi_0.weight, .wi_1.weight      (gated experts: act(wi_0 x) * wi_1 x)
  experts.expert_{i}.wo.weight        [h, f]
Hugging Face experts have no biases: importing zeroes ours, exporting refuses non-zero ones.
Under expert parallelism each rank imports or exports its own experts (global indices).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_switch.layer import SwitchMLP


class WeightMappingError(ValueError):
    """Weights that do not fit the layer; the message names the key and the shapes."""


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
