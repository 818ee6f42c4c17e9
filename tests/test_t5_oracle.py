"""Switch T5 (specs/t5_model.py) against Hugging Face's `SwitchTransformersForConditionalGeneration`, built
offline from a config with random weights and given the same weights through checkpoint/huggingface_t5.py: the
same logits, router decisions and router losses, and the same gradients, in float32 with a capacity
that drops nothing. Layouts: Switch layers every 2nd layer and every layer (Switch-C), tied and
untied embeddings, ReLU and gated-GELU FFNs. Expert parallelism (EP=2, spawned gloo processes)
gives the same forward and gradients as one process.

Hugging Face's model has no gated FFN (its `dense_act_fn` is applied ungated): for gated GELU its
dense and expert FFNs are replaced by Hugging Face's own T5 v1.1 `T5DenseGatedActDense`
(`feed_forward_proj="gated-gelu"`), which is what T5X computes.
Router losses: Hugging Face reports per stack the z-loss averaged over the stack's sparse layers
and a load-balancing loss over sequences with the layers pooled; ours is one loss of each kind per
Switch layer over the micro-batch. So the z-losses are compared through that average, the
load-balancing loss where the definitions meet (one sequence, one sparse layer per stack), and
every layer's losses against a direct computation from Hugging Face's router logits. With every
layer sparse Hugging Face reports 0 for both (its `sparse_step > 1` test); the test records that.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_switch import SwitchConfig
from megatron_switch.data.span_corruption import t5_attention_masks
from megatron_switch.specs.t5_model import (
    T5ConfigError,
    T5Settings,
    build_switch_t5,
    local_state_dict,
    switch_layers_by_stack,
)
from megatron_switch.checkpoint.huggingface_t5 import T5WeightsError, hf_to_ours, ours_to_hf, settings_from_hf_config
from tests.helpers import spawn, with_gated_gelu_ffns

transformers = pytest.importorskip("transformers", minversion="5.24")

V, H, D_KV, HEADS, FFN, E = 48, 16, 8, 3, 24, 4  # heads * d_kv = 24 != d_model, as in Switch-C
BUCKETS, MAX_DISTANCE = 8, 20  # a 24-token encoder reaches the logarithmic buckets and past max distance
ALPHA = BETA = 1e-3
ENC_LEN, DEC_LEN = 24, 10


def settings_for(layers: int, interval: int, tied: bool, activation: str) -> T5Settings:
    switch = SwitchConfig(num_experts=E, expert_interval=interval, capacity_factor=None, eval_capacity_factor=None,
                          jitter_eps=0.0, aux_loss_coeff=ALPHA, z_loss_coeff=BETA, expert_bias=False,
                          activation={"relu": "relu", "gated-gelu": "geglu_tanh"}[activation])
    return T5Settings(vocab_size=V, d_model=H, num_heads=HEADS, d_kv=D_KV, d_ff=FFN, encoder_layers=layers,
                      decoder_layers=layers, relative_attention_num_buckets=BUCKETS,
                      relative_attention_max_distance=MAX_DISTANCE, activation=activation,
                      tie_word_embeddings=tied, switch=switch)


def hf_model(layers: int, interval: int, tied: bool, activation: str, seed: int = 0):
    """A random Hugging Face Switch T5; every weight drawn (norm weights around 1)."""
    sparse = layers // interval
    config = transformers.SwitchTransformersConfig(
        vocab_size=V, d_model=H, d_kv=D_KV, d_ff=FFN, num_layers=layers, num_decoder_layers=layers,
        num_heads=HEADS, num_experts=E, num_sparse_encoder_layers=sparse, num_sparse_decoder_layers=sparse,
        expert_capacity=ENC_LEN, router_jitter_noise=0.0, dropout_rate=0.0, tie_word_embeddings=tied,
        relative_attention_num_buckets=BUCKETS, relative_attention_max_distance=MAX_DISTANCE,
        router_z_loss_coef=BETA, router_aux_loss_coef=ALPHA,
        dense_act_fn="relu" if activation == "relu" else "gelu_new")
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    if activation == "gated-gelu":
        with_gated_gelu_ffns(model, H, FFN)
    if not tied:  # Hugging Face 5.24 unties the stacks' input embeddings too; T5 shares one
        model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "layer_norm" in name else noise * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
    return model.eval()


def batch(seed: int = 1, size: int = 2):
    generator = torch.Generator().manual_seed(seed)
    enc = torch.randint(0, V, (size, ENC_LEN), generator=generator)
    dec = torch.randint(0, V, (size, DEC_LEN), generator=generator)
    labels = torch.randint(0, V, (size, DEC_LEN), generator=generator)
    real = torch.ones(size, ENC_LEN, dtype=torch.long)
    real[-1, -5:] = 0  # the last sequence ends in padding
    return enc, dec, labels, real


def our_model(settings: T5Settings, hf_state):
    model = build_switch_t5(settings).eval()
    model.load_state_dict(hf_to_ours(hf_state, settings), strict=True)
    return model


def run_ours(model, enc, dec, real):
    return model(enc, dec, *t5_attention_masks(real, dec.shape[1]))


def direct_losses(logits_bsE: torch.Tensor):
    """(aux, z, tokens per expert) of one layer over the micro-batch, from the paper's formulas."""
    logits = logits_bsE.reshape(-1, E).double()
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.argmax(-1), minlength=E)
    aux = ALPHA * E * torch.sum(counts / logits.shape[0] * probs.mean(0))
    z = BETA * torch.logsumexp(logits, -1).square().mean()
    return aux, z, counts


