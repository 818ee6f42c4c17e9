"""Our side of the Megatron-LM integration (CI cannot reach the Megatron-LM repository).

`megatron_lm_parser()` defines the flags our code reads exactly as Megatron-LM core_v0.16.1 does
(names, defaults, nargs); the real parser was checked by hand (see the README). Megatron-LM's
global-args accessor (`megatron.training.get_args`, not in the megatron-core wheel) is the one
piece stood in for, to hand SwitchTransformerLayer a namespace parsed by that parser.
"""

import argparse
import re
import sys
import types

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_switch import SwitchConfig, SwitchConfigError, SwitchMLP, add_switch_args
from megatron_switch.arguments import layer_freq_type, typed_dests
from megatron_switch.megatron_lm import arguments as mlm_args
from megatron_switch.megatron_lm import launch
from megatron_switch.megatron_lm.stats import switch_log_values
from megatron_switch.megatron_lm.layer import SwitchTransformerLayer
from megatron_switch.spec import get_switch_gpt_layer_spec
from tests.helpers import tiny_config


def _moe_freq(x):  # Megatron-LM's moe_freq_type: an int, or a list expression
    return eval(x) if "[" in x else int(x)


def megatron_lm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    p.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    p.add_argument("--qk-layernorm", action="store_true")
    p.add_argument("--transformer-impl", default="transformer_engine",
                   choices=["local", "transformer_engine", "inference_optimized"])
    p.add_argument("--spec", type=str, default=None, nargs="*")
    p.add_argument("--mtp-num-layers", type=int, default=None)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--moe-layer-freq", type=_moe_freq, default=1)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--moe-router-pre-softmax", action="store_true")
    p.add_argument("--moe-router-score-function", default="softmax", choices=["softmax", "sigmoid"])
    p.add_argument("--moe-router-dtype", default=None, choices=["fp32", "fp64"])
    p.add_argument("--moe-router-load-balancing-type", nargs="+", type=str, default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"])
    p.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=0.0)
    p.add_argument("--moe-z-loss-coeff", type=float, default=None)
    p.add_argument("--moe-input-jitter-eps", type=float, default=None)
    p.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    p.add_argument("--moe-token-drop-policy", default="probs", choices=["probs", "position"])
    p.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    p.add_argument("--moe-router-enable-expert-bias", action="store_true")
    p.add_argument("--moe-router-num-groups", type=int, default=None)
    p.add_argument("--moe-use-upcycling", action="store_true")
    p.add_argument("--moe-grouped-gemm", action="store_true")
    p.add_argument("--moe-token-dispatcher-type", default="allgather")
    p.add_argument("--fp8-format", default=None, choices=["e4m3", "hybrid"])
    p.add_argument("--fp8-recipe", default="delayed")
    return p


def parse(argv):
    """(namespace, typed dests) as Megatron-LM + add_switch_args would give them."""
    parser = add_switch_args(megatron_lm_parser())
    return parser.parse_args(argv), typed_dests(parser, argv)


def switch_of(argv):
    return mlm_args.switch_config(*parse(argv))


MIXTRAL = ["--num-layers", "8", "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
           "--num-experts", "8", "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff",
           "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall", "--moe-switch"]


def test_switch_flags_join_megatron_lm_parser_without_redefining_any():
    parser = megatron_lm_parser()
    before = {a.dest for a in parser._actions}
    add_switch_args(parser)  # argparse raises ArgumentError on a second definition of a flag
    added = {a.dest for a in parser._actions} - before
    assert "moe_switch" in added and "switch_eval_capacity_factor" in added
    assert not added & {"num_experts", "moe_aux_loss_coeff", "moe_layer_freq", "moe_token_drop_policy"}
    # Megatron-LM's own definitions stay in force (its nargs="+" for the aux coefficient).
    args, _ = parse(["--moe-switch", "--num-experts", "8", "--moe-aux-loss-coeff", "0.02"])
    assert args.moe_aux_loss_coeff == [0.02] and args.moe_token_drop_policy == "probs"


