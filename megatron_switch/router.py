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

from megatron_switch.ops.collectives import Group, all_gather_no_grad, group_rank, group_size, sum_backward, sum_forward
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


ROUTER_CHUNK_ELEMENTS = 1 << 20  # [rows, E] scores computed at a time (4 MiB in float32)


class _RouterScores(torch.autograd.Function):
    """Top-1 scores of a float32 router, computed in row chunks, with nothing of size [T, E] kept.

    forward(x [T, h], w [E, h]) -> (expert [T], gate [T], prob_sum [E], logsumexp [T]) where
    p = softmax(x w^T), expert = argmax p (first on ties), gate = p[t, expert], prob_sum = sum_t p.
    Backward recomputes each chunk's p exactly as forward did (same ops, same saved row max and
    sum) and applies d logits = p * (u - <u, p>) + g_lse * p with u = g_prob_sum + g_gate * onehot.
    Memory: two [rows, E] buffers at a time, rows = ROUTER_CHUNK_ELEMENTS / E.
    """

    @staticmethod
    def _chunks(num_tokens: int, num_experts: int):
        rows = max(1, ROUTER_CHUNK_ELEMENTS // num_experts)
        return [(i, min(i + rows, num_tokens)) for i in range(0, num_tokens, rows)]

    @staticmethod
    def _probs(x_rh, w_Eh, max_r, sum_r):
        return (x_rh @ w_Eh.t()).sub_(max_r[:, None]).exp_().div_(sum_r[:, None])

    @staticmethod
    def forward(ctx, x_Th, w_Eh, valid_T=None):
        T, E = x_Th.shape[0], w_Eh.shape[0]
        expert_T = torch.empty(T, dtype=torch.long, device=x_Th.device)
        max_T, sum_T, gate_T = (x_Th.new_empty(T) for _ in range(3))
        prob_sum_E = x_Th.new_zeros(E)
        for a, b in _RouterScores._chunks(T, E):
            scores_rE = x_Th[a:b] @ w_Eh.t()
            torch.amax(scores_rE, dim=-1, out=max_T[a:b])
            scores_rE.sub_(max_T[a:b, None]).exp_()
            torch.sum(scores_rE, dim=-1, out=sum_T[a:b])
            probs_rE = scores_rE.div_(sum_T[a:b, None])
            torch.argmax(probs_rE, dim=-1, out=expert_T[a:b])
            gate_T[a:b] = probs_rE.gather(1, expert_T[a:b, None]).squeeze(1)
            if valid_T is None:
                prob_sum_E += probs_rE.sum(0)
            else:  # quarantined rows (zeroed inputs) count nowhere
                prob_sum_E.addmv_(probs_rE.t(), valid_T[a:b].to(probs_rE.dtype))
        lse_T = max_T + sum_T.log()
        ctx.save_for_backward(x_Th, w_Eh, max_T, sum_T, expert_T, gate_T, valid_T)
        ctx.mark_non_differentiable(expert_T)
        return expert_T, gate_T, prob_sum_E, lse_T

    @staticmethod
    def backward(ctx, _, g_gate_T, g_prob_sum_E, g_lse_T):
        x_Th, w_Eh, max_T, sum_T, expert_T, gate_T, valid_T = ctx.saved_tensors
        g_gate_T = torch.zeros_like(gate_T) if g_gate_T is None else g_gate_T
        g_prob_sum_E = torch.zeros_like(w_Eh[:, 0]) if g_prob_sum_E is None else g_prob_sum_E
        g_lse_T = torch.zeros_like(max_T) if g_lse_T is None else g_lse_T
        if valid_T is not None:  # whatever reaches a quarantined row (even NaN) goes no further
            g_gate_T = torch.where(valid_T, g_gate_T, 0.0)
            g_lse_T = torch.where(valid_T, g_lse_T, 0.0)
        g_x = torch.empty_like(x_Th) if ctx.needs_input_grad[0] else None
        g_w = torch.zeros_like(w_Eh) if ctx.needs_input_grad[1] else None
        for a, b in _RouterScores._chunks(*expert_T.shape, w_Eh.shape[0]):
            probs_rE = _RouterScores._probs(x_Th[a:b], w_Eh, max_T[a:b], sum_T[a:b])
            g_gate_term = g_gate_T[a:b] * gate_T[a:b]
            if valid_T is None:  # u = g_prob_sum + g_gate * onehot; inner = <u, p> per row
                inner_r = g_gate_term + probs_rE @ g_prob_sum_E
                g_scores_rE = (g_prob_sum_E[None, :] + (g_lse_T[a:b] - inner_r)[:, None]).mul_(probs_rE)
            else:  # u = valid * g_prob_sum + g_gate * onehot
                v_r = valid_T[a:b].to(probs_rE.dtype)
                inner_r = g_gate_term + v_r * (probs_rE @ g_prob_sum_E)
                g_scores_rE = (v_r[:, None] * g_prob_sum_E[None, :] + (g_lse_T[a:b] - inner_r)[:, None]).mul_(probs_rE)
            del probs_rE
            g_scores_rE.scatter_add_(1, expert_T[a:b, None], g_gate_term[:, None])
            if g_x is not None:
                torch.mm(g_scores_rE, w_Eh, out=g_x[a:b])
            if g_w is not None:
                g_w.addmm_(g_scores_rE.t(), x_Th[a:b])
        return g_x, g_w, None


def initial_router_weight(switch: SwitchConfig, hidden_size: int, layer_number: int) -> torch.Tensor:
    """W_r [E, h] float32 of layer `layer_number` as a Switch run starts it, on any layout: the paper's
    truncated normal, sigma = sqrt(init_scale / h), drawn from (init_seed, layer, ROUTER_WEIGHT_KEY)."""
    generator = seeded_generator(switch.init_seed, layer_number, ROUTER_WEIGHT_KEY)
    return truncated_normal_(torch.empty(switch.num_experts, hidden_size), switch.init_scale, generator=generator)


@dataclasses.dataclass(frozen=True)
class Routing:
    """The router's decision for the T tokens on this rank.

    expert: [T] int64 chosen expert. gate: [T] float32 probability of it (differentiable).
    position: [T] place in the expert's queue over the whole routing group.
    capacity: slots per expert, None when dropless.
    logsumexp: [T] float32 logsumexp of the router logits (the z-loss input).
    aux_loss, z_loss: scalars with their coefficients applied (differentiable).
    tokens_per_expert: [E] argmax counts over the routing group, before dropping.
    num_group_tokens: tokens in the routing group. num_dropped: dropped tokens in the group (finite ones).
    valid: [T] bool, False for a quarantined token (a non-finite input); None when every token is finite.
    num_nonfinite: quarantined tokens in the routing group.
    """

    expert: torch.Tensor
    gate: torch.Tensor
    position: torch.Tensor
    capacity: Optional[int]
    logsumexp: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    num_group_tokens: int
    num_dropped: torch.Tensor
    valid: Optional[torch.Tensor] = None
    num_nonfinite: Optional[torch.Tensor] = None

    @property
    def kept(self) -> torch.Tensor:
        kept = (torch.ones_like(self.expert, dtype=torch.bool) if self.capacity is None
                else self.position < self.capacity)
        return kept if self.valid is None else kept & self.valid


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
            with torch.no_grad():
                self.weight.copy_(initial_router_weight(self.switch, self.config.hidden_size, layer_number))

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
        """Route T local tokens [T, h]; `token_group` holds the other shares of the routing group.

        Quarantine: a token whose input holds a NaN or an infinity (or overflows float32 when summed)
        is routed nowhere: it takes no capacity slot, its output is 0, it counts in neither the load
        fractions, the mean probabilities nor the z-loss (their means are over the finite tokens), and
        no gradient reaches or leaves the router through it. Capacity still counts all T tokens."""
        switch = self.switch
        E = switch.num_experts
        x_Th = x_Th.float()
        valid_T = torch.isfinite(x_Th.sum(-1))
        # A CPU checks for free and skips the mask when all is finite; GPUs (no host synchronisation)
        # and routing groups of several ranks (all take the same path) always apply it.
        if x_Th.device.type == "cpu" and group_size(token_group) == 1 and bool(valid_T.all()):
            valid_T = None
        else:
            x_Th = torch.where(valid_T[:, None], x_Th, 0.0)
        if self.training and switch.jitter_eps > 0:
            noise = torch.empty_like(x_Th).uniform_(1 - switch.jitter_eps, 1 + switch.jitter_eps)
            x_Th = x_Th * noise
        weight_Eh = sum_backward(self.weight, token_group)
        expert_T, gate_T, prob_sum_E, lse_T = _RouterScores.apply(x_Th, weight_Eh, valid_T)

        # The routing group's decisions, in flattened [s, b] order (rank shares are contiguous).
        queued_T = expert_T if valid_T is None else torch.where(valid_T, expert_T, E)  # E: quarantined
        group_expert = all_gather_no_grad(queued_T, token_group)
        group_gate = all_gather_no_grad(gate_T, token_group)
        num_tokens = group_expert.numel()
        capacity = switch.capacity(num_tokens, self.training)
        positions = queue_positions(group_expert, group_gate, E + (valid_T is not None), switch.drop_policy)
        offset = group_rank(token_group) * expert_T.numel()
        position_T = positions[offset:offset + expert_T.numel()]

        counts = torch.bincount(group_expert, minlength=E + 1)
        tokens_per_expert = counts[:E]
        num_finite = num_tokens if valid_T is None else counts[:E].sum().clamp(min=1)
        prob_sum_E = sum_forward(prob_sum_E, token_group)
        aux_loss = load_balancing_loss(tokens_per_expert, prob_sum_E, num_finite, switch.aux_loss_coeff)
        if switch.z_loss_coeff > 0:
            lse_sq_T = lse_T.square() if valid_T is None else torch.where(valid_T, lse_T, 0.0).square()
            z_loss = router_z_loss(sum_forward(lse_sq_T.sum(), token_group), num_finite, switch.z_loss_coeff)
        else:  # (not even computed: a NaN logit times 0 would still be NaN)
            z_loss = lse_T.new_zeros(())
        finite_group = group_expert < E
        num_dropped = ((positions >= capacity) & finite_group).sum() if capacity is not None \
            else positions.new_zeros(())
        num_nonfinite = (~finite_group).sum() if valid_T is not None else None
        return Routing(expert_T, gate_T, position_T, capacity, lse_T, aux_loss, z_loss,
                       tokens_per_expert, num_tokens, num_dropped, valid_T, num_nonfinite)
