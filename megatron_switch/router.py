"""SwitchRouter: float32 gate, jitter, top-1, capacity slots, load-balancing and z losses.

The routing math is a set of pure functions with the formula in the docstring; the module
only holds the float32 weight and glues them together.

Shapes: T tokens on this rank, E experts, h hidden size. A *routing group* is the tokens of one
micro-batch; when tensor or sequence parallelism splits those tokens over a `token_group`, each
rank routes its contiguous share of the flattened [s, b] order, and slots, load fractions and
losses are still computed over the whole group, so any layout routes exactly as one process.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.comm import Group, all_gather_no_grad, group_rank, group_size, sum_backward, sum_forward
from megatron_switch.config import SwitchConfig
from megatron_switch.initialization import seeded_generator, truncated_normal_

ROUTER_WEIGHT_KEY = 0  # tensor id for seeded_generator


def queue_positions(expert_T: torch.Tensor, gate_T: torch.Tensor, num_experts: int,
                    policy: str = "position") -> torch.Tensor:
    """Each token's place in its expert's queue (0 is served first).

    policy "position": first come, first served in token order (earlier tokens win).
    policy "probs": higher gate first, ties broken by token order.
    A token is kept when its position < capacity. Uses sorts, never a [T, E] tensor.
    """
    if policy == "probs":
        order = torch.argsort(gate_T, descending=True, stable=True)
        order = order[torch.argsort(expert_T[order], stable=True)]
    else:
        order = torch.argsort(expert_T, stable=True)
    counts_E = torch.bincount(expert_T, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_experts = expert_T[order]
    rank_in_sorted = torch.arange(expert_T.numel(), device=expert_T.device)
    positions = torch.empty_like(expert_T)
    positions[order] = rank_in_sorted - starts_E[sorted_experts]
    return positions


def load_balancing_loss(tokens_per_expert_E: torch.Tensor, prob_sum_E: torch.Tensor,
                        num_tokens: int, coeff: float) -> torch.Tensor:
    """alpha * E * sum_i f_i * P_i (paper eq. 4).

    f_i = tokens_per_expert[i] / T: fraction of tokens whose argmax is i (before dropping).
    P_i = prob_sum[i] / T: mean router probability of expert i. Gradient flows through P only.
    """
    num_experts = prob_sum_E.numel()
    f_E = tokens_per_expert_E.to(prob_sum_E.dtype) / num_tokens
    return coeff * num_experts * torch.sum(f_E * prob_sum_E / num_tokens)


def router_z_loss(logsumexp_sq_sum: torch.Tensor, num_tokens: int, coeff: float) -> torch.Tensor:
    """beta * mean_t logsumexp(logits_t)^2 (ST-MoE eq. 5), from the sum over tokens."""
    return coeff * logsumexp_sq_sum / num_tokens


@dataclasses.dataclass(frozen=True)
class Routing:
    """The router's decision for the T tokens on this rank.

    expert: [T] int64 chosen expert. gate: [T] float32 probability of it (differentiable).
    position: [T] place in the expert's queue over the whole routing group.
    capacity: slots per expert, None when dropless.
    aux_loss, z_loss: scalars with their coefficients applied (differentiable).
    tokens_per_expert: [E] argmax counts over the routing group, before dropping.
    num_group_tokens: tokens in the routing group. num_dropped: dropped tokens in the group.
    """

    expert: torch.Tensor
    gate: torch.Tensor
    position: torch.Tensor
    capacity: Optional[int]
    logits: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    num_group_tokens: int
    num_dropped: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        if self.capacity is None:
            return torch.ones_like(self.expert, dtype=torch.bool)
        return self.position < self.capacity


class SwitchRouter(MegatronModule):
    """Top-1 router with float32 weights W_r [E, h] that survive `.bfloat16()` and Float16Module."""

    def __init__(self, config: TransformerConfig, switch: SwitchConfig, layer_number: int = 1):
        super().__init__(config=config)
        self.switch = switch
        self.weight = torch.nn.Parameter(
            torch.empty(switch.num_experts, config.hidden_size, dtype=torch.float32))
        self.reset_parameters(layer_number)

    def reset_parameters(self, layer_number: int) -> None:
        if self.config.perform_initialization:
            generator = seeded_generator(self.switch.init_seed, layer_number, ROUTER_WEIGHT_KEY)
            truncated_normal_(self.weight, self.switch.init_scale, generator=generator)

    def _apply(self, fn, recurse=True):
        # Module.half()/bfloat16()/to(dtype) go through _apply: let them move the weight to another
        # device but keep it float32 (the paper's selective precision).
        super()._apply(fn, recurse)
        for param in self.parameters(recurse=False):
            if param.dtype != torch.float32:
                param.data = param.data.float()
                if param.grad is not None:
                    param.grad.data = param.grad.data.float()
        return self

    def forward(self, x_Th: torch.Tensor, token_group: Group = None) -> Routing:
        """Route T local tokens [T, h]; `token_group` holds the other shares of the routing group."""
        switch = self.switch
        x_Th = x_Th.float()
        if self.training and switch.jitter_eps > 0:
            noise = torch.empty_like(x_Th).uniform_(1 - switch.jitter_eps, 1 + switch.jitter_eps)
            x_Th = x_Th * noise
        weight_Eh = sum_backward(self.weight, token_group)
        logits_TE = x_Th @ weight_Eh.t()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        expert_T = torch.argmax(probs_TE, dim=-1)
        gate_T = probs_TE.gather(1, expert_T[:, None]).squeeze(1)

        # The routing group's decisions, in flattened [s, b] order (rank shares are contiguous).
        group_expert = all_gather_no_grad(expert_T, token_group)
        group_gate = all_gather_no_grad(gate_T, token_group)
        num_tokens = group_expert.numel()
        capacity = switch.capacity(num_tokens, self.training)
        positions = queue_positions(group_expert, group_gate, switch.num_experts, switch.drop_policy)
        offset = group_rank(token_group) * expert_T.numel()
        position_T = positions[offset:offset + expert_T.numel()]

        tokens_per_expert = torch.bincount(group_expert, minlength=switch.num_experts)
        prob_sum_E = sum_forward(probs_TE.sum(0), token_group)
        aux_loss = load_balancing_loss(tokens_per_expert, prob_sum_E, num_tokens, switch.aux_loss_coeff)
        lse_sq_sum = sum_forward(torch.logsumexp(logits_TE, dim=-1).square().sum(), token_group)
        z_loss = router_z_loss(lse_sq_sum, num_tokens, switch.z_loss_coeff)
        num_dropped = (positions >= capacity).sum() if capacity is not None else positions.new_zeros(())
        return Routing(expert_T, gate_T, position_T, capacity, logits_TE, aux_loss, z_loss,
                       tokens_per_expert, num_tokens, num_dropped)