def test_untyped_megatron_lm_defaults_give_the_switch_defaults():
    args, typed = parse(["--num-layers", "4", "--moe-switch", "--num-experts", "8"])
    assert (args.moe_aux_loss_coeff, args.moe_token_drop_policy, args.moe_router_topk) == (0.0, "probs", 2)
    c = mlm_args.switch_config(args, typed)
    assert (c.aux_loss_coeff, c.drop_policy, c.jitter_eps, c.capacity_factor, c.eval_capacity_factor,
            c.z_loss_coeff, c.expert_interval, c.activation, c.expert_bias) == \
        (1e-2, "position", 1e-2, 1.25, 2.0, 0.0, 1, "relu", True)
    # Read as plain values (typed=None), Megatron-LM's defaults would have won: the bug this prevents.
    assert SwitchConfig.from_args(args).aux_loss_coeff == 0.0


def test_typed_values_win_even_when_equal_to_megatron_lm_defaults():
    c = switch_of(["--moe-switch", "--num-experts", "8", "--moe-aux-loss-coeff", "0.0",
                   "--moe-token-drop-policy", "probs", "--moe-input-jitter-eps=0", "--moe-z-loss-coeff", "1e-3",
                   "--moe-expert-capacity-factor", "2.0", "--switch-eval-capacity-factor", "3.0"])
    assert (c.aux_loss_coeff, c.drop_policy, c.jitter_eps, c.z_loss_coeff, c.capacity_factor,
            c.eval_capacity_factor) == (0.0, "probs", 0.0, 1e-3, 2.0, 3.0)
    assert switch_of(["--num-experts", "8", "--moe-router-load-balancing-type", "none"]).aux_loss_coeff == 0.0


def test_typed_dests_sees_only_what_was_typed():
    parser = add_switch_args(megatron_lm_parser())
    typed = typed_dests(parser, ["--num-experts=8", "--moe-switch", "--moe-aux-loss-coeff", "0",
                                 "--some-other-tool-flag", "1"])
    assert typed == {"num_experts", "moe_switch", "moe_aux_loss_coeff"}
    assert typed_dests(parser, []) == frozenset()


def test_mixtral_style_line_maps_model_flags_onto_the_experts():
    c = switch_of(MIXTRAL)
    assert (c.num_experts, c.activation, c.expert_bias, c.aux_loss_coeff) == (8, "swiglu", False, 1e-2)
    assert switch_of(MIXTRAL + ["--switch-expert-activation", "gelu"]).activation == "gelu"


@pytest.mark.parametrize("extra, message", [
    (["--moe-router-topk", "2"], "drop --moe-router-topk or set it to 1"),
    (["--moe-router-score-function", "sigmoid"], "softmax"),
    (["--moe-router-load-balancing-type", "seq_aux_loss"], "aux_loss or none"),
    (["--moe-shared-expert-intermediate-size", "64"], "no shared expert"),
    (["--moe-router-dtype", "fp64"], "float32"),
    (["--mtp-num-layers", "1"], "--mtp-num-layers"),
    (["--moe-aux-loss-coeff", "1e-2", "1e-3"], "one value"),
    (["--moe-layer-freq", "([1]+[0])*4"],
     "for the same one-in-2 ratio use --moe-layer-freq 2 (layers [2, 4, 6, 8])"),
    (["--moe-layer-freq", "[0, 1] * 3"], "has 6 entries but --num-layers is 8"),
])
def test_megatron_lm_flags_a_switch_layer_cannot_honour_are_refused(extra, message):
    with pytest.raises(SwitchConfigError, match=re.escape(message)):
        switch_of(MIXTRAL + extra)
    assert switch_of(MIXTRAL + ["--moe-router-topk", "1", "--moe-router-dtype", "fp32"]).num_experts == 8


@pytest.mark.parametrize("freq, interval", [("1", 1), ("2", 2), ("([0]*3+[1])*2", 4), ("[0,1]*4", 2),
                                            ("[0,0,1]*2+[0,0]", 3), ("[1]*8", 1)])
