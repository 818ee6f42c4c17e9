"""Where a step of our Switch layer spends its time, by phase, from torch.profiler on CPU.

The layer is built as benchmarks/layer.py builds it (fp32, T=4096, h=512, ffn=2048, capacity factor
1.0, no biases, the kept-tokens path) at E in {8, 64}, in three gradient modes: "none" (grads set to
None), "kept" (persistent .grad) and "main-grad" (megatron-core DDP's main_grad buffers with
gradient-accumulation fusion). Each (E, mode) runs in a fresh process: warm-up steps, then the
profiled steps, then as many unprofiled steps for the wall time the profiler's own cost is judged by.

Phases are record_function labels put on from this script, in its own process only (nothing in
megatron_switch/ is edited): wrappers around the router's forward, the queue positions, the
dispatchers, the packing of grouped rows into a batch and back, the expert GEMMs (batched or grouped,
and the weight-gradient forms, which add in place into main_grad or a kept .grad where they can), the
activation, gather_scale and the wgrad hand-off (`_accumulated_wgrad`, a temporary added afterwards).
Every profiler event's own (self) time goes to its nearest labelled ancestor; in backward, an autograd
node without a label inside goes to the phase of the forward op that created it (matched by sequence
number), and AccumulateGrad nodes (adding into .grad, or the DDP hook adding into main_grad) to
weight-gradient accumulation.

    python benchmarks/profile_layer.py [--experts 8,64] [--modes none,kept,main-grad] [--steps 3]
        [--out benchmarks/results/profile_layer.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = ("none", "kept", "main-grad")
PREFIX = "phase: "
PHASES = ("router", "sort/queue", "dispatch", "batch packing", "expert GEMMs", "expert GEMMs (weight gradient)",
          "activation", "experts (other)", "combine", "weight-gradient accumulation", "zero grads", "layer (other)",
          "outside the layer")
ACCUMULATE_GRAD = "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad"
EVALUATE = "autograd::engine::evaluate_function: "


def _label(phase: str, fn):
    import torch

    @functools.wraps(fn)
    def labelled(*args, **kwargs):
        with torch.profiler.record_function(PREFIX + phase):
            return fn(*args, **kwargs)

    return labelled


LABELLED = (  # (module or class in megatron_switch, attribute, phase)
    ("layer", "SwitchMLP.forward", "layer (other)"),
    ("router", "SwitchRouter.forward", "router"),
    ("router", "queue_positions", "sort/queue"),
    ("dispatch", "GroupedDispatcher.dispatch", "dispatch"),
    ("dispatch", "CapacityDispatcher.dispatch", "dispatch"),
    ("dispatch", "GroupedDispatcher.combine", "combine"),
    ("dispatch", "CapacityDispatcher.combine", "combine"),
    ("layer", "gather_scale", "combine"),  # layer.py's own name for it
    ("experts.torch_bank", "TorchExperts.forward", "experts (other)"),
    ("experts.torch_bank", "TorchExperts._project", "expert GEMMs"),
    ("experts.torch_bank", "rows_to_slots", "batch packing"),
    ("experts.torch_bank", "slots_to_rows", "batch packing"),
    ("experts.base", "ExpertBank._ffn_tail", "activation"),
    ("ops.projections", "grouped_rows_mm", "expert GEMMs"),
    ("ops.projections", "grouped_outer_mm", "expert GEMMs (weight gradient)"),
    ("ops.projections", "grouped_outer_mm_add_", "expert GEMMs (weight gradient)"),
    ("ops.projections", "bank_wgrad", "expert GEMMs (weight gradient)"),
    ("ops.projections", "bank_mm", "expert GEMMs"),  # the fused ReLU bank's own calls (BankReluFFN)
    ("ops.projections", "bank_dgrad", "expert GEMMs"),
    ("ops.projections", "relu_", "activation"),
    ("ops.projections", "relu_backward_", "activation"),
    ("ops.projections", "_accumulated_wgrad", "weight-gradient accumulation"),
)


@contextlib.contextmanager
def labels():
    """Wrap the layer's pieces in record_function labels while the block runs, then put the
    originals back (so importing or calling this leaves megatron_switch as it was)."""
    import importlib

    saved = []
    try:
        for module_name, path, phase in LABELLED:
            owner = importlib.import_module(f"megatron_switch.{module_name}")
            *outer, name = path.split(".")
            for part in outer:
                owner = getattr(owner, part)
            original = owner.__dict__[name]
            saved.append((owner, name, original))
            setattr(owner, name, _label(phase, original))
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def attribute(events) -> Dict:
    """{direction: {phase: microseconds}} and {phase: {op: microseconds}} from profiler events."""
    forward_phase_of_seq = {}  # sequence number -> phase of the forward op that created that node
    last_start = {}
    per_phase = collections.defaultdict(lambda: collections.defaultdict(float))
    ops = collections.defaultdict(lambda: collections.defaultdict(float))

    def nearest_label(event) -> Optional[str]:
        for a in _ancestors(event):
            if a.name.startswith(PREFIX):
                return a.name[len(PREFIX):]
        return None

    def direction(event) -> Optional[str]:
        for a in _ancestors(event):
            if a.name.startswith("step: "):
                return a.name[len("step: "):]
        return None

    events = sorted(events, key=lambda e: e.time_range.start)
    for e in events:  # forward ops: the last op holding a sequence number created that node
        if direction(e) == "forward" and e.sequence_nr >= 0:
            if e.time_range.start >= last_start.get(e.sequence_nr, -1):
                last_start[e.sequence_nr] = e.time_range.start
                forward_phase_of_seq[e.sequence_nr] = nearest_label(e) or "outside the layer"
    for e in events:
        d = direction(e)
        if d is None:
            continue
        phase = nearest_label(e)
        if phase is None and d == "backward":
            for a in _ancestors(e):
                if a.name == ACCUMULATE_GRAD:
                    phase = "weight-gradient accumulation"
                    break
                if a.name.startswith(EVALUATE):
                    phase = forward_phase_of_seq.get(a.sequence_nr)
                    break
        if d == "zero_grad":
            phase, d = "zero grads", "forward"
        phase = phase or "outside the layer"
        per_phase[d][phase] += e.self_cpu_time_total
        if not e.name.startswith(PREFIX) and not e.name.startswith("step: "):
            ops[phase][e.name] += e.self_cpu_time_total
    return dict(per_phase=per_phase, ops=ops)


def load_layer_benchmark():
    """benchmarks/layer.py as a module (the same construction of the layer as the benchmark's)."""
    spec = importlib.util.spec_from_file_location("benchmarks_layer", os.path.join(HERE, "layer.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def profile_case(case: Dict) -> Dict:
    import torch

    layer_bench = load_layer_benchmark()
    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    tokens, hidden, ffn, experts = case["tokens"], case["hidden"], case["ffn"], case["experts"]
    x = torch.randn(tokens, 1, hidden, requires_grad=True)
    main_grad = case["mode"] == "main-grad"
    built = layer_bench.build_switch(x, "kept" if main_grad else case["mode"], tokens, hidden, ffn, experts,
                                     main_grad=main_grad)
    rf = torch.profiler.record_function

    def step():
        with rf("step: zero_grad"):
            built.zero_grad()
            x.grad = None
        with rf("step: forward"):
            y, loss = built.forward()
        with rf("step: backward"):
            loss.backward()

    for _ in range(case["warmup"]):
        step()
    with labels(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(case["steps"]):
            step()
        profiled_s = (time.perf_counter() - start) / case["steps"]
    plain = []
    for _ in range(case["steps"]):
        start = time.perf_counter()
        step()
        plain.append(time.perf_counter() - start)
    found = attribute(prof.events())
    n = case["steps"]
    phases = {}
    total_us = sum(sum(v.values()) for v in found["per_phase"].values())
    for phase in PHASES:
        fwd = found["per_phase"]["forward"].get(phase, 0.0) / n / 1e3
        bwd = found["per_phase"]["backward"].get(phase, 0.0) / n / 1e3
        if fwd or bwd:
            top = sorted(found["ops"][phase].items(), key=lambda kv: -kv[1])[:5]
            phases[phase] = dict(forward_ms=round(fwd, 2), backward_ms=round(bwd, 2),
                                 share=round((fwd + bwd) * 1e3 * n / total_us, 4),
                                 top_ops_ms={name: round(us / n / 1e3, 2) for name, us in top})
    return dict(case, settings=built.settings, phases=phases,
                attributed_ms_per_step=round(total_us / n / 1e3, 1),
                profiled_step_ms=round(1e3 * profiled_s, 1),
                unprofiled_step_ms=dict(min=round(1e3 * min(plain), 1),
                                        median=round(1e3 * statistics.median(plain), 1)),
                dropped_fraction=float(built.module.last_stats.dropped_fraction))


def child(case: Dict) -> None:
    warnings.filterwarnings("ignore")
    try:
        result = profile_case(case)
    except Exception as err:
        result = dict(case, error=f"{type(err).__name__}: {err}")
    print(json.dumps(result), flush=True)


def print_table(result: Dict) -> None:
    print(f"\nE={result['experts']} grads {result['mode']} (T={result['tokens']}): "
          f"{result['attributed_ms_per_step']} ms attributed per step, profiled step "
          f"{result['profiled_step_ms']} ms, unprofiled min/median {result['unprofiled_step_ms']['min']}/"
          f"{result['unprofiled_step_ms']['median']} ms, dropped {result['dropped_fraction']:.4f}")
    print(f"  {'phase':32s} {'ms fwd':>8s} {'ms bwd':>8s} {'share':>7s}  top ops (ms)")
    for phase, row in result["phases"].items():
        top = ", ".join(f"{k} {v}" for k, v in list(row["top_ops_ms"].items())[:3])
        print(f"  {phase:32s} {row['forward_ms']:8.2f} {row['backward_ms']:8.2f} {100 * row['share']:6.1f}%  {top}")


def comma_list(value: str, allowed, kind=str) -> List:
    items = [kind(v) for v in value.split(",") if v]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
    return items


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "profile_layer.json"))
    parser.add_argument("--experts", type=lambda v: comma_list(v, None, int), default=[8, 64])
    parser.add_argument("--modes", type=lambda v: comma_list(v, MODES), default=list(MODES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (and as many unprofiled ones)")
    args = parser.parse_args()
    results = []
    for experts in args.experts:
        for mode in args.modes:
            case = dict(experts=experts, mode=mode, tokens=args.tokens, hidden=args.hidden, ffn=args.ffn,
                        threads=args.threads, warmup=args.warmup, steps=args.steps)
            result = load_layer_benchmark().spawn_case(case, script=__file__)
            result["load_at_start"] = [round(v, 2) for v in os.getloadavg()]
            results.append(result)
            if "error" in result:
                print(f"E={experts} {mode}: {result['error'][-500:]}", flush=True)
            else:
                print_table(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(benchmark="profile_layer", results=results,
                       note="ms per step (mean over the profiled steps) of CPU self time attributed to each "
                            "phase; share of the attributed total; 'zero grads' runs before the forward and "
                            "is listed in its column"), f, indent=2)


if __name__ == "__main__":
    main()
