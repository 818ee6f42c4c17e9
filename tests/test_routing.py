"""Property tests of the routing math against slow loops."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_switch.router import load_balancing_loss, queue_positions


def slow_positions(expert, gate, policy):
    order = sorted(range(len(expert)), key=(lambda t: (-gate[t], t)) if policy == "probs" else (lambda t: t))
    served, positions = {}, [0] * len(expert)
    for t in order:
        positions[t] = served.get(expert[t], 0)
        served[expert[t]] = positions[t] + 1
    return positions


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 9), st.sampled_from(["position", "probs"]))
def test_queue_positions_match_slow_loop(data, num_experts, policy):
    T = data.draw(st.integers(1, 60))
    expert = data.draw(st.lists(st.integers(0, num_experts - 1), min_size=T, max_size=T))
    # Few distinct gate values, so ties are common and must fall back to token order.
    gate = data.draw(st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.9]), min_size=T, max_size=T))
    got = queue_positions(torch.tensor(expert), torch.tensor(gate), num_experts, policy)
    assert got.tolist() == slow_positions(expert, gate, policy)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 40), st.integers(0, 10_000))
def test_aux_loss_formula_and_uniform_minimum(num_experts, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(tokens, num_experts, generator=g), -1)
    expert = probs.argmax(-1)
    counts = torch.bincount(expert, minlength=num_experts)
    loss = load_balancing_loss(counts, probs.sum(0), tokens, 0.01)
    slow = 0.01 * num_experts * sum((expert == i).float().mean() * probs[:, i].mean() for i in range(num_experts))
    torch.testing.assert_close(loss, slow)
