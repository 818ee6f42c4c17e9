"""A slow, obviously-correct Switch layer: one token at a time, straight from the paper."""

from __future__ import annotations

import torch

from tests.helpers import dense_ffn


def slow_switch(x_Th, router_weight, weight1, weight2, bias1, bias2, *, capacity, policy="position",
                activation="relu", aux_coeff=0.0, z_coeff=0.0):
    """Returns (y [T, h], aux + z loss, kept [T] bools, expert [T]).

    Experts are served in token order (policy "position") or by descending gate, then token order
    (policy "probs"); a token is kept while its expert has fewer than `capacity` tokens.
    """
    T, E = x_Th.shape[0], router_weight.shape[0]
    logits = x_Th.float() @ router_weight.float().t()
    probs = torch.softmax(logits, dim=-1)
    expert = [int(torch.argmax(probs[t])) for t in range(T)]
    gate = [probs[t, expert[t]] for t in range(T)]
    order = list(range(T))
    if policy == "probs":
        order.sort(key=lambda t: (-float(gate[t].detach()), t))
    served = [0] * E
    kept = [False] * T
    for t in order:
        if capacity is None or served[expert[t]] < capacity:
            kept[t] = True
            served[expert[t]] += 1
    rows = []
    for t in range(T):
        e = expert[t]
        if not kept[t]:
            rows.append(torch.zeros_like(x_Th[t]))
            continue
        out = dense_ffn(x_Th[t], weight1[e], weight2[e], None if bias1 is None else bias1[e],
                        None if bias2 is None else bias2[e], activation)
        rows.append((gate[t] * out.float()).to(x_Th.dtype))
    argmax_fraction = torch.tensor([expert.count(i) / T for i in range(E)])
    aux = aux_coeff * E * torch.sum(argmax_fraction * probs.mean(0))
    z = z_coeff * torch.logsumexp(logits, dim=-1).square().mean()
    return torch.stack(rows), aux + z, torch.tensor(kept), torch.tensor(expert)