LAYOUTS = [(4, 2), (3, 1)]  # every 2nd layer (Switch layers 2 and 4 of each stack); every layer (Switch-C)


@pytest.mark.parametrize("activation", ["relu", "gated-gelu"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layers,interval", LAYOUTS, ids=["every-2nd", "every-layer"])
def test_same_logits_router_losses_and_gradients_as_hugging_face(single_process_groups, layers, interval, tied,
                                                                   activation):
    settings = settings_for(layers, interval, tied, activation)
    hf = hf_model(layers, interval, tied, activation)
    ours = our_model(settings, hf.state_dict())
    enc, dec, labels, real = batch()

    out = hf(input_ids=enc, attention_mask=real, decoder_input_ids=dec, output_router_logits=True)
    logits = run_ours(ours, enc, dec, real)
    scale = float(out.logits.detach().abs().max())
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5 * scale)

    switch = switch_layers_by_stack(ours)
    for stack in ("encoder", "decoder"):
        numbers = settings.switch_layer_numbers(stack)
        assert sorted(switch[stack]) == numbers == list(range(interval, layers + 1, interval))
        hf_logits = getattr(out, f"{stack}_router_logits")
        assert len(hf_logits) == len(numbers)
        for number, router_logits in zip(numbers, hf_logits):
            stats = switch[stack][number].last_stats
            aux, z, counts = direct_losses(router_logits)
            assert torch.equal(stats.tokens_per_expert, counts)  # the same routing decisions
            assert float(stats.dropped_fraction) == 0.0
            torch.testing.assert_close(stats.aux_loss.double(), aux, rtol=1e-5, atol=0)
            torch.testing.assert_close(stats.z_loss.double(), z, rtol=1e-5, atol=0)
        hf_z, hf_aux = getattr(out, f"{stack}_z_loss"), getattr(out, f"{stack}_aux_loss")
        if interval == 1:  # Hugging Face's defect: a stack sparse in every layer reports no router loss
            assert hf_z == 0 and hf_aux == 0
        else:  # its z-loss is the mean over the stack's sparse layers of the per-layer z-loss
            ours_z = torch.stack([switch[stack][n].last_stats.z_loss for n in numbers]).mean() / BETA
            torch.testing.assert_close(ours_z, hf_z.detach(), rtol=1e-5, atol=0)

    # Gradients of the same cross-entropy (eval mode: no router-loss gradient in either), mapped to
    # Hugging Face's names by the same correspondence as the weights. Eight layers of float32
    # round-off (different attention and GELU kernels) reach ~1.5e-5 of a tensor's largest entry.
    F.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1)).backward()
    F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1)).backward()
    our_grads = ours_to_hf({name: p.grad for name, p in ours.named_parameters(remove_duplicate=False)}, settings)
    hf_grads = {name: torch.zeros_like(p) if p.grad is None else p.grad  # an expert without tokens has none
                for name, p in hf.named_parameters(remove_duplicate=False)}
    assert our_grads.keys() == hf_grads.keys()
    for name, grad in hf_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=5e-5 * float(grad.abs().max()), msg=name)
    router = [n for n in hf_grads if n.endswith("router.classifier.weight")]
    assert router and all(hf_grads[n].abs().sum() > 0 for n in router)  # the gate carries gradient to routers


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_router_losses_equal_hugging_face_where_the_definitions_meet(single_process_groups, tied):
    """One sequence and one sparse layer per stack: Hugging Face's per-sequence, layer-pooled
    load-balancing loss is the paper's loss over the micro-batch, and its z-loss the layer's."""
    settings = settings_for(2, 2, tied, "relu")
    hf = hf_model(2, 2, tied, "relu", seed=3)
    ours = our_model(settings, hf.state_dict())
    enc, dec, _, real = batch(seed=4, size=1)
    out = hf(input_ids=enc, attention_mask=real, decoder_input_ids=dec, output_router_logits=True)
    run_ours(ours, enc, dec, real)
    switch = switch_layers_by_stack(ours)
    for stack in ("encoder", "decoder"):
        stats = switch[stack][2].last_stats
        torch.testing.assert_close(stats.aux_loss, ALPHA * getattr(out, f"{stack}_aux_loss").detach(),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(stats.z_loss, BETA * getattr(out, f"{stack}_z_loss").detach(), rtol=1e-5, atol=0)


def test_training_mode_matches_without_dropout_or_jitter(single_process_groups):
    settings = settings_for(4, 2, True, "gated-gelu")
    hf = hf_model(4, 2, True, "gated-gelu", seed=5)
    ours = our_model(settings, hf.state_dict())
    hf.train()
    ours.train()
    enc, dec, _, real = batch(seed=6)
    out = hf(input_ids=enc, attention_mask=real, decoder_input_ids=dec)
    logits = run_ours(ours, enc, dec, real)
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5 * float(out.logits.detach().abs().max()))


