"""Forward+backward of one Switch layer vs a dense FFN of equal FLOPs per token, and vs peers.

Each case runs in a fresh process (fp32, CPU, capacity factor 1.0); the parent writes one JSON file.
  speed:  T=4096, h=512, ffn=2048, E in {8, 64}: median step time over repetitions.
  memory: T=4096, h=512, ffn=128, E in {8, 256, 2048}: peak resident memory of one step beyond
          parameters and their (persistent) gradients.
Peers: Hugging Face SwitchTransformersSparseMLP (one sequence of T tokens, capacity T/E) and
megatron-core's MoELayer (top-1, alltoall, SequentialMLP), which needs CUDA and is recorded as
unavailable on CPU. No assertion is made on any time.

    python benchmarks/layer.py [--out benchmarks/results/layer.json] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEED = dict(tokens=4096, hidden=512, ffn=2048, experts=(8, 64))
MEMORY = dict(tokens=4096, hidden=512, ffn=128, experts=(8, 256, 2048))


def build(impl: str, tokens: int, hidden: int, ffn: int, experts: int, grads: str = "fresh"):
    """Returns (module, step) where step() runs one forward+backward.

    grads "fresh": gradients set to None before each step (PyTorch's default zero_grad).
    grads "accumulate": persistent gradient buffers, as in training with Megatron's DDP; the
    Switch banks accumulate into `main_grad` with gradient-accumulation fusion, the others
    through autograd into `.grad`.
    """
    import torch

    torch.manual_seed(0)
    x = torch.randn(tokens, 1, hidden, requires_grad=True)
    if impl == "dense":
        module = torch.nn.Sequential(torch.nn.Linear(hidden, ffn), torch.nn.ReLU(), torch.nn.Linear(ffn, hidden))
        forward = lambda: module(x)
    elif impl == "switch":
        sys.path.insert(0, ROOT)
        from megatron.core.transformer.transformer_config import TransformerConfig

        from megatron_switch import SwitchConfig, SwitchMLP

        config = TransformerConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=ffn,
                                   num_attention_heads=1, use_cpu_initialization=True,
                                   gradient_accumulation_fusion=grads == "accumulate")
        module = SwitchMLP(config, switch=SwitchConfig(num_experts=experts, capacity_factor=1.0,
                                                       min_capacity=0), ep_group=None, tp_group=None)
        if grads == "accumulate":
            for w in (module.experts.weight1, module.experts.weight2):
                w.main_grad = torch.zeros_like(w)
        forward = lambda: module(x)[0]
    elif impl == "huggingface":
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers.modeling_switch_transformers import (
            SwitchTransformersSparseMLP,
        )

        module = SwitchTransformersSparseMLP(SwitchTransformersConfig(
            d_model=hidden, d_ff=ffn, num_experts=experts, expert_capacity=tokens // experts,
            router_jitter_noise=0.01, dropout_rate=0.0))
        module.train()
        # (x + 0): HF's router multiplies its input in place, which fails on a view of a leaf.
        forward = lambda: module((x + 0).view(1, tokens, hidden))
    elif impl == "megatron-core":
        from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: F401

        if not torch.cuda.is_available():
            raise RuntimeError("megatron-core's MoELayer needs CUDA (router and dispatcher use "
                               "torch.cuda); not runnable on this CPU machine")
        raise RuntimeError("GPU peers are measured by tests/gpu/")
    else:
        raise ValueError(impl)

    def step():
        if grads == "fresh":
            module.zero_grad(set_to_none=True)
        x.grad = None
        forward().sum().backward()

    return module, step


def run_speed(impl, reps, grads, **shape):
    module, step = build(impl, grads=grads, **shape)
    step()
    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_memory(impl, **shape):
    """Peak resident memory of one step minus parameters and the gradients it creates."""
    module, step = build(impl, **shape)
    params = list(module.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    baseline = rss_bytes()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 <= baseline + (64 << 20), \
        "building the module left a high-water mark above its resident size"
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return dict(param_bytes=param_bytes, grad_bytes=grad_bytes,
                peak_beyond_params_and_grads_bytes=max(0, peak - baseline - grad_bytes),
                tensor_peak_beyond_params_and_grads_bytes=tensor_peak(step, param_bytes + grad_bytes))


def tensor_peak(step, known_bytes: int):
    """Peak bytes of live tensors during one step beyond `known_bytes`, from torch's memory
    profiler timeline; None where the timeline misses tensors the step never touched."""
    import tempfile

    import torch

    with torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    beyond = max(sum(row) for row in sizes) - known_bytes
    return beyond if beyond >= 0 else None


def child(args):
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    shape = dict(tokens=args.tokens, hidden=args.hidden, ffn=args.ffn, experts=args.experts)
    try:
        result = (run_speed(args.impl, args.reps, args.grads, **shape) if args.kind == "speed"
                  else run_memory(args.impl, **shape))
    except Exception as err:  # a peer that cannot run here is reported, not fatal
        result = dict(error=f"{type(err).__name__}: {err}")
    print(json.dumps(dict(kind=args.kind, impl=args.impl, grads=args.grads, **shape, **result)))


def spawn_case(kind, impl, reps, threads, tokens, hidden, ffn, experts, grads="fresh"):
    cmd = [sys.executable, __file__, "--child", "--kind", kind, "--impl", impl, "--reps", str(reps),
           "--grads", grads,
           "--threads", str(threads), "--tokens", str(tokens), "--hidden", str(hidden), "--ffn", str(ffn),
           "--experts", str(experts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, THP_MEM_ALLOC_ENABLE="1"))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        return dict(kind=kind, impl=impl, grads=grads, experts=experts, error=proc.stderr[-2000:])
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "layer.json"))
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("speed", "memory"))
    parser.add_argument("--impl")
    parser.add_argument("--grads", choices=("fresh", "accumulate"), default="fresh")
    for name in ("tokens", "hidden", "ffn", "experts"):
        parser.add_argument(f"--{name}", type=int)
    args = parser.parse_args()
    if args.child:
        return child(args)

    cases = []
    for grads in ("fresh", "accumulate"):
        for experts in SPEED["experts"]:
            for impl in ("dense", "switch", "huggingface", "megatron-core"):
                shape = dict(tokens=SPEED["tokens"], hidden=SPEED["hidden"], ffn=SPEED["ffn"], experts=experts)
                cases.append(spawn_case("speed", impl, args.reps, args.threads, grads=grads, **shape))
                print(json.dumps(cases[-1])[:300], flush=True)
    if not args.skip_memory:
        for experts in MEMORY["experts"]:
            for impl in ("dense", "switch", "huggingface"):
                if impl == "dense" and experts != MEMORY["experts"][0]:
                    continue
                shape = dict(tokens=MEMORY["tokens"], hidden=MEMORY["hidden"], ffn=MEMORY["ffn"], experts=experts)
                cases.append(spawn_case("memory", impl, args.reps, args.threads, **shape))
                print(json.dumps(cases[-1])[:300], flush=True)

    summary = {}
    for grads in ("fresh", "accumulate"):
        for experts in SPEED["experts"]:
            by_impl = {c["impl"]: c for c in cases if c["kind"] == "speed" and c.get("experts") == experts
                       and c.get("grads") == grads}
            for stat in ("min_s", "median_s"):  # min: best of N, the least disturbed by other load
                dense = by_impl["dense"].get(stat)
                summary[f"time_vs_dense_E{experts}_{grads}_grads_{stat[:-2]}"] = {
                    impl: (round(c[stat] / dense, 3) if stat in c and dense else c.get("error", "")[:120])
                    for impl, c in by_impl.items()}
    for impl in ("switch", "huggingface"):
        for metric in ("peak_beyond_params_and_grads_bytes", "tensor_peak_beyond_params_and_grads_bytes"):
            mem = {c["experts"]: c.get(metric) for c in cases if c["kind"] == "memory" and c["impl"] == impl}
            if mem.get(8) and mem.get(2048):
                summary[f"{impl}_{metric}_ratio_E2048_vs_E8"] = round(mem[2048] / mem[8], 3)
    report = dict(benchmark="layer", summary=summary, cases=cases,
                  machine=dict(cpu_count=os.cpu_count(), python=platform.python_version(),
                               platform=platform.platform(), threads=args.threads),
                  note="time ratios are Switch (or peer) step time / dense FFN step time; "
                       "THP_MEM_ALLOC_ENABLE=1 for every case")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
