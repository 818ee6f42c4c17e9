"""Bad configurations and layouts fail early with a message that says what to change."""

from __future__ import annotations

import argparse

import pytest
import torch.distributed as dist

from megatron_switch import (LayoutError, SwitchConfig, SwitchConfigError, add_switch_args,
                             initialize_parallel, validate_layout)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(num_experts=0), "--num-experts must be a positive integer"),
    (dict(num_experts=8, capacity_factor=float("nan")), "--moe-expert-capacity-factor must be a number"),
    (dict(num_experts=8, eval_capacity_factor=float("inf")), "--switch-eval-capacity-factor must be a number"),
    (dict(num_experts=8, activation="tanh"), "unknown expert activation 'tanh': use one of relu, gelu"),
    (dict(num_experts=8, drop_policy="random"), "--moe-token-drop-policy must be one of"),
    (dict(num_experts=8, jitter_eps=1.5), "--moe-input-jitter-eps must be in [0, 1)"),
    (dict(num_experts=8, expert_dropout=1.0), "--switch-expert-dropout must be in [0, 1)"),
    (dict(num_experts=8, init_scale=0.0), "--switch-init-scale must be > 0"),
    (dict(num_experts=8, expert_interval=0), "--moe-layer-freq"),
    (dict(num_experts=8, capacity_factor=None, pad_to_capacity=True),
     "--moe-pad-expert-input-to-capacity pads to the capacity, and dropless training has none"),
])
def test_bad_switch_config_says_what_to_change(kwargs, fragment):
    with pytest.raises(SwitchConfigError, match=None) as err:
        SwitchConfig(**kwargs)
    assert fragment in str(err.value)


def test_capacity_formula_and_dropless():
    c = SwitchConfig(num_experts=8, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4)
    assert c.capacity(1024, training=True) == 160  # ceil(1.25 * 1024 / 8)
    assert c.capacity(1024, training=False) == 256
    assert c.capacity(8, training=True) == 4  # min_capacity
    assert SwitchConfig(num_experts=8, capacity_factor=None).capacity(1024, True) is None
    assert SwitchConfig(num_experts=8, capacity_factor=0.0).capacity(1024, True) is None
    # megatron-core reads a negative factor as None (Megatron-LM scripts pass -1 for dropless)
    assert SwitchConfig(num_experts=8, capacity_factor=-1.0).capacity(1024, True) is None
    assert SwitchConfig(num_experts=8, eval_capacity_factor=-1.0).capacity(1024, False) is None


@pytest.mark.parametrize("layout,fragment", [
    (dict(world_size=4, ep=3, num_experts=8), "--num-experts 8 is not divisible by --expert-model-parallel-size 3"
                                              ": each rank must hold the same number of experts; use "
                                              "--expert-model-parallel-size 2"),
    (dict(world_size=6, tp=4, num_experts=8), "world size 6 is not divisible by TP x PP = 4 x 1 = 4"),
    (dict(world_size=4, ep=8, num_experts=8), "world size 4 is not divisible by ETP x EP x PP = 1 x 8 x 1 = 8"),
    (dict(world_size=4, pp=2, ep=4, num_experts=8), "use --expert-model-parallel-size 2"),
    (dict(world_size=4, ep=2), "--expert-model-parallel-size 2 needs --num-experts"),
    (dict(world_size=0), "world size must be a positive integer"),
])
def test_invalid_layouts_name_the_constraint_and_an_alternative(layout, fragment):
    with pytest.raises(LayoutError) as err:
        validate_layout(**layout)
    assert fragment in str(err.value)
    # The suggested alternative is itself valid.
    message = str(err.value)
    if "use --expert-model-parallel-size" in message:
        ep = int(message.rsplit("--expert-model-parallel-size ", 1)[1].split()[0])
        validate_layout(**{**layout, "ep": ep})


def test_valid_layouts_report_dp_and_expert_dp():
    layout = validate_layout(8, tp=2, pp=1, ep=4, num_experts=16)
    assert (layout.dp, layout.expert_dp) == (4, 2)
    layout = validate_layout(16, tp=2, pp=2, ep=2, num_experts=2048)
    assert (layout.dp, layout.expert_dp) == (4, 4)


def test_world_size_mismatch_fails_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LayoutError, match="world size 3 is not divisible by TP x PP = 2 x 1 = 2"):
        initialize_parallel(tp=2, ep=1, num_experts=8, backend="gloo")
    assert not dist.is_initialized()
    with pytest.raises(LayoutError, match="not divisible by --expert-model-parallel-size 3"):
        initialize_parallel(tp=1, ep=3, num_experts=8, backend="gloo")
    assert not dist.is_initialized()


def test_flags_parse_into_config_with_paper_defaults():
    parser = add_switch_args(argparse.ArgumentParser())
    args = parser.parse_args(["--moe-switch", "--num-experts", "64", "--moe-layer-freq", "2",
                              "--moe-z-loss-coeff", "1e-3", "--switch-expert-activation", "geglu"])
    c = SwitchConfig.from_args(args)
    assert (c.num_experts, c.expert_interval, c.z_loss_coeff, c.activation) == (64, 2, 1e-3, "geglu")
    assert (c.capacity_factor, c.eval_capacity_factor, c.aux_loss_coeff, c.jitter_eps, c.init_scale) == \
        (1.25, 2.0, 1e-2, 1e-2, 0.1)
    assert [c.is_switch_layer(n) for n in range(1, 5)] == [False, True, False, True]
    for flags in (["--switch-dropless"], ["--moe-expert-capacity-factor", "-1"], ["--moe-expert-capacity-factor", "0"]):
        dropless = SwitchConfig.from_args(parser.parse_args(["--num-experts", "8", *flags]))
        # dropless training evaluates dropless too, unless the eval factor is given
        assert dropless.capacity(100, True) is None and dropless.capacity(100, False) is None, flags
    eval_given = SwitchConfig.from_args(parser.parse_args(["--num-experts", "8", "--switch-dropless",
                                                           "--switch-eval-capacity-factor", "1.5"]))
    assert eval_given.capacity(80, False) == 15
    assert (c.pad_to_capacity, c.pads_to_capacity("cuda"), c.pads_to_capacity("cpu")) == (None, True, False)
    padded = SwitchConfig.from_args(parser.parse_args(["--num-experts", "8", "--moe-pad-expert-input-to-capacity"]))
    assert padded.pads_to_capacity("cpu")
    with pytest.raises(SwitchConfigError, match="--moe-switch needs --num-experts"):
        SwitchConfig.from_args(parser.parse_args(["--moe-switch"]))


def test_flags_megatron_lm_already_has_are_not_redefined():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-experts", type=int, default=None)  # as Megatron-LM defines it
    parser.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    add_switch_args(parser)  # would raise argparse.ArgumentError on a duplicate
    args = parser.parse_args(["--moe-switch", "--num-experts", "8"])
    assert args.moe_switch and args.num_experts == 8