def test_weights_round_trip_and_mismatches_are_named():
    settings = settings_for(4, 2, False, "relu")
    hf_state = hf_model(4, 2, False, "relu").state_dict()
    back = ours_to_hf(hf_to_ours(hf_state, settings), settings)
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[key], hf_state[key]) for key in hf_state)

    padded = hf_to_ours(hf_state, dataclasses.replace(settings, vocab_size=V + 16))
    assert padded["embedding.word_embeddings.weight"].shape == (V + 16, H)
    assert torch.count_nonzero(padded["embedding.word_embeddings.weight"][V:]) == 0
    with pytest.raises(T5WeightsError, match="vocabulary rows, more than T5Settings.vocab_size"):
        hf_to_ours(hf_state, dataclasses.replace(settings, vocab_size=V - 1))
    every_layer = dataclasses.replace(settings, encoder_expert_interval=1)
    with pytest.raises(T5WeightsError, match=r"missing Hugging Face key 'encoder.block.0.layer.1.mlp.router"):
        hf_to_ours(hf_state, every_layer)
    dense = dataclasses.replace(settings, decoder_expert_interval=0)
    with pytest.raises(T5WeightsError, match=r"missing Hugging Face key 'decoder.block.1.layer.2.mlp.wi.weight'"):
        hf_to_ours(hf_state, dense)
    fewer_layers = dataclasses.replace(settings, decoder_layers=2)
    with pytest.raises(T5WeightsError, match=r"no place for: \['decoder.block.2.layer.0.SelfAttention"):
        hf_to_ours(hf_state, fewer_layers)
    split = dict(hf_state, **{"decoder.embed_tokens.weight": hf_state["shared.weight"] + 1})
    with pytest.raises(T5WeightsError, match="one input embedding for both stacks"):
        hf_to_ours(split, settings)


