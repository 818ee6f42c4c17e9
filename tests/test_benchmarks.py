"""The layer benchmark and the layer profile measure what they say they measure (no time is asserted):
the main_grad mode computes the kept mode's gradients, the dropped fraction read from the outputs is
the layer's own count, the ratios divide by the dense row, a peer that cannot run is refused before
any case, and the profile gives every microsecond of a step to exactly one phase without leaving its
labels on megatron_switch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
T, H, FFN, E = 256, 64, 128, 4


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


layer_bench = _load("layer")
profile_bench = _load("profile_layer")


def _build(impl: str, mode: str):
    torch.manual_seed(0)
    x = torch.randn(T, 1, H, requires_grad=True)
    return layer_bench.BUILDERS[impl](x, mode, T, H, FFN, E)


def _step(built, seed: int):
    torch.manual_seed(seed)  # the router's jitter
    built.zero_grad()
    y, loss = built.forward()
    loss.backward()
    return y


def test_main_grad_mode_accumulates_the_kept_modes_gradients_into_main_grad():
    kept, fused = _build("switch", "kept"), _build("switch-main-grad", "kept")
    assert fused.gradient_buffer_bytes == sum(p.numel() * 4 for p in fused.module.parameters())
    for seed in (1, 2):  # the second step: main_grad zeroed in place, then filled again (not doubled)
        _step(kept, seed)
        _step(fused, seed)
        for (name, p), (_, q) in zip(kept.module.named_parameters(), fused.module.named_parameters()):
            assert q.grad is None, name
            torch.testing.assert_close(q.main_grad, p.grad, msg=name)


def test_dropped_fraction_from_outputs_is_the_layers_own_count():
    built = _build("switch", "none")
    y = _step(built, 1)
    dropped = layer_bench.dropped_by_output(y)
    assert dropped > 0  # capacity factor 1.0 with an untrained router drops tokens
    assert dropped == pytest.approx(built.own_dropped(), abs=0.5 / T)


def test_ratios_divide_by_the_dense_row_of_the_same_mode_and_expert_count():
    def case(impl, mode, experts, times):
        return dict(kind="speed", impl=impl, mode=mode, experts=experts, times_s=times, min_s=min(times),
                    median_s=sorted(times)[len(times) // 2], dropped_fraction=None, own_dropped_fraction=None,
                    peak_rss_beyond_start_bytes=0, peak_rss_beyond_params_and_grads_bytes=0)
    cases = [case("dense", "none", 8, [0.2, 0.4, 0.3]), case("switch", "none", 8, [0.3, 0.5, 0.4]),
             case("dense", "kept", 8, [1.0, 1.0, 1.0]), case("switch", "kept", 8, [1.5, 2.0, 2.5])]
    summary = layer_bench.summarize(cases, [8], ["none", "kept"])
    assert summary["speed_E8_grads_none"]["switch"]["vs_dense_min"] == 1.5
    assert summary["speed_E8_grads_none"]["switch"]["vs_dense_median"] == pytest.approx(4 / 3, abs=1e-3)
    assert summary["speed_E8_grads_kept"]["switch"]["vs_dense_min"] == 1.5


def test_a_peer_that_cannot_be_imported_is_refused_before_the_first_case(tmp_path):
    """Without DeepSpeed (its import blocked the way Python documents: a None in sys.modules) the
    benchmark stops at once, names what is missing, how to install it and the --only that runs the
    rest, and writes no report."""
    out = tmp_path / "layer.json"
    code = ("import runpy, sys; sys.modules['deepspeed'] = None; "
            f"sys.argv = ['layer.py', '--out', {str(out)!r}]; "
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'layer.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "deepspeed needs deepspeed" in done.stderr and '-e ".[bench]"' in done.stderr, done.stderr
    assert "--only switch,switch-main-grad,huggingface,megatron-core" in done.stderr, done.stderr
    assert "huggingface needs" not in done.stderr and done.stdout == "" and not out.exists()


def test_profile_gives_each_microsecond_of_a_step_to_one_phase():
    from megatron_switch import layer

    original = layer.SwitchMLP.__dict__["forward"]
    built = _build("switch", "kept")
    _step(built, 1)
    record = torch.profiler.record_function
    with profile_bench.labels(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with record("step: zero_grad"):
            built.zero_grad()
        with record("step: forward"):
            _, loss = built.forward()
        with record("step: backward"):
            loss.backward()
    assert layer.SwitchMLP.__dict__["forward"] is original  # the labels are gone again

    found = profile_bench.attribute(prof.events())
    step_us = sum(e.cpu_time_total for e in prof.events() if e.name.startswith("step: "))
    attributed_us = sum(sum(phases.values()) for phases in found["per_phase"].values())
    assert attributed_us == pytest.approx(step_us, rel=1e-6)
    forward, backward = found["per_phase"]["forward"], found["per_phase"]["backward"]
    assert {"router", "sort/queue", "dispatch", "expert GEMMs", "activation", "combine"} <= set(forward)
    assert {"router", "dispatch", "expert GEMMs", "expert GEMMs (weight gradient)", "activation", "combine",
            "weight-gradient accumulation"} <= set(backward)
    assert "expert GEMMs (weight gradient)" not in forward
    assert set(forward) | set(backward) <= set(profile_bench.PHASES)
