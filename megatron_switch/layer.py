"""SwitchMLP: router -> dispatch -> experts -> combine, as the `mlp` of a Megatron TransformerLayer.

`forward(hidden [s, b, h]) -> (output [s, b, h], None)`, the signature of Megatron's MLP, so the
layer drops into any TransformerLayer spec and works through pipeline stages. The load-balancing
and z losses reach the gradient through Megatron's `MoEAuxLossAutoScaler`, attached to the output;
per-layer statistics of the last forward are in `layer.last_stats`.

Tensor parallelism: without sequence parallelism every TP rank holds the same [s, b, h]; each routes
and sends its 1/TP share of the sequence, and the outputs are all-gathered, so no expert work is
duplicated. With sequence parallelism the tokens arrive already sharded. Either way the routing
group is the whole micro-batch (see router.py).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.comm import Group, gather_rows, group_rank, group_size, scatter_rows
from megatron_switch.config import SwitchConfig, SwitchConfigError
from megatron_switch.dispatch import CapacityDispatcher, GroupedDispatcher, gather_scale
from megatron_switch.experts import build_experts
from megatron_switch.router import SwitchRouter


@dataclasses.dataclass(frozen=True)
class SwitchStats:
    """One Switch layer's routing statistics from its last forward (detached).

    aux_loss, z_loss: with coefficients applied. dropped_fraction: share of the routing group's
    tokens that found no slot. tokens_per_expert: [E] argmax counts over the routing group (finite
    tokens). nonfinite_tokens: tokens quarantined for a non-finite input (None: there were none).
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_fraction: torch.Tensor
    tokens_per_expert: torch.Tensor
    nonfinite_tokens: Optional[torch.Tensor] = None  # quarantined (non-finite input) tokens of the group


FROM_PARALLEL_STATE = object()  # default: take the group from megatron.core.parallel_state


def _default_group(getter_name: str, size_name: str) -> Group:
    if not parallel_state.model_parallel_is_initialized():
        return None
    if getattr(parallel_state, size_name)() == 1:
        return None
    return getattr(parallel_state, getter_name)()


def _multi_rank(group) -> Group:
    """A process group of more than one rank, else None (a single rank needs no communication)."""
    return group if group is not None and group_size(group) > 1 else None