def test_settings_from_hugging_face_configs():
    base = transformers.SwitchTransformersConfig(  # google/switch-base-8's config
        num_experts=8, d_ff=3072, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6)
    settings = settings_from_hf_config(base, capacity_factor=1.25)
    assert (settings.d_model, settings.num_heads, settings.d_kv, settings.d_ff) == (768, 12, 64, 3072)
    assert settings.switch_layer_numbers("encoder") == settings.switch_layer_numbers("decoder") == [2, 4, 6, 8, 10, 12]
    assert settings.switch.num_experts == 8 and settings.switch.z_loss_coeff == 1e-3
    assert settings.switch.capacity_factor == 1.25 and not settings.switch.expert_bias
    c = transformers.SwitchTransformersConfig(num_layers=15, num_decoder_layers=15, num_sparse_encoder_layers=15,
                                              num_sparse_decoder_layers=15, d_model=2080, num_heads=30)
    assert settings_from_hf_config(c).switch_layer_numbers("decoder") == list(range(1, 16))
    # Hugging Face's rule for every 3rd and 4th layer (0-based i % step == 1: layers 2, 5, 8, 11 and
    # 2, 6, 10, its default config) is no Switch placement.
    third = transformers.SwitchTransformersConfig(num_sparse_encoder_layers=4, num_sparse_decoder_layers=4)
    with pytest.raises(T5ConfigError, match=r"sparse layers at \[2, 5, 8, 11\]"):
        settings_from_hf_config(third)
    with pytest.raises(T5ConfigError, match=r"sparse layers at \[2, 6, 10\]"):
        settings_from_hf_config(transformers.SwitchTransformersConfig())
    with pytest.raises(T5ConfigError, match="applies dense_act_fn 'gelu' ungated"):
        settings_from_hf_config(transformers.SwitchTransformersConfig(dense_act_fn="gelu"))


def test_settings_refuse_what_t5_does_not_compute():
    switch = SwitchConfig(num_experts=4, expert_bias=False)
    with pytest.raises(T5ConfigError, match="expert_bias=False"):
        T5Settings(vocab_size=V, switch=SwitchConfig(num_experts=4))
    with pytest.raises(T5ConfigError, match="activation='geglu_tanh'"):
        T5Settings(vocab_size=V, activation="gated-gelu", switch=switch)
    with pytest.raises(T5ConfigError, match="activation must be one of relu, gated-gelu"):
        T5Settings(vocab_size=V, activation="swiglu")
    with pytest.raises(T5ConfigError, match="set by T5Settings"):
        build_switch_t5(T5Settings(vocab_size=V), hidden_size=32)


# ---- expert parallelism -------------------------------------------------------------------------

def _forward_backward(model, data):
    enc, dec, labels, real = data
    logits = run_ours(model, enc, dec, real)
    F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1)).backward()
    stats = {(stack, n): layer.last_stats for stack, layers in switch_layers_by_stack(model).items()
             for n, layer in layers.items()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), stats, grads


def _ep_worker(rank, world_size, settings, full_state, batches, expected):
    from megatron_switch import initialize_parallel

    initialize_parallel(ep=world_size, num_experts=E, backend="gloo")
    model = build_switch_t5(settings).eval()
    model.load_state_dict(local_state_dict(model, full_state), strict=True)
    logits, stats, grads = _forward_backward(model, batches[rank])
    want_logits, want_stats, _ = expected[rank]
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    for key, stat in stats.items():
        for field in ("aux_loss", "z_loss", "tokens_per_expert"):
            torch.testing.assert_close(getattr(stat, field), getattr(want_stats[key], field), rtol=1e-5, atol=0)
    # Dense gradients are this replica's; an expert's gathers the tokens of every replica.
    sliced = {name: [local_state_dict(model, e[2])[name] for e in expected] for name in grads}
    for name, grad in grads.items():
        want = sum(sliced[name]) if ".experts." in name else sliced[name][rank]
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=name)
    assert any(".experts." in name for name in grads)


def test_expert_parallel_t5_equals_one_process(single_process_groups):
    settings = settings_for(4, 2, True, "relu")
    full_state = hf_to_ours(hf_model(4, 2, True, "relu", seed=7).state_dict(), settings)
    model = build_switch_t5(settings).eval()
    model.load_state_dict(full_state, strict=True)
    batches = [batch(seed=10 + r) for r in range(2)]
    expected = []
    for data in batches:
        model.zero_grad()
        expected.append(_forward_backward(model, data))
    counts = expected[0][1][("decoder", 2)].tokens_per_expert
    assert (counts[:E // 2].sum() > 0) and (counts[E // 2:].sum() > 0)  # tokens cross to the other rank's experts
    spawn(_ep_worker, 2, settings, full_state, batches, expected)
