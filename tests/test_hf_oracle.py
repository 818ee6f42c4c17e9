"""Hugging Face's SwitchTransformersSparseMLP as an outside oracle for one Switch block.

HF groups tokens per sequence and takes a fixed integer capacity; one sequence with
cf = C * E / T gives our layer the same routing group and capacity.
"""

from __future__ import annotations

import pytest
import torch

from megatron_switch import SwitchConfig, SwitchMLP
from megatron_switch.checkpoint.huggingface import (
    WeightMappingError,
    export_huggingface_sparse_mlp,
    import_huggingface_sparse_mlp,
)
from tests.helpers import tiny_config

# Before 5.24 the Hugging Face MoE block routed the flattened batch (expert capacity pooled over all
# sequences) and its router returned (probs, mask, logits); the oracle is the per-sequence block.
transformers = pytest.importorskip("transformers", minversion="5.24")
from transformers.models.switch_transformers.modeling_switch_transformers import (  # noqa: E402
    SwitchTransformersSparseMLP,
)

H, FFN, E = 16, 32, 4


def build_pair(seq_len: int, capacity: int, activation: str):
    torch.manual_seed(0)
    hf_config = transformers.SwitchTransformersConfig(
        d_model=H, d_ff=FFN, num_experts=E, expert_capacity=capacity, router_jitter_noise=0.0,
        dense_act_fn=activation, dropout_rate=0.0, router_bias=False)
    hf = SwitchTransformersSparseMLP(hf_config)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = SwitchMLP(tiny_config(hidden=H, ffn=FFN), ep_group=None, tp_group=None, switch=SwitchConfig(
        num_experts=E, capacity_factor=capacity * E / seq_len, eval_capacity_factor=capacity * E / seq_len,
        min_capacity=0, activation=activation, expert_bias=False, jitter_eps=0.0))
    assert ours.switch.capacity(seq_len, True) == capacity
    import_huggingface_sparse_mlp(ours, hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("training", [True, False])
def test_same_routing_dropping_and_outputs_as_hugging_face(activation, training):
    seq_len, capacity = 32, 5
    hf, ours = build_pair(seq_len, capacity, activation)
    hf.train(training)
    ours.train(training)
    x = torch.randn(1, seq_len, H) * 2

    dispatch_mask, hf_gate, _ = hf.router(x.clone())
    hf_out = hf(x.clone())
    routing = ours.router(x[0])
    y, _ = ours(x.transpose(0, 1))

    hf_kept = dispatch_mask[0].sum(-1).bool()
    assert (~hf_kept).sum() > 0, "the case must overflow some expert"
    torch.testing.assert_close(routing.kept, hf_kept, rtol=0, atol=0)
    assert torch.equal(dispatch_mask[0].argmax(-1)[hf_kept], routing.expert[hf_kept])
    torch.testing.assert_close(routing.gate, hf_gate[0, :, 0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y.transpose(0, 1), hf_out, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(y[~hf_kept.view(seq_len)]) == 0  # dropped tokens give 0 in both


def test_each_sequence_routed_alone_matches_hugging_face_batch():
    seq_len, capacity = 16, 3
    hf, ours = build_pair(seq_len, capacity, "relu")
    hf.eval()
    ours.eval()
    x = torch.randn(3, seq_len, H) * 2
    hf_out = hf(x.clone())
    for b in range(3):
        y, _ = ours(x[b:b + 1].transpose(0, 1))
        torch.testing.assert_close(y.transpose(0, 1), hf_out[b:b + 1], rtol=1e-5, atol=1e-6)


def test_export_round_trips_to_hugging_face_and_checks_shapes():
    hf, ours = build_pair(16, 3, "relu")
    exported = export_huggingface_sparse_mlp(ours)
    assert exported.keys() == hf.state_dict().keys()
    for key, value in hf.state_dict().items():
        assert torch.equal(exported[key], value), key
    fresh = transformers.SwitchTransformersConfig(d_model=H, d_ff=FFN, num_experts=E, expert_capacity=3)
    target = SwitchTransformersSparseMLP(fresh)
    target.load_state_dict(exported)
    x = torch.randn(1, 16, H)
    torch.testing.assert_close(target.eval()(x), hf.eval()(x))
    bad = dict(hf.state_dict(), **{"experts.expert_2.wo.weight": torch.zeros(H, FFN + 1)})
    with pytest.raises(WeightMappingError, match=r"experts.expert_2.wo.weight: shape \(16, 33\)"):
        import_huggingface_sparse_mlp(ours, bad)


def test_gated_experts_map_to_wi_0_and_wi_1():
    layer = SwitchMLP(tiny_config(hidden=H, ffn=FFN), ep_group=None, tp_group=None,
                      switch=SwitchConfig(num_experts=E, activation="geglu", expert_bias=False))
    exported = export_huggingface_sparse_mlp(layer)
    assert exported["experts.expert_1.wi_0.weight"].shape == (FFN, H)
    other = SwitchMLP(tiny_config(hidden=H, ffn=FFN), ep_group=None, tp_group=None,
                      switch=SwitchConfig(num_experts=E, activation="geglu", expert_bias=False, init_seed=7))
    import_huggingface_sparse_mlp(other, exported)
    assert torch.equal(other.experts.weight1, layer.experts.weight1)


def buildable_bank_types() -> list[str]:
    """The expert backends this machine can build (Transformer Engine needs a GPU)."""
    from megatron_switch.experts import transformer_engine_available

    return ["torch"] + (["te"] if transformer_engine_available() else [])


@pytest.mark.parametrize("backend", buildable_bank_types())
@pytest.mark.parametrize("bias", [True, False])
def test_hugging_face_import_writes_every_expert_of_every_bank_type(backend, bias):
    """The import goes through the bank contract (`load_expert_weights`), so it changes the weights of
    any bank type, not a stacked copy: every expert's weights become Hugging Face's, biases zero."""
    torch.manual_seed(2)
    hf_config = transformers.SwitchTransformersConfig(d_model=H, d_ff=FFN, num_experts=E, router_bias=False,
                                                      dense_act_fn="relu")
    hf = SwitchTransformersSparseMLP(hf_config)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = SwitchMLP(tiny_config(hidden=H, ffn=FFN), ep_group=None, tp_group=None,
                     switch=SwitchConfig(num_experts=E, expert_bias=bias, expert_backend=backend))
    before = [ours.experts.expert_weights(e) for e in range(E)]
    if bias:
        with torch.no_grad():
            for p in ours.experts.parameters():
                if p.dim() == 2:
                    p.normal_()  # biases non-zero before the import
    import_huggingface_sparse_mlp(ours, hf.state_dict())
    state = hf.state_dict()
    for e in range(E):
        after = ours.experts.expert_weights(e)
        assert not torch.equal(after["weight1"], before[e]["weight1"])
        assert torch.equal(after["weight1"], state[f"experts.expert_{e}.wi.weight"])
        assert torch.equal(after["weight2"], state[f"experts.expert_{e}.wo.weight"])
        if bias:
            assert not after["bias1"].any() and not after["bias2"].any()
    assert torch.equal(ours.router.weight, state["router.classifier.weight"])
