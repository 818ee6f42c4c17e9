"""A whole megatron-core GPTModel built from get_switch_gpt_layer_spec, on CPU through gloo."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_switch import SwitchConfig, SwitchMLP, get_switch_gpt_layer_spec, initialize_parallel
from tests.helpers import spawn, tiny_config

VOCAB, SEQ, BATCH = 64, 16, 2


def build_gpt(ep: int):
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(7)
    config = tiny_config(hidden=32, ffn=64, layers=4, heads=4)
    switch = SwitchConfig(num_experts=4, expert_interval=2, capacity_factor=1.0, min_capacity=1,
                          jitter_eps=0.0, z_loss_coeff=1e-3)
    spec = get_switch_gpt_layer_spec(config, switch)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="learned_absolute")
    return model


def gpt_worker(rank, world_size, ep, out_path):
    initialize_parallel(ep=ep, num_experts=4, backend="gloo")
    model = build_gpt(ep)
    switch_layers = [m for m in model.modules() if isinstance(m, SwitchMLP)]
    assert [m.layer_number for m in switch_layers] == [2, 4]
    assert all(m.experts.num_local_experts == 4 // ep for m in switch_layers)

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    loss_per_token = model(tokens, position_ids, attention_mask=None, labels=labels)
    loss = loss_per_token.mean()
    loss.backward()
    logits = model(tokens, position_ids, attention_mask=None)
    assert all(m.last_stats is not None for m in switch_layers)
    result = {
        "loss": loss.detach(),
        "logits": logits.detach(),
        "embedding_grad": model.embedding.word_embeddings.weight.grad,
        "router_grads": [m.router.weight.grad for m in switch_layers],
        "expert_grads": [(m.experts.first_expert, m.experts.weight1.grad) for m in switch_layers],
        "dropped": [float(m.last_stats.dropped_fraction) for m in switch_layers],
    }
    torch.save(result, f"{out_path}.{rank}")
    dist.barrier()


def test_switch_gpt_ep2_matches_one_process(tmp_path):
    spawn(gpt_worker, 1, 1, str(tmp_path / "ref"))
    spawn(gpt_worker, 2, 2, str(tmp_path / "ep2"))
    ref = torch.load(tmp_path / "ref.0")
    assert torch.isfinite(ref["loss"]) and ref["loss"] > 0
    assert any(d > 0 for d in ref["dropped"])
    for rank in range(2):
        got = torch.load(tmp_path / f"ep2.{rank}")
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["embedding_grad"], ref["embedding_grad"], rtol=1e-5, atol=1e-6)
        for g, r in zip(got["router_grads"], ref["router_grads"]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        # Both ranks ran the same batch, so each local expert saw it twice.
        for (first, g), (_, r) in zip(got["expert_grads"], ref["expert_grads"]):
            torch.testing.assert_close(g / 2, r[first:first + g.shape[0]], rtol=1e-5, atol=1e-6)
