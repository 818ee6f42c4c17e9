"""Switch T5: encoder and decoder specs with Switch layers every k-th layer, built into megatron-core's
T5Model and run forward and backward on CPU."""

import copy
import functools

import torch
from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset
from megatron.core.models.T5 import T5Model
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP

from megatron_switch import SwitchConfig, SwitchMLP
from megatron_switch.specs import SDPAttention
from megatron_switch.specs import get_switch_t5_layer_specs
from tests.helpers import tiny_config

VOCAB = 64


def _configs(encoder_layers=4, decoder_layers=4):
    decoder = tiny_config(layers=decoder_layers)
    encoder = copy.deepcopy(decoder)
    encoder.num_layers = encoder_layers
    return encoder, decoder


def _mlp_class(layer_spec):
    """The MLP class a layer spec builds (megatron-core >= 0.19 may give a functools.partial)."""
    mlp = layer_spec.submodules.mlp
    if isinstance(mlp, functools.partial):  # e.g. partial(MLP.as_mlp_submodule, ...): the class it binds
        return getattr(mlp.func, "__self__", mlp.func)
    return mlp.module


def test_t5_specs_put_switch_layers_at_k_2k_in_each_stack():
    encoder, decoder = _configs(encoder_layers=6, decoder_layers=4)
    switch = SwitchConfig(num_experts=4, expert_interval=2)
    enc, dec = get_switch_t5_layer_specs(encoder, decoder, switch, use_transformer_engine=False)
    assert [_mlp_class(s) is SwitchMLP for s in enc.layer_specs] == [False, True] * 3
    assert [_mlp_class(s) is SwitchMLP for s in dec.layer_specs] == [False, True] * 2
    switch_numbers = [s.submodules.mlp.params["layer_number"] for s in dec.layer_specs
                      if _mlp_class(s) is SwitchMLP]
    assert switch_numbers == [2, 4]
    for spec in enc.layer_specs + dec.layer_specs:
        if _mlp_class(spec) is not SwitchMLP:
            assert _mlp_class(spec) is MLP
    # Encoder: bidirectional self-attention; decoder: causal self-attention and cross-attention.
    enc_attention = enc.layer_specs[0].submodules.self_attention
    dec_layer = dec.layer_specs[1].submodules
    assert enc_attention.params["attn_mask_type"] == AttnMaskType.arbitrary
    assert dec_layer.self_attention.params["attn_mask_type"] == AttnMaskType.causal
    assert enc_attention.submodules.core_attention is SDPAttention
    assert dec_layer.self_attention.submodules.core_attention is SDPAttention
    assert dec_layer.cross_attention.submodules.core_attention is SDPAttention
    # Switch-C layout: every layer of both stacks.
    enc, dec = get_switch_t5_layer_specs(encoder, decoder, SwitchConfig(num_experts=4),
                                         use_transformer_engine=False)
    assert all(_mlp_class(s) is SwitchMLP for s in enc.layer_specs + dec.layer_specs)


def _batch(generator, batch=2, enc_len=12, dec_len=8):
    enc = torch.randint(1, VOCAB, (batch, enc_len), generator=generator)
    dec = torch.randint(1, VOCAB, (batch, dec_len), generator=generator)
    enc[1, -3:] = 0  # padding in the second sample
    dec[1, -2:] = 0
    labels = torch.randint(1, VOCAB, (batch, dec_len), generator=generator)
    masks = T5MaskedWordPieceDataset.config_attention_mask(enc, dec, None, None, use_local=True)
    return enc, dec, labels, masks


def _build(switch):
    encoder, decoder = _configs()
    enc, dec = get_switch_t5_layer_specs(encoder, decoder, switch, use_transformer_engine=False)
    return T5Model(config=decoder, encoder_config=encoder, transformer_encoder_layer_spec=enc,
                   transformer_decoder_layer_spec=dec, vocab_size=VOCAB, max_sequence_length=16,
                   share_embeddings_and_output_weights=True)


def test_switch_t5_forward_backward_on_cpu(single_process_groups):
    torch.manual_seed(0)
    switch = SwitchConfig(num_experts=4, expert_interval=2, capacity_factor=1.0, min_capacity=1)
    model = _build(switch)
    switch_layers = [m for m in model.modules() if isinstance(m, SwitchMLP)]
    assert len(switch_layers) == 4  # layers 2 and 4 of the encoder and of the decoder
    assert len(model.encoder.layers) == 4 and len(model.decoder.layers) == 4
    enc, dec, labels, (enc_mask, dec_mask, enc_dec_mask) = _batch(torch.Generator().manual_seed(1))

    loss = model(enc, dec, enc_mask, dec_mask, enc_dec_mask, lm_labels=labels)
    assert loss.shape == labels.shape and torch.isfinite(loss).all()
    loss.mean().backward()
    for layer in switch_layers:
        assert layer.last_stats is not None
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        assert layer.experts.weight1.grad.abs().sum() > 0 and torch.isfinite(layer.experts.weight1.grad).all()
        assert int(layer.last_stats.tokens_per_expert.sum()) in (2 * 12, 2 * 8)  # every token is routed
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_switch_t5_masks_padding_and_keeps_decoder_causal(single_process_groups):
    """A padded encoder token, and a later decoder token, change nothing the loss may see."""
    torch.manual_seed(0)
    model = _build(SwitchConfig(num_experts=4, expert_interval=2, capacity_factor=None, jitter_eps=0.0)).eval()
    enc, dec, labels, masks = _batch(torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(enc, dec, *masks, lm_labels=labels)
        enc2 = enc.clone()
        enc2[0, 3] = (enc2[0, 3] % (VOCAB - 1)) + 1  # a real token of sample 0 changes ...
        changed = model(enc2, dec, *T5MaskedWordPieceDataset.config_attention_mask(enc2, dec, None, None, True),
                        lm_labels=labels)
        dec3 = dec.clone()
        dec3[0, -1] = (dec3[0, -1] % (VOCAB - 1)) + 1  # ... the last decoder input of sample 0
        later = model(enc, dec3, *T5MaskedWordPieceDataset.config_attention_mask(enc, dec3, None, None, True),
                      lm_labels=labels)
    assert not torch.allclose(changed[0], base[0])  # the encoder token is seen by every decoder position
    torch.testing.assert_close(changed[1], base[1])  # other samples are independent (dropless routing)
    torch.testing.assert_close(later[0, :-1], base[0, :-1])  # causal: only the last position moves
    assert not torch.allclose(later[0, -1], base[0, -1])

