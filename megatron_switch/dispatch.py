"""Token permutation and the expert-parallel all-to-all.

Shapes: T local tokens, h hidden, E experts, P expert-parallel ranks, E_l = E / P local experts,
C capacity. Experts are laid out contiguously: rank p owns experts [p * E_l, (p + 1) * E_l).

- `CapacityDispatcher` (padding to capacity, each rank its own routing group): tokens are written
  into an [E * C, h] buffer at slot `expert * C + position`; one static-shape all-to-all gives each
  rank [E_l, P * C, h], empty slots included; one more brings the outputs back. No host sync.
- `GroupedDispatcher` (dropless, capacity without padding, or a routing group shared by several
  ranks): kept tokens are sorted by expert, split sizes are exchanged, and an uneven all-to-all
  moves exactly the kept tokens; experts see variable counts and compute no empty slot.
Each returns its own metadata type (`PaddedMeta`, `GroupedMeta`: what its combine needs, and the
bank's `tokens_per_expert` argument), and combine gives the expert outputs as rows [R, h] with each
token's row in `meta.token_rows`;
`gather_scale` then forms y_t = gate_t * kept_t * rows[token_rows_t] in one pass. Only indices and
[*, h] rows move: nothing of size T x E x C exists. With no expert-parallel group (P = 1) the same
code runs with the collectives as identities.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from megatron_switch.ops.collectives import Group, all_to_all, group_size
from megatron_switch.router import Routing


@dataclasses.dataclass(frozen=True)
class PaddedMeta:
    """What `CapacityDispatcher.combine` and `gather_scale` need. token_rows: [T] slot of each token
    in this rank's [E * C, h] rows (any valid slot for a dropped token)."""

    token_rows: torch.Tensor
    row_tokens = None  # several slots may be empty: no inverse

    @property
    def tokens_per_expert(self) -> None:
        """The bank's `tokens_per_expert` argument: None, every expert computes all its slots."""
        return None


@dataclasses.dataclass(frozen=True)
class GroupedMeta:
    """What `GroupedDispatcher.combine` and `gather_scale` need.

    token_rows: [T] row of each token among this rank's kept tokens (any valid row for a dropped one).
    row_tokens: [R] the token of each of those rows (the inverse of token_rows on the kept tokens).
    tokens_per_expert: rows each local expert receives (the bank's grouped input counts).
    send_splits / recv_splits / regroup: the uneven all-to-all's splits and the permutation that sorts
    received rows by local expert; None without expert parallelism.
    """

    token_rows: torch.Tensor
    row_tokens: torch.Tensor
    tokens_per_expert: List[int]
    send_splits: Optional[List[int]] = None
    recv_splits: Optional[List[int]] = None
    regroup: Optional[torch.Tensor] = None


class CapacityDispatcher:
    """Static shapes: [E * C, h] per rank, one all-to-all each way."""

    def __init__(self, num_experts: int, ep_group: Group):
        self.num_experts, self.ep_group = num_experts, ep_group
        self.ep = group_size(ep_group)

    def dispatch(self, x_Th: torch.Tensor, routing: Routing) -> Tuple[torch.Tensor, PaddedMeta]:
        E, C, h = self.num_experts, routing.capacity, x_Th.shape[-1]
        trash = E * C
        slot_T = torch.where(routing.kept, routing.expert * C + routing.position,
                             torch.full_like(routing.expert, trash))
        buffer = x_Th.new_zeros(trash + 1, h)
        buffer.index_copy_(0, slot_T, x_Th)  # dropped tokens land in the last row, cut off below
        buffer = buffer[:trash]
        received = all_to_all(buffer, self.ep_group)  # [P (source), E_l, C, h]
        E_l = E // self.ep
        x_ENh = received.view(self.ep, E_l, C, h).transpose(0, 1).reshape(E_l, self.ep * C, h)
        return x_ENh, PaddedMeta(torch.where(routing.kept, slot_T, torch.zeros_like(slot_T)))

    def combine(self, y_ENh: torch.Tensor, meta: PaddedMeta) -> torch.Tensor:
        """[E_l, P * C, h] -> [E * C, h]: this rank's slots, back from their experts."""
        E_l, _, h = y_ENh.shape
        send = y_ENh.view(E_l, self.ep, -1, h).transpose(0, 1).reshape(-1, h)
        return all_to_all(send, self.ep_group)