def test_moe_layer_freq_int_and_pattern_forms(freq, interval):
    c = switch_of(["--num-layers", "8", "--num-experts", "8", "--moe-layer-freq", freq])
    assert c.expert_interval == interval
    assert [n for n in range(1, 9) if c.is_switch_layer(n)] == list(range(interval, 9, interval))


def test_our_parser_reads_the_pattern_form_safely():
    assert layer_freq_type("([0]*3+[1])*2") == [0, 0, 0, 1] * 2 and layer_freq_type(" 3 ") == 3
    for bad in ("__import__('os')", "[2]*3", "[0]*10**9", "x", "[0, 1"):
        with pytest.raises(argparse.ArgumentTypeError):
            layer_freq_type(bad)
    args = add_switch_args(argparse.ArgumentParser()).parse_args(
        ["--num-experts", "4", "--moe-layer-freq", "([0]+[1])*2"])
    assert SwitchConfig.from_args(args).expert_interval == 2


def test_prepare_args_aligns_megatron_lm_moe_args_once():
    args, typed = parse(["--num-layers", "6", "--num-experts", "8", "--moe-layer-freq", "3", "--moe-switch"])
    switch = mlm_args.prepare_args(args, typed)
    assert args.switch is switch and switch.expert_interval == 3
    assert (args.moe_router_topk, args.moe_router_pre_softmax, args.moe_aux_loss_coeff, args.moe_z_loss_coeff) \
        == (1, True, 1e-2, None)
    assert args.moe_layer_freq == [0, 0, 1, 0, 0, 1]  # what Megatron-LM's FLOP count and MoE log read
    assert args.switch_track_names == ["switch_dropped_fraction", "switch_max_load"]
    assert mlm_args.prepare_args(args, frozenset()) is switch  # resolved once; later calls reuse it


def test_padding_to_capacity_gives_megatron_lm_the_capacity_factor_it_requires():
    from megatron.core.transformer.transformer_config import TransformerConfig

    args, typed = parse(["--num-layers", "2", "--num-experts", "4", "--moe-switch",
                         "--moe-pad-expert-input-to-capacity"])
    switch = mlm_args.prepare_args(args, typed)
    assert switch.pad_to_capacity and args.moe_expert_capacity_factor == switch.capacity_factor == 1.25
    TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, num_moe_experts=4,  # no ValueError
                      moe_expert_capacity_factor=args.moe_expert_capacity_factor,
                      moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity)


def test_transformer_impl_selects_the_dense_parts():
    assert mlm_args.use_transformer_engine(parse(["--transformer-impl", "local"])[0]) is False
    assert mlm_args.use_transformer_engine(parse([])[0]) is None  # TE where usable
    with pytest.raises(SwitchConfigError, match="no Switch spec"):
        mlm_args.use_transformer_engine(parse(["--transformer-impl", "inference_optimized"])[0])


@pytest.fixture
def megatron_lm_args(monkeypatch):
    """Megatron-LM's global args accessor (megatron.training.get_args) over a parsed namespace."""
    args, typed = parse(["--num-layers", "4", "--moe-switch", "--num-experts", "4", "--moe-layer-freq", "2",
                         "--transformer-impl", "local", "--moe-expert-capacity-factor", "1.0"])
    monkeypatch.setattr(mlm_args, "command_line_dests", lambda argv=None: typed)
    monkeypatch.setitem(sys.modules, "megatron.training", types.SimpleNamespace(get_args=lambda: args))
    return args


def _gpt(spec, config):
    torch.manual_seed(0)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16)


