"""Expert, tensor and sequence parallelism against one process holding all experts.

Each case spawns gloo processes. Every rank builds the distributed layer and a one-process
reference with the same (layout-independent) initialisation, feeds each data-parallel replica its
own micro-batch, and checks outputs, losses, statistics and gradients (input, router, experts).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_switch import SwitchConfig, SwitchMLP, initialize_parallel
from tests.helpers import count_expert_rows, spawn, tiny_config

S, B, H, E = 8, 2, 16, 8
TOL = dict(rtol=1e-5, atol=1e-6)

VARIANTS = [
    dict(capacity_factor=1.0, min_capacity=1),  # the kept tokens only (grouped GEMM)
    dict(capacity_factor=1.0, min_capacity=1, pad_to_capacity=True),  # every slot, static shapes
    dict(capacity_factor=None),
    dict(capacity_factor=1.0, min_capacity=1, drop_policy="probs", activation="swiglu"),
]


def replica_batch(replica: int):
    g = torch.Generator().manual_seed(100 + replica)
    return torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)


def reference_run(config, switch, replica):
    """One process, all experts, the replica's whole micro-batch."""
    layer = SwitchMLP(config, switch=switch, ep_group=None, tp_group=None)
    x, upstream = replica_batch(replica)
    x.requires_grad_()
    y, _ = layer(x)
    (y * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return layer, y.detach(), x.grad, grads, layer.last_stats


def check_layout(tp: int, sp: bool, switch: SwitchConfig) -> None:
    from megatron.core import parallel_state as ps

    tp_rank, dp_rank, dp = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                            ps.get_data_parallel_world_size())
    config = tiny_config(hidden=H, tensor_model_parallel_size=tp, sequence_parallel=sp)
    ref_config = tiny_config(hidden=H)
    layer = SwitchMLP(config, switch=switch)
    refs = [reference_run(ref_config, switch, d) for d in range(dp)]
    ref_layer, y_ref, xgrad_ref, grads_ref, stats_ref = refs[dp_rank]

    local = layer.experts.first_expert, layer.experts.first_expert + layer.experts.num_local_experts
    for name, p in layer.named_parameters():
        want = dict(ref_layer.named_parameters())[name]
        want = want[local[0]:local[1]] if name.startswith("experts.") else want
        torch.testing.assert_close(p, want, rtol=0, atol=0)

    def shard(t):
        return t.chunk(tp, dim=0)[tp_rank] if sp else t

    rows_computed = count_expert_rows(layer.experts)
    x, upstream = (shard(t) for t in replica_batch(dp_rank))
    x.requires_grad_()
    y, _ = layer(x)
    (y * upstream).sum().backward()
    if tp > 1:
        # No duplicated expert work: over all ranks, experts process each kept token exactly once.
        rows = torch.tensor(float(sum(rows_computed)))
        dist.all_reduce(rows)
        kept = sum(S * B * (1 - float(r[4].dropped_fraction)) for r in refs)
        assert round(float(rows)) == round(kept), (float(rows), kept)

    torch.testing.assert_close(y, shard(y_ref), **TOL)
    torch.testing.assert_close(x.grad, shard(xgrad_ref), **TOL)
    stats = layer.last_stats
    for field in ("aux_loss", "z_loss", "dropped_fraction", "tokens_per_expert"):
        torch.testing.assert_close(getattr(stats, field), getattr(stats_ref, field), **TOL)
    torch.testing.assert_close(layer.router.weight.grad, grads_ref["router.weight"], **TOL)

    # Reduced as Megatron's DDP does (dense over DP, experts over expert-DP, both summed), every
    # gradient is the sum over all replicas of the one-process gradients.
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad, group=ps.get_data_parallel_group())
    torch.testing.assert_close(router_grad, sum(r[3]["router.weight"] for r in refs), **TOL)
    for name, p in layer.experts.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=ps.get_expert_data_parallel_group())
        want = sum(r[3]["experts." + name] for r in refs)[local[0]:local[1]]
        torch.testing.assert_close(grad, want, **TOL)
    return float(stats_ref.dropped_fraction)


def worker(rank, world_size, tp, ep, sp):
    initialize_parallel(tp=tp, ep=ep, num_experts=E, backend="gloo")
    for variant in VARIANTS:
        switch = SwitchConfig(num_experts=E, jitter_eps=0.0, z_loss_coeff=1e-3, **variant)
        dropped = check_layout(tp, sp, switch)
        if variant["capacity_factor"] is not None:
            assert dropped > 0, "capacity case must drop tokens"


@pytest.mark.parametrize("world_size,tp,ep,sp", [
    (2, 1, 2, False),
    (4, 1, 4, False),
    (4, 2, 2, False),
    (4, 2, 2, True),
    (2, 2, 1, True),
], ids=["ep2", "ep4", "tp2xep2", "tp2xep2-sp", "tp2-sp"])
def test_layout_matches_one_process(world_size, tp, ep, sp):
    spawn(worker, world_size, tp, ep, sp)
