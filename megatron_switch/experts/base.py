"""The expert-bank contract: what the Switch layer, checkpoints and weight interchange may use.

A bank holds E_l = E / EP consecutive experts of a Switch layer (global indices first_expert ..
first_expert + E_l - 1), each a two-layer FFN in the nn.Linear layout:
  weight1 [f', h] (f' = 2f for gated activations: [gate; up] halves, as in Megatron), bias1 [f'],
  weight2 [h, f], bias2 [h] (biases only with `switch.expert_bias`).
Every backend implements:
  forward(x, tokens_per_expert=None)   padded: x [E_l, N, h] -> [E_l, N, h] (every expert N slots);
                                       grouped: x [N, h] sorted by local expert, `tokens_per_expert`
                                       rows each -> [N, h] (only the kept tokens)
  reset_parameters(layer_number)       the layout-independent initialisation (`draw`)
  sharded_state_dict(prefix, sharded_offsets, ep_rank, ep_size, replica_id)
                                       the bank under the global keys `linear_fc1.weight`,
                                       `linear_fc1.bias`, `linear_fc2.weight`, `linear_fc2.bias`, each
                                       an [E, ...] tensor sharded over expert parallelism (so a
                                       checkpoint reshards across EP and moves between backends)
  expert_weights(local) / load_expert_weights(local, weights)
                                       one expert's tensors by the names above (weight1, ...), read
                                       as copies and written in place (Hugging Face interchange,
                                       upcycling)
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Mapping
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.config import SwitchConfig
from megatron_switch.initialization import seeded_generator, truncated_normal_

# bank tensor -> its checkpoint key (under the layer's `experts.` prefix), as megatron-core names grouped experts
CHECKPOINT_KEYS = {"weight1": "linear_fc1.weight", "bias1": "linear_fc1.bias",
                   "weight2": "linear_fc2.weight", "bias2": "linear_fc2.bias"}
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "geglu": F.gelu, "swiglu": F.silu,
                "geglu_tanh": functools.partial(F.gelu, approximate="tanh")}


def expert_activation(h: torch.Tensor, switch: SwitchConfig, training: bool) -> torch.Tensor:
    """[..., f'] -> [..., f]: the expert nonlinearity (gated: act(gate) * up), then expert dropout."""
    activation = _ACTIVATIONS[switch.activation]
    if switch.gated:
        gate, up = torch.chunk(h, 2, dim=-1)
        h = activation(gate) * up
    else:
        h = activation(h)
    if switch.expert_dropout and training:  # (F.dropout with p = 0 still costs a pass over h)
        h = F.dropout(h, p=switch.expert_dropout, training=True)
    return h


def expert_ffn_size(config: TransformerConfig, switch: SwitchConfig) -> int:
    return switch.expert_ffn_hidden_size or config.ffn_hidden_size


class ExpertBank(MegatronModule, abc.ABC):
    """The contract above, and what every backend shares: the bank's place among the experts, its
    widths, the activation, and the layout-independent draw of expert e's weights."""

    def __init__(self, config: TransformerConfig, switch: SwitchConfig, num_local_experts: int,
                 first_expert: int):
        super().__init__(config=config)
        self.switch = switch
        self.num_local_experts = num_local_experts
        self.first_expert = first_expert
        self.ffn = expert_ffn_size(config, switch)
        self.fc1_out = 2 * self.ffn if switch.gated else self.ffn

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, tokens_per_expert: Optional[List[int]] = None) -> torch.Tensor:
        """Padded [E_l, N, h] (tokens_per_expert None) or grouped [N, h] -> the same shape."""

    @abc.abstractmethod
    def reset_parameters(self, layer_number: int) -> None:
        """Draw every expert's weights for layer `layer_number` (the same for any layout)."""

    @abc.abstractmethod
    def _expert_parameters(self, local: int) -> Dict[str, torch.nn.Parameter]:
        """Local expert `local`'s parameters (or views of them) by bank name: weight1, weight2, bias1, bias2."""

    @abc.abstractmethod
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), ep_rank: int = 0, ep_size: int = 1,
                           replica_id=(0, 0, 0)) -> dict:
        """The bank's ShardedTensors under CHECKPOINT_KEYS (with `prefix`), global expert axis first."""

    def expert_weights(self, local: int) -> Dict[str, torch.Tensor]:
        """Copies of local expert `local`'s tensors by bank name (weight1 [f', h], ...)."""
        return {name: param.detach().clone() for name, param in self._expert_parameters(local).items()}

    def load_expert_weights(self, local: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Write `weights` (bank names, this expert's shapes) into local expert `local`, in place.
        A bank name missing from `weights` keeps its value; an unknown one or a wrong shape is refused."""
        targets = self._expert_parameters(local)
        unknown = sorted(set(weights) - set(targets))
        if unknown:
            raise KeyError(f"expert bank has no {', '.join(unknown)} (it holds {', '.join(sorted(targets))})")
        with torch.no_grad():
            for name, value in weights.items():
                if tuple(value.shape) != tuple(targets[name].shape):
                    raise ValueError(f"expert {self.first_expert + local} {name}: shape {tuple(value.shape)}, the "
                                     f"bank needs {tuple(targets[name].shape)}")
                targets[name].copy_(value)

    def _ffn_tail(self, h: torch.Tensor) -> torch.Tensor:
        return expert_activation(h, self.switch, self.training)

    def draw(self, weight: torch.Tensor, layer_number: int, tensor_id: int, local: int) -> None:
        """Expert (first_expert + local) of layer L draws the same weights whatever the layout."""
        generator = seeded_generator(self.switch.init_seed, layer_number, tensor_id, self.first_expert + local)
        truncated_normal_(weight, self.switch.init_scale, generator=generator)