class SwitchMLP(MegatronModule):
    """A bank of E experts with top-1 routing; E / EP of them live on this rank.

    ep_group / tp_group: process groups (None: a single rank); by default those of `pg_collection`
    (megatron-core >= 0.17 passes its ProcessGroupCollection to every MLP it builds), else Megatron's
    expert-parallel and tensor-parallel groups when megatron.core.parallel_state is initialised.
    is_mtp_layer, name: passed by megatron-core >= 0.19 to every MLP it builds (whether the layer
    is a multi-token-prediction layer; the module's dotted name); a Switch layer routes the same way.
    """

    def __init__(self, config: TransformerConfig, submodules=None, switch: Optional[SwitchConfig] = None,
                 layer_number: int = 1, ep_group=FROM_PARALLEL_STATE, tp_group=FROM_PARALLEL_STATE,
                 pg_collection=None, is_mtp_layer: bool = False, name: Optional[str] = None):
        super().__init__(config=config)
        if switch is None:
            raise SwitchConfigError("SwitchMLP needs a SwitchConfig: build the spec with "
                                    "get_switch_gpt_layer_spec(config, switch_config)")
        self.switch = switch
        if pg_collection is not None:
            ep_group = _multi_rank(getattr(pg_collection, "ep", None)) if ep_group is FROM_PARALLEL_STATE else ep_group
            tp_group = _multi_rank(getattr(pg_collection, "tp", None)) if tp_group is FROM_PARALLEL_STATE else tp_group
        self.ep_group = (_default_group("get_expert_model_parallel_group",
                                        "get_expert_model_parallel_world_size")
                         if ep_group is FROM_PARALLEL_STATE else ep_group)
        self.tp_group = (_default_group("get_tensor_model_parallel_group",
                                        "get_tensor_model_parallel_world_size")
                         if tp_group is FROM_PARALLEL_STATE else tp_group)
        ep = group_size(self.ep_group)
        if switch.num_experts % ep:
            raise SwitchConfigError(
                f"--num-experts {switch.num_experts} is not divisible by the expert-parallel size {ep}")
        num_local = switch.num_experts // ep
        self.layer_number = layer_number
        self.router = SwitchRouter(config, switch, layer_number)
        self.experts = build_experts(config, switch, num_local, group_rank(self.ep_group) * num_local,
                                     layer_number)
        self.capacity_dispatcher = CapacityDispatcher(switch.num_experts, self.ep_group)
        self.grouped_dispatcher = GroupedDispatcher(switch.num_experts, self.ep_group)
        self.last_stats: Optional[SwitchStats] = None

    def set_layer_number(self, layer_number: int) -> None:
        """Called by TransformerLayer; re-draws the layout-independent init for that layer number."""
        if layer_number != self.layer_number:
            self.layer_number = layer_number
            self.router.reset_parameters(layer_number)
            self.experts.reset_parameters(layer_number)

    # Checkpoint keys of the expert bank (global expert axis first), as megatron-core's grouped
    # experts name them, so a checkpoint reshards across EP/TP/PP and moves between backends.
    EXPERT_KEYS = {"weight1": "linear_fc1.weight", "bias1": "linear_fc1.bias",
                   "weight2": "linear_fc2.weight", "bias2": "linear_fc2.bias"}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Router: replicated. Experts: [E, ...] tensors sharded over EP, replicated over expert-DP."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = make_sharded_tensors_for_checkpoint(
            {"router.weight": self.router.weight}, prefix, sharded_offsets=sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        ep_rank, ep = group_rank(self.ep_group), group_size(self.ep_group)
        replica_id = (0, 0, parallel_state.get_expert_data_parallel_rank())
        axis = len(sharded_offsets)
        per_expert = getattr(self.experts, "checkpoint_parameters", None)
        for name, key in self.EXPERT_KEYS.items():
            full_key = f"{prefix}experts.{key}"
            if per_expert is None:  # the torch bank: one [E_l, ...] block of the [E, ...] tensor
                param = getattr(self.experts, name)
                if param is not None:
                    state[full_key] = ShardedTensor.from_rank_offsets(
                        full_key, param, *sharded_offsets, (axis, ep_rank, ep),
                        replica_id=replica_id, prepend_axis_num=axis)
                continue
            # A bank holding one parameter per expert (Transformer Engine): one [1, ...] block each,
            # under the bank's own parameter name, at the expert's global index.
            for local_name, param, local in per_expert(name):
                state[f"{prefix}experts.{local_name}"] = ShardedTensor.from_rank_offsets(
                    full_key, param, *sharded_offsets, (axis, self.experts.first_expert + local,
                                                        self.switch.num_experts),
                    replica_id=replica_id, prepend_axis_num=axis + 1)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept the checkpoint key names for the expert bank (see EXPERT_KEYS).
        for name, key in self.EXPERT_KEYS.items():
            if f"{prefix}experts.{key}" in state_dict:
                state_dict[f"{prefix}experts.{name}"] = state_dict.pop(f"{prefix}experts.{key}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def token_group(self) -> Group:
        """Ranks sharing one micro-batch's tokens: the TP group when TP > 1."""
        return self.tp_group

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **unused) -> Tuple[torch.Tensor, None]:
        """[s, b, h] (the local sequence shard under sequence parallelism) -> ([s, b, h], None)."""
        shard_tokens = group_size(self.tp_group) > 1 and not self.config.sequence_parallel
        x = scatter_rows(hidden_states, self.tp_group) if shard_tokens else hidden_states
        x_Th = x.reshape(-1, x.shape[-1])

        routing = self.router(x_Th, self.token_group)
        # Static shapes ([E_l, EP * C, h], a batched GEMM over every slot) when padding to capacity
        # and each rank is its own routing group; else exactly the kept tokens move and are computed.
        padded = (routing.capacity is not None and group_size(self.token_group) == 1
                  and self.switch.pads_to_capacity(x_Th.device.type))
        dispatcher = self.capacity_dispatcher if padded else self.grouped_dispatcher
        expert_in, meta = dispatcher.dispatch(x_Th, routing)
        expert_out = (self.experts.forward_padded(expert_in) if meta.tokens_per_local_expert is None
                      else self.experts.forward_grouped(expert_in, meta.tokens_per_local_expert))
        rows = dispatcher.combine(expert_out, meta)
        y_Th = gather_scale(rows, meta.token_rows, routing.gate * routing.kept)

        aux_loss = routing.aux_loss + routing.z_loss
        y = y_Th.view_as(x)
        if self.training and aux_loss.requires_grad:
            y = MoEAuxLossAutoScaler.apply(y, aux_loss)
        if shard_tokens:
            y = gather_rows(y, self.tp_group)

        self.last_stats = SwitchStats(
            aux_loss=routing.aux_loss.detach(), z_loss=routing.z_loss.detach(),
            dropped_fraction=routing.num_dropped.detach().float() / routing.num_group_tokens,
            tokens_per_expert=routing.tokens_per_expert.detach(), nonfinite_tokens=routing.num_nonfinite)
        return y, None


def switch_stats(model: torch.nn.Module) -> Dict[int, SwitchStats]:
    """The last forward's statistics of every Switch layer in `model`, keyed by layer number."""
    return {m.layer_number: m.last_stats for m in model.modules()
            if isinstance(m, SwitchMLP) and m.last_stats is not None}
