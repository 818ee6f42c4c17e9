"""GPU checks on one Hopper GPU (H100/H200), printed as one summary table and written as JSON.

1. fp8_vs_bf16: a Switch layer with FP8 expert GEMMs (torch backend, hybrid, tensorwise) against the
   same layer in bf16: identical routing, outputs and gradients within the stated tolerances.
   grouped_mm_cuda: torch._grouped_mm on the GPU (bf16, Hopper) against a GEMM per expert for one
   grouped projection, uneven and empty groups included: outputs and gradients within 1%, the empty
   expert's weight gradient exactly zero; the time of each.
   kept_tokens_vs_padded: the kept-tokens expert path (grouped GEMMs, torch._grouped_mm turned on for
   CUDA; the CPU default) against the
   padded one (every capacity slot, the GPU default) at capacity factor 1.0 with drops: outputs and
   all gradients within 2% (bf16).
2. router_fp32: under --bf16 (Float16Module) and FP8, the router weight, its gradient, the gates
   and the logsumexp stay float32 (checked with a forward hook).
3. train_bf16 / train_bf16_local_ddp / train_fp8: `megatron-switch train` for a few dozen steps on
   the GPU (NCCL, one rank) with --bf16 (megatron-core's DDP, the default on GPU), the same with
   --ddp-impl local (the hand-written reduction: the losses must agree), and with --fp8-format hybrid:
   the loss falls, a checkpoint is saved. Every run goes through megatron-core's schedules.
   train_bf16_zero1: --use-distributed-optimizer on megatron-core's DDP in its distributed-optimizer
   mode (reduce-scatter, pieces, all-gather over NCCL; one rank: its shard is every parameter, so
   the losses must equal train_bf16's).
4. throughput: forward+backward of one layer at the same shapes: a dense FFN of equal FLOPs per
   token, our Switch layer in bf16 (padded; kept tokens with grouped GEMMs and with a GEMM per expert)
   and FP8, megatron-core's MoELayer
   (top-1, alltoall dispatcher, SequentialMLP experts); tokens/s and % of the 790 TFLOP/s bf16 peak.

Each check runs even when an earlier one failed; its error is recorded. Not a pytest module: run
through tests/gpu/run.sh (it needs a GPU; on CPU it exits at once saying so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

from megatron_switch.ops.projections import GroupedProjection, grouped_mm_fits
from tests.helpers import counting_grouped_mm

PEAK_BF16_TFLOPS = 790.0
TOLERANCE = {"output": 0.10, "input_grad": 0.25, "weight_grad": 0.25}  # relative error, norm-wise

RESULTS: dict = {}


OUT_DIR = "/tmp/gpu-out"


def check(fn):
    """Run one check, record its result or error, and rewrite gpu_checks.json at once, so a run cut
    short still leaves every finished check's result."""
    def run(*args, **kwargs):
        start = time.time()
        try:
            RESULTS[fn.__name__] = {"ok": True, **(fn(*args, **kwargs) or {})}
        except Exception as err:  # recorded; the other checks still run
            RESULTS[fn.__name__] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                    "trace": traceback.format_exc()[-3000:]}
        RESULTS[fn.__name__]["seconds"] = round(time.time() - start, 1)
        print(f"[{fn.__name__}] {json.dumps({k: v for k, v in RESULTS[fn.__name__].items() if k != 'trace'})}",
              flush=True)
        _write_results()
    return run


