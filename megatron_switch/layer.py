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
from typing import Callable, Dict, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.config import SwitchConfig, SwitchConfigError
from megatron_switch.dispatch import CapacityDispatcher, GroupedDispatcher, gather_scale
from megatron_switch.experts import build_experts
from megatron_switch.ops.collectives import Group, gather_rows, group_rank, group_size, scatter_rows
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


def _multi_rank(group) -> Group:
    """A process group of more than one rank, else None (a single rank needs no communication)."""
    return group if group is not None and group_size(group) > 1 else None


@dataclasses.dataclass(frozen=True)
class SwitchGroups:
    """The process groups one Switch layer uses, resolved once when it is built; forward and
    checkpointing both read them. None stands for a single rank.

    tp: the ranks sharing one micro-batch's tokens (the routing group under tensor parallelism).
    ep: the expert-parallel group (experts are split over it).
    expert_dp: the experts' replicas (their checkpoint replica id).
    dp_cp: the router's replicas over data (and context) parallelism (its checkpoint replica id).
    """

    tp: Group = None
    ep: Group = None
    expert_dp: Group = None
    dp_cp: Group = None

    @classmethod
    def resolve(cls, pg_collection=None, ep_group=FROM_PARALLEL_STATE,
                tp_group=FROM_PARALLEL_STATE) -> "SwitchGroups":
        """Explicit groups win; then megatron-core's `pg_collection` (megatron-core >= 0.17 passes one to
        every MLP it builds); then `megatron.core.parallel_state` when it is initialised; else single ranks."""
        def pick(explicit, collection_name: str, getter):
            if explicit is not FROM_PARALLEL_STATE:
                return explicit
            if pg_collection is not None and getattr(pg_collection, collection_name, None) is not None:
                return _multi_rank(getattr(pg_collection, collection_name))
            if parallel_state.model_parallel_is_initialized():
                return _multi_rank(getter())
            return None

        return cls(
            tp=pick(tp_group, "tp", parallel_state.get_tensor_model_parallel_group),
            ep=pick(ep_group, "ep", parallel_state.get_expert_model_parallel_group),
            expert_dp=pick(FROM_PARALLEL_STATE, "expt_dp", parallel_state.get_expert_data_parallel_group),
            dp_cp=pick(FROM_PARALLEL_STATE, "dp_cp",
                       lambda: parallel_state.get_data_parallel_group(with_context_parallel=True)))


class SwitchMLP(MegatronModule):
    """A bank of E experts with top-1 routing; E / EP of them live on this rank.

    ep_group / tp_group: process groups (None: a single rank); by default those of `pg_collection`,
    else Megatron's when megatron.core.parallel_state is initialised (`SwitchGroups.resolve`).
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
        self.groups = SwitchGroups.resolve(pg_collection, ep_group, tp_group)
        ep = group_size(self.groups.ep)
        if switch.num_experts % ep:
            raise SwitchConfigError(
                f"--num-experts {switch.num_experts} is not divisible by the expert-parallel size {ep}")
        num_local = switch.num_experts // ep
        self.layer_number = layer_number
        self.router = SwitchRouter(config, switch, layer_number)
        self.experts = build_experts(config, switch, num_local, group_rank(self.groups.ep) * num_local,
                                     layer_number)
        self.capacity_dispatcher = CapacityDispatcher(switch.num_experts, self.groups.ep)
        self.grouped_dispatcher = GroupedDispatcher(switch.num_experts, self.groups.ep)
        self.last_stats: Optional[SwitchStats] = None

    @property
    def ep_group(self) -> Group:
        return self.groups.ep

    @property
    def tp_group(self) -> Group:
        return self.groups.tp

    def set_layer_number(self, layer_number: int) -> None:
        """Called by TransformerLayer; re-draws the layout-independent init for that layer number."""
        if layer_number != self.layer_number:
            self.layer_number = layer_number
            self.router.reset_parameters(layer_number)
            self.experts.reset_parameters(layer_number)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Router: replicated over TP and data parallelism. Experts: the bank's [E, ...] tensors,
        sharded over EP and replicated over expert-data parallelism (see experts.base)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        g = self.groups
        state = {f"{prefix}router.weight": ShardedTensor.from_rank_offsets(
            f"{prefix}router.weight", self.router.weight, *sharded_offsets,
            replica_id=(0, group_rank(g.tp), group_rank(g.dp_cp)), prepend_axis_num=len(sharded_offsets))}
        state.update(self.experts.sharded_state_dict(
            f"{prefix}experts.", sharded_offsets, group_rank(g.ep), group_size(g.ep),
            replica_id=(0, 0, group_rank(g.expert_dp))))
        return state

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
        rows = dispatcher.combine(self.experts(expert_in, meta.tokens_per_expert), meta)
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


def on_training_stats(layer: SwitchMLP, callback: Callable[[SwitchMLP, SwitchStats], None]
                      ) -> torch.utils.hooks.RemovableHandle:
    """Call `callback(layer, stats)` after every forward of `layer` that counts for training
    statistics: training mode with autograd on. Evaluation forwards and the no-grad first pass of
    full activation recomputation are left out, so each micro-batch counts once. The one hook the
    trainer's report and Megatron-LM's MoE log both use."""
    def hook(module, inputs, output):
        if module.training and torch.is_grad_enabled() and module.last_stats is not None:
            callback(module, module.last_stats)

    return layer.register_forward_hook(hook)