def test_spec_object_is_both_the_function_and_megatron_lms_spec(single_process_groups, megatron_lm_args):
    assert isinstance(get_switch_gpt_layer_spec, ModuleSpec)
    assert get_switch_gpt_layer_spec.module is SwitchTransformerLayer
    assert get_switch_gpt_layer_spec.__name__ == "get_switch_gpt_layer_spec"
    config = tiny_config(layers=4)
    switch = mlm_args.prepare_args(megatron_lm_args)
    called = get_switch_gpt_layer_spec(config, switch, use_transformer_engine=False)
    assert isinstance(called, TransformerBlockSubmodules)

    # What Megatron-LM's gpt_builder does with --spec megatron_switch.spec get_switch_gpt_layer_spec:
    # import_module(args.spec) and hand the object to GPTModel uncalled.
    from megatron.core.transformer.spec_utils import import_module

    uncalled = import_module(["megatron_switch.spec", "get_switch_gpt_layer_spec"])
    via_spec, explicit = _gpt(uncalled, config), _gpt(called, config)
    assert [type(layer.mlp).__name__ for layer in via_spec.decoder.layers] == ["MLP", "SwitchMLP"] * 2
    assert [m.switch for m in via_spec.modules() if isinstance(m, SwitchMLP)] == [switch, switch]
    via_spec.load_state_dict(explicit.state_dict(), strict=True)  # the same model, parameter for parameter
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(16).expand(2, -1)
    via_spec.eval(), explicit.eval()
    with torch.no_grad():
        torch.testing.assert_close(via_spec(tokens, positions, None), explicit(tokens, positions, None))


def test_switch_statistics_reach_megatrons_moe_tracker(single_process_groups, megatron_lm_args):
    clear_aux_losses_tracker()
    get_moe_layer_wise_logging_tracker().clear()
    model = _gpt(get_switch_gpt_layer_spec, tiny_config(layers=4)).train()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    layers = {m.layer_number: m for m in model.modules() if isinstance(m, SwitchMLP)}
    assert sorted(layers) == [2, 4]
    expected = {}
    for _ in range(2):  # two micro-batches add up, as Megatron-LM's log expects
        model(tokens, torch.arange(16).expand(2, -1), None, labels=tokens).sum().backward()
        for number, layer in layers.items():
            for name, value in switch_log_values(layer).items():
                expected[name, number] = expected.get((name, number), 0) + value
    tracker = get_moe_layer_wise_logging_tracker()
    assert set(tracker) == {"load_balancing_loss", "switch_dropped_fraction", "switch_max_load"}
    for name in tracker:
        values = tracker[name]["values"]
        assert values.shape == (4,) and values[0] == 0 and values[2] == 0
        for number in layers:
            torch.testing.assert_close(values[number - 1], expected[name, number])
    aux = layers[2].last_stats.aux_loss / layers[2].switch.aux_loss_coeff  # logged without alpha
    assert aux >= 1.0 - 1e-6  # E * sum f_i P_i is at least 1
    get_moe_layer_wise_logging_tracker().clear()


def test_launcher_strips_megatron_path_and_finds_the_checkout(tmp_path, monkeypatch, capsys):
    assert launch.split_megatron_path(["--a", "1", "--megatron-path", "/x", "--b"]) == ("/x", ["--a", "1", "--b"])
    assert launch.split_megatron_path(["--megatron-path=/y", "--b"]) == ("/y", ["--b"])
    assert launch.split_megatron_path(["--b"]) == (None, ["--b"])
    with pytest.raises(launch.MegatronLMNotFound, match="needs a directory"):
        launch.split_megatron_path(["--megatron-path"])
    (tmp_path / "megatron" / "training").mkdir(parents=True)
    (tmp_path / "pretrain_gpt.py").write_text("")
    assert launch.find_megatron_lm("pretrain_gpt.py", str(tmp_path)) == str(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert launch.find_megatron_lm("pretrain_gpt.py") == str(tmp_path)
    with pytest.raises(launch.MegatronLMNotFound, match="no Megatron-LM checkout with pretrain_t5.py"):
        launch.find_megatron_lm("pretrain_t5.py", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["pretrain_t5", "--megatron-path", str(tmp_path), "--num-layers", "2"])
    with pytest.raises(SystemExit) as exit_info:
        launch.main("pretrain_t5.py")
    assert exit_info.value.code == 2
    assert "pass --megatron-path /path/to/Megatron-LM" in capsys.readouterr().err