def _write_results():
    path = os.path.join(OUT_DIR, "gpu_checks.json")
    with open(path + ".tmp", "w") as f:
        json.dump(RESULTS, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _init_single_rank():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_switch.parallel import initialize_parallel

    initialize_parallel(1, 1, 1, 8)
    model_parallel_cuda_manual_seed(1234)


def _config(hidden, ffn, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=8,
                             bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0,
                             attention_dropout=0.0, **extra)


def _switch_layer(hidden, ffn, experts, **switch):
    from megatron_switch import SwitchConfig, SwitchMLP

    cfg = SwitchConfig(num_experts=experts, expert_backend="torch", **switch)
    return SwitchMLP(_config(hidden, ffn), switch=cfg).cuda()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _same_input_twice(reference: dict, other: dict):
    """Two Switch layers with the same weights (SwitchConfig extras `reference` and `other`) on the
    same bf16 input; for each: output, input, expert-weight and router gradients of mean(y^2), load."""
    torch.manual_seed(0)
    hidden, ffn, experts = 1024, 4096, 8
    layers = [_switch_layer(hidden, ffn, experts, jitter_eps=0.0, **extra) for extra in (reference, other)]
    with torch.no_grad():  # (biases start at zero: draw them, so their gradients mean something)
        layers[0].experts.bias1.normal_(std=0.02)
        layers[0].experts.bias2.normal_(std=0.02)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(1024, 8, hidden, device="cuda", dtype=torch.bfloat16)
    results = []
    for layer in layers:
        xr = x.clone().requires_grad_()
        y, _ = layer(xr)
        y.float().square().mean().backward()
        results.append(dict(y=y.detach(), dx=xr.grad, w1=layer.experts.weight1.grad, w2=layer.experts.weight2.grad,
                            b1=layer.experts.bias1.grad, b2=layer.experts.bias2.grad,
                            router=layer.router.weight.grad, load=layer.last_stats.tokens_per_expert,
                            dropped=float(layer.last_stats.dropped_fraction)))
    return results


@check
def fp8_vs_bf16():
    r, f = _same_input_twice({}, {"fp8_format": "hybrid"})
    errors = {"output": _rel(f["y"], r["y"]), "input_grad": _rel(f["dx"], r["dx"]),
              "weight_grad": max(_rel(f["w1"], r["w1"]), _rel(f["w2"], r["w2"])),
              "router_grad": _rel(f["router"], r["router"])}
    same_routing = bool(torch.equal(f["load"], r["load"]))
    failed = [k for k, bound in TOLERANCE.items() if not errors[k] < bound]
    if failed or not same_routing:
        raise AssertionError(f"FP8 vs bf16 errors {errors} (bounds {TOLERANCE}), same routing {same_routing}")
    return {"errors": {k: round(v, 4) for k, v in errors.items()}, "tolerance": TOLERANCE,
            "same_routing": same_routing}


@check
def kept_tokens_vs_padded():
    """The kept-tokens expert path (grouped GEMMs, torch._grouped_mm on) against the padded one
    (every capacity slot, batched GEMM): same outputs and gradients up to bf16 GEMM round-off."""
    padded, kept = _same_input_twice({"pad_to_capacity": True, "capacity_factor": 1.0},
                                     {"pad_to_capacity": False, "capacity_factor": 1.0, "grouped_gemm": True})
    errors = {name: _rel(kept[name], padded[name]) for name in ("y", "dx", "w1", "w2", "b1", "b2", "router")}
    if max(errors.values()) > 0.02 or not kept["dropped"] > 0:
        raise AssertionError(f"kept-tokens vs padded: relative errors {errors} (bound 0.02), dropped "
                             f"{kept['dropped']} (the case must drop tokens)")
    return {"errors": {k: round(v, 5) for k, v in errors.items()}, "dropped": round(kept["dropped"], 4)}


@check
def grouped_mm_cuda():
    """torch._grouped_mm on the GPU (the kept-tokens projections' kernel there) against a GEMM per
    expert: outputs and all gradients of a grouped projection at the throughput shape, uneven and
    empty groups included; and the time of each."""
    hidden, ffn, counts = 2048, 8192, [2900, 0, 1, 2047, 3333, 17, 4000, 4086]
    torch.manual_seed(0)
    native = grouped_mm_fits(torch.empty(16, 16, device="cuda", dtype=torch.bfloat16),
                             torch.empty(2, 16, 16, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(sum(counts), hidden, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(len(counts), ffn, hidden, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    b = torch.randn(len(counts), ffn, device="cuda", dtype=torch.bfloat16).requires_grad_()
    upstream = torch.randn(sum(counts), ffn, device="cuda", dtype=torch.bfloat16)

    def step(xr, kernel):
        y = GroupedProjection.apply(xr, w, b, counts, False, kernel)
        (y * upstream).sum().backward()
        return y

    outcomes, times = [], {}
    with counting_grouped_mm() as calls:
        for name in ("grouped", "per_expert"):
            kernel = name == "grouped"
            w.grad = b.grad = None
            xr = x.clone().requires_grad_()
            y = step(xr, kernel)
            outcomes.append(dict(y=y.detach(), dx=xr.grad, dw=w.grad.clone(), db=b.grad.clone()))
            kernel_calls = len(calls)
            w.grad = b.grad = None
            times[name + "_ms"] = round(_time(lambda: step(x.clone().requires_grad_(), kernel)) * 1e3, 3)
            if name == "grouped" and kernel_calls != 3:  # forward, input and weight gradients
                raise AssertionError(f"torch._grouped_mm ran {kernel_calls} times, not 3: the kernel "
                                     f"was not used on this GPU (probe: {native})")
    errors = {k: _rel(outcomes[0][k], outcomes[1][k]) for k in ("y", "dx", "dw", "db")}
    empty_grad = float(outcomes[0]["dw"][1].abs().max())
    if max(errors.values()) > 0.01 or empty_grad != 0:
        raise AssertionError(f"grouped vs per expert: relative errors {errors} (bound 0.01), "
                             f"largest weight gradient of the empty expert {empty_grad} (must be 0)")
    return {"native_kernel": native, "errors": {k: round(v, 5) for k, v in errors.items()}, **times}


@check
def router_fp32():
    from megatron.core.transformer.module import Float16Module

    layer = _switch_layer(512, 2048, 8, fp8_format="hybrid")
    wrapped = Float16Module(layer.config, torch.nn.Sequential(layer))
    seen = {}

    def hook(module, inputs, routing):
        seen.update(gate=routing.gate.dtype, logsumexp=routing.logsumexp.dtype, input=inputs[0].dtype)

    layer.router.register_forward_hook(hook)
    x = torch.randn(256, 4, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, _ = wrapped.module[0](x)
    y.float().sum().backward()
    dtypes = {"router.weight": layer.router.weight.dtype, "router.weight.grad": layer.router.weight.grad.dtype,
              "experts.weight1": layer.experts.weight1.dtype, **seen, "output": y.dtype}
    bad = {k: v for k, v in dtypes.items() if k in ("router.weight", "router.weight.grad", "gate", "logsumexp")
           and v != torch.float32}
    if bad:
        raise AssertionError(f"router tensors not float32: {bad}")
    return {"dtypes": {k: str(v) for k, v in dtypes.items()}}


def _train(name, extra):
    save = f"/tmp/gpu-check-{name}"
    subprocess.run(["rm", "-rf", save], check=True)
    cmd = [sys.executable, "-m", "megatron_switch.cli", "train", "--bf16", "--moe-switch", "--num-experts", "8",
           "--moe-layer-freq", "2", "--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
           "--seq-length", "512", "--micro-batch-size", "8", "--global-batch-size", "32", "--train-iters", "40",
           "--lr", "1e-3", "--lr-warmup-iters", "5", "--log-interval", "10", "--save", save, *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    with open(os.path.join(OUT_DIR, f"train_{name}.log"), "w") as log:
        log.write(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    records = [json.loads(line) for line in open(os.path.join(save, "plots", "metrics.jsonl"))]
    first, last = records[0]["lm_loss"], records[-1]["lm_loss"]
    if not last < first:
        raise AssertionError(f"loss did not fall: {first} -> {last}")
    checkpoints = sorted(d for d in os.listdir(save) if d.startswith("iter_"))
    return {"lm_loss_first": round(first, 4), "lm_loss_last": round(last, 4),
            "lm_losses": [round(r["lm_loss"], 5) for r in records],
            "tokens_per_s": round(records[-1]["tokens_per_s"]), "checkpoints": checkpoints}


@check
def train_bf16():
    return _train("bf16", [])


@check
def train_bf16_local_ddp():
    """The hand-written gradient reduction (--ddp-impl local) on the GPU: the same losses as
    megatron-core's DDP (both accumulate micro-batches in float32; GPU kernels are not bitwise
    reproducible: agreement to 2%)."""
    result = _train("bf16-local", ["--ddp-impl", "local"])
    reference = RESULTS.get("train_bf16", {}).get("lm_losses")
    if reference:
        worst = max(abs(a - b) / b for a, b in zip(result["lm_losses"], reference))
        result["max_relative_difference_vs_megatron_ddp"] = round(worst, 5)
        if worst > 0.02:
            raise AssertionError(f"losses differ from the megatron-DDP run by {worst:.3%}: "
                                 f"{result['lm_losses']} vs {reference}")
    return result


@check
def train_bf16_zero1():
    """The sharded optimizer after megatron-core's DDP in its distributed-optimizer mode (gradients
    reduce-scattered into its buffers, parameters all-gathered from them, over NCCL): at one rank
    the same step as the plain optimizer, so the same losses."""
    result = _train("bf16-zero1", ["--use-distributed-optimizer"])
    reference = RESULTS.get("train_bf16", {}).get("lm_losses")
    if reference:
        worst = max(abs(a - b) / b for a, b in zip(result["lm_losses"], reference))
        result["max_relative_difference_vs_plain"] = worst
        if worst > 1e-3:
            raise AssertionError(f"losses differ from the plain optimizer's by {worst:.3%}: "
                                 f"{result['lm_losses']} vs {reference}")
    return result


@check
def train_fp8():
    return _train("fp8", ["--fp8-format", "hybrid"])


@check
def scaled_mm_scales():
    """Which scale tensors cuBLASLt accepts for a tensorwise FP8 GEMM (a standalone 0-d tensor, a
    view into a per-expert vector)."""
    a = torch.randn(64, 32, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(48, 32, device="cuda").to(torch.float8_e4m3fn)
    scales = torch.ones(4, device="cuda")
    outcome = {}
    for name, scale in (("standalone", torch.ones((), device="cuda")), ("view_e0", scales[0]),
                        ("view_e1", scales[1])):
        try:
            torch._scaled_mm(a, b.t(), scale_a=scale, scale_b=scale, out_dtype=torch.bfloat16)
            outcome[name] = "ok"
        except RuntimeError as err:
            outcome[name] = str(err)[:80]
    return {"accepted": outcome}


def _time(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def _megatron_moe(hidden, ffn, experts, capacity_factor):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.spec_utils import build_module

    # megatron-core 0.16.1 without Transformer Engine: the router GEMM reads a module global that is
    # only defined when TE imports (NameError otherwise); None selects its own torch fallback.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    config = _config(hidden, ffn, num_moe_experts=experts, moe_router_topk=1, moe_router_pre_softmax=True,
                     moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=1e-2,
                     moe_expert_capacity_factor=capacity_factor, moe_token_drop_policy="position",
                     add_bias_linear=False)
    spec = get_moe_module_spec(use_te=False, num_experts=experts, moe_grouped_gemm=False)
    return build_module(spec, config=config).cuda()


PROFILES: dict = {}


def _profile(name, step, steps=3):
    """Where a step's GPU time goes: the top operators by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    PROFILES[name] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)


@check
def throughput():
    seq, batch, hidden, ffn, num_experts, cf = 2048, 8, 2048, 8192, 8, 1.25
    tokens = seq * batch
    flops = 3 * 2 * 2 * tokens * hidden * ffn  # fwd + bwd of two GEMMs per token (active parameters)
    x = torch.randn(seq, batch, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rows = {}

    def measure(name, forward):
        def step():
            out = forward(x)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(torch.ones_like(out))
        seconds = _time(step)
        if name.startswith("switch"):
            _profile(name, step)
        rows[name] = {"ms": round(seconds * 1e3, 2), "tokens_per_s": round(tokens / seconds),
                      "tflops": round(flops / seconds / 1e12, 1),
                      "pct_peak": round(100 * flops / seconds / 1e12 / PEAK_BF16_TFLOPS, 1)}

    w1 = torch.randn(ffn, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(hidden, ffn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    measure("dense_ffn", lambda x: torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1)), w2))
    kept = {"pad_to_capacity": False}
    for name, switch in (("switch_bf16", {}), ("switch_bf16_kept_tokens", {**kept, "grouped_gemm": True}),
                         ("switch_bf16_kept_tokens_gemm_per_expert", {**kept, "grouped_gemm": False}),
                         ("switch_fp8", {"fp8_format": "hybrid"})):
        try:
            layer = _switch_layer(hidden, ffn, num_experts, capacity_factor=cf, expert_bias=False, **switch)
            measure(name, layer)
            del layer
        except Exception as err:
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
    try:
        measure("megatron_moe_layer", _megatron_moe(hidden, ffn, num_experts, cf))
    except Exception as err:
        rows["megatron_moe_layer"] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
    dense = rows["dense_ffn"]["ms"]
    for row in rows.values():
        if "ms" in row:
            row["vs_dense"] = round(row["ms"] / dense, 3)
    return {"shape": dict(seq=seq, batch=batch, hidden=hidden, ffn=ffn, experts=num_experts, capacity_factor=cf),
            "rows": rows}


def _print_summary():
    print("\n=== summary ===")
    for name, result in RESULTS.items():
        status = "ok " if result.get("ok") else "FAIL"
        detail = result.get("error") or {k: v for k, v in result.items() if k not in ("ok", "trace", "rows")}
        print(f"{status} {name}: {detail}")
    for name, row in RESULTS.get("throughput", {}).get("rows", {}).items():
        print(f"     {name:40s} {({k: v for k, v in row.items() if k != 'trace'})}")


def main():
    global OUT_DIR
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--part", choices=("layer", "train", "all", "summary"), default="all",
                        help="layer: the in-process layer checks and throughput (run them on an idle "
                        "machine: timings); train: the training runs (subprocesses); summary: print the "
                        "table of what gpu_checks.json holds. Each part adds to gpu_checks.json.")
    args = parser.parse_args()
    OUT_DIR = args.out
    os.makedirs(OUT_DIR, exist_ok=True)
    results_file = os.path.join(OUT_DIR, "gpu_checks.json")
    if os.path.exists(results_file):
        RESULTS.update(json.load(open(results_file)))
    if args.part == "summary":
        return _print_summary()
    if not torch.cuda.is_available():
        sys.exit("tests/gpu/check.py needs a CUDA GPU")
    import megatron.core

    RESULTS["environment"] = {"ok": True, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "megatron_core": megatron.core.__version__,
                              "capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    if args.part in ("layer", "all"):
        scaled_mm_scales()
        _init_single_rank()
        fp8_vs_bf16()
        grouped_mm_cuda()
        kept_tokens_vs_padded()
        router_fp32()
        throughput()
        with open(os.path.join(OUT_DIR, "profiles.txt"), "w") as f:
            for name, table in PROFILES.items():
                f.write(f"=== {name} ===\n{table}\n")
    if args.part in ("train", "all"):
        train_bf16()  # (the reference of the next two)
        train_bf16_zero1()
        train_fp8()
        train_bf16_local_ddp()
    if args.part == "all":
        _print_summary()


if __name__ == "__main__":
    main()