class GroupedDispatcher:
    """Exactly the kept tokens move: split sizes first, then an uneven all-to-all."""

    def __init__(self, num_experts: int, ep_group: Group):
        self.num_experts, self.ep_group = num_experts, ep_group
        self.ep = group_size(ep_group)

    def dispatch(self, x_Th: torch.Tensor, routing: Routing) -> Tuple[torch.Tensor, GroupedMeta]:
        E, P = self.num_experts, self.ep
        E_l = E // P
        kept = routing.kept
        key = torch.where(kept, routing.expert, torch.full_like(routing.expert, E))
        order = torch.argsort(key, stable=True)
        send_counts_PE = torch.bincount(key, minlength=E + 1)[:E].view(P, E_l)
        num_kept = int(send_counts_PE.sum())
        rows = order[:num_kept]
        token_rows = torch.zeros_like(routing.expert)
        token_rows[rows] = torch.arange(num_kept, device=rows.device)
        x_sent = _SelectRows.apply(x_Th, rows, token_rows, kept)
        if P == 1:
            return x_sent, GroupedMeta(token_rows, rows, send_counts_PE[0].tolist())
        recv_counts_PE = torch.empty_like(send_counts_PE)
        torch.distributed.all_to_all_single(recv_counts_PE, send_counts_PE, group=self.ep_group)
        send_splits = send_counts_PE.sum(1).tolist()
        recv_splits = recv_counts_PE.sum(1).tolist()
        received = all_to_all(x_sent, self.ep_group, recv_splits, send_splits)  # (source, expert)
        local_expert = torch.repeat_interleave(
            torch.arange(E_l, device=x_Th.device).repeat(P), recv_counts_PE.flatten())
        regroup = torch.argsort(local_expert, stable=True)
        meta = GroupedMeta(token_rows, rows, recv_counts_PE.sum(0).tolist(), send_splits, recv_splits, regroup)
        return received.index_select(0, regroup), meta

    def combine(self, y_Nh: torch.Tensor, meta: GroupedMeta) -> torch.Tensor:
        """Expert outputs -> [kept tokens, h] in this rank's sorted send order."""
        if meta.regroup is not None:
            y_Nh = torch.empty_like(y_Nh).index_copy(0, meta.regroup, y_Nh)
            y_Nh = all_to_all(y_Nh, self.ep_group, meta.send_splits, meta.recv_splits)
        return y_Nh


class _SelectRows(torch.autograd.Function):
    """x [T, h] -> x[rows] [R, h] for rows without repeats. Backward gathers each selected token's
    row back (token_rows) and gives the others zeros: a gather, not autograd's scatter-add."""

    @staticmethod
    def forward(ctx, x_Th, rows_R, token_rows_T, selected_T):
        ctx.save_for_backward(token_rows_T, selected_T)
        return x_Th.index_select(0, rows_R)

    @staticmethod
    def backward(ctx, d_Rh):
        token_rows_T, selected_T = ctx.saved_tensors
        if d_Rh.shape[0] == 0:
            return d_Rh.new_zeros(token_rows_T.shape[0], d_Rh.shape[1]), None, None, None
        d_Th = d_Rh.index_select(0, token_rows_T)
        return d_Th.masked_fill_(~selected_T[:, None], 0), None, None, None


class _GatherScale(torch.autograd.Function):
    """y[t] = (rows[index[t]] * weight[t]) in float32, cast to rows' dtype; one pass each way.
    With row_tokens (each row's token, every row used once) the rows' gradient is a gather too."""

    @staticmethod
    def forward(ctx, rows_Rh, index_T, weight_T, row_tokens_R):
        ctx.save_for_backward(rows_Rh, index_T, weight_T, row_tokens_R)
        y_Th = rows_Rh.index_select(0, index_T)
        if y_Th.dtype == torch.float32:
            return y_Th.mul_(weight_T[:, None])
        return (y_Th.float() * weight_T[:, None]).to(rows_Rh.dtype)

    @staticmethod
    def backward(ctx, dy_Th):
        rows_Rh, index_T, weight_T, row_tokens_R = ctx.saved_tensors
        d_rows = d_weight = None
        if ctx.needs_input_grad[0]:
            if row_tokens_R is not None:  # d rows[r] = dy[t] * weight[t] for the token t of row r
                d_rows = dy_Th.index_select(0, row_tokens_R).float()
                d_rows.mul_(weight_T.index_select(0, row_tokens_R)[:, None])
                d_rows = d_rows.to(rows_Rh.dtype)
            else:
                scaled = (dy_Th.float() * weight_T[:, None]).to(rows_Rh.dtype)
                # scatter_add_ (not index_add_, several times slower on CPU); dropped tokens add zeros.
                d_rows = torch.zeros_like(rows_Rh).scatter_add_(0, index_T[:, None].expand_as(scaled), scaled)
        if ctx.needs_input_grad[2]:
            d_weight = (dy_Th.float() * rows_Rh.index_select(0, index_T).float()).sum(-1)
        return d_rows, None, d_weight, None


def gather_scale(rows_Rh: torch.Tensor, index_T: torch.Tensor, weight_T: torch.Tensor,
                 row_tokens_R: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[R, h] expert outputs, [T] row per token, [T] float32 weight -> [T, h] weighted outputs.
    row_tokens_R: the token of each row when every row belongs to exactly one token (the grouped
    dispatcher's meta.row_tokens), so the backward gathers instead of scatter-adding."""
    if rows_Rh.shape[0] == 0:
        # Every token dropped: zeros that stay connected to the router and to the (empty) expert
        # outputs, so this rank's backward still runs the collectives its peers wait for.
        zeros = rows_Rh.new_zeros(index_T.shape[0], rows_Rh.shape[1])
        return zeros * weight_T[:, None].to(rows_Rh.dtype) + rows_Rh.sum()
    return _GatherScale.apply(rows_Rh, index_T, weight_T, row_tokens_R)
