"""Gradient reduction on CPU, and an expert-parallel rank that receives no token at all."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_switch import SwitchConfig, SwitchMLP, initialize_parallel
from megatron_switch.training.gradients import allreduce_gradients
from tests.helpers import spawn, tiny_config


def reduce_worker(rank, world_size):
    initialize_parallel(ep=1, num_experts=2, backend="gloo")  # DP = expert-DP = 2
    dense = torch.nn.Parameter(torch.zeros(3))
    expert = torch.nn.Parameter(torch.zeros(2))
    expert.allreduce = False
    dense.grad = torch.full((3,), float(rank + 1))
    if rank == 1:
        expert.grad = torch.full((2,), 4.0)  # rank 0's experts saw no token: no gradient there
    allreduce_gradients([dense, expert])
    torch.testing.assert_close(dense.grad, torch.full((3,), 1.5))
    torch.testing.assert_close(expert.grad, torch.full((2,), 2.0))


def test_dense_and_expert_gradients_average_even_without_local_gradient():
    spawn(reduce_worker, 2)


def starved_worker(rank, world_size, capacity_factor):
    """EP=2: every token chooses expert 0, so rank 1's experts receive nothing."""
    initialize_parallel(ep=2, num_experts=4, backend="gloo")
    switch = SwitchConfig(num_experts=4, capacity_factor=capacity_factor, jitter_eps=0.0)
    layer = SwitchMLP(tiny_config(), switch=switch)
    reference = SwitchMLP(tiny_config(), switch=switch, ep_group=None, tp_group=None)
    for module in (layer, reference):
        with torch.no_grad():
            module.router.weight.zero_()
            module.router.weight[0].fill_(1.0)
    x = torch.rand(6, 2, 16, generator=torch.Generator().manual_seed(rank)) + 0.1  # positive: expert 0 wins
    y, _ = layer(x)
    y.sum().backward()
    y_ref, _ = reference(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert int(layer.last_stats.tokens_per_expert[0]) == 12
    allreduce_gradients(layer.parameters())  # rank 1 has no expert gradient of its own
    assert layer.experts.weight1.grad is not None
    dist.barrier()


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_expert_parallel_rank_with_no_tokens(capacity_factor):
    spawn(starved_worker, 2, capacity_factor)
