"""One Switch layer against a dense FFN of equal FLOPs per token and against its peers, side by side.

Implementations (`--only`): dense (the unit: ffn equal to the expert ffn, so one expert per token costs
what the dense FFN costs), switch (ours, kept tokens only on CPU), switch-main-grad (ours with
gradient-accumulation fusion into `main_grad`, as under Megatron's DDP), huggingface
(SwitchTransformersSparseMLP), deepspeed (deepspeed.moe.layer.MoE, k=1) and megatron-core (MoELayer,
top-1, allgather dispatcher, SequentialMLP). Peers that need CUDA or a process group run on CPU with
the patches each case lists under "patches", applied inside that case's process only.

Gradient modes (`--modes`): "none" (grads set to None before each step: zero_grad(set_to_none=True))
and "kept" (persistent .grad zeroed in place: zero_grad(set_to_none=False)); switch-main-grad runs in
"kept" only, with one flat main_grad buffer zeroed in place per step and a post-accumulate hook
adding every other parameter's .grad into it (megatron-core DDP's contract).

Every case is a fresh process (fp32, CPU, `--threads` threads, capacity factor 1.0, jitter 1e-2, no
biases anywhere: megatron-core's SequentialMLP cannot add an expert bias with TP=1); before each speed
case the parent waits until the CPUs were busy less than `--idle-busy` of the last 2 s (or
`--idle-wait` seconds pass) and records that share and the load average. Repetitions are separate
processes, interleaved over the cases so a drift of the machine's speed reaches every implementation
alike.
  speed:  T=4096, h=512, ffn=2048, E in {8, 64}: `--warmup` steps, then `--steps` timed steps of
          forward+backward (zeroing the gradients included); min, median, max per repetition and
          pooled, in wall time and in the process's CPU time (all threads; on a shared machine the
          steadier of the two); peak resident memory beyond the start of the steps.
  memory: T=4096, h=512, ffn=128, E in {8, 256, 2048}: peak resident memory of two steps beyond
          parameters and the gradients they leave (the second step accumulates into kept grads).
Dropped fraction: tokens whose layer output is exactly zero (a kept token's output is g * expert(x)
with g > 0), averaged over the timed steps; ours and DeepSpeed also report their own statistic.
No assertion is made on any time.

    python benchmarks/layer.py [--out benchmarks/results/layer.json] [--reps 3]
        [--only switch,deepspeed] [--experts 8] [--modes kept] [--skip-memory]
    python benchmarks/layer.py --quick   # a minute or two: every case once at T=1024, no idle waits,
                                         # memory at E in {8, 256}; writes benchmarks/results/layer_quick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # torch is imported inside each case's process
    import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("dense", "switch", "switch-main-grad", "huggingface", "deepspeed", "megatron-core")
MODES = ("none", "kept")
SPEED = dict(tokens=4096, hidden=512, ffn=2048, experts=(8, 64))
MEMORY = dict(tokens=4096, hidden=512, ffn=128, experts=(8, 256, 2048))
CAPACITY_FACTOR = 1.0
JITTER_EPS = 1e-2
AUX_LOSS_COEFF = 1e-2
MEMORY_STEPS = 2
# The modules each implementation's case imports (`pip install -e ".[bench]"` brings the peers').
NEEDS = {"dense": ("torch",), "switch": ("torch", "megatron.core"), "switch-main-grad": ("torch", "megatron.core"),
         "huggingface": ("torch", "transformers"), "deepspeed": ("torch", "deepspeed"),
         "megatron-core": ("torch", "megatron.core")}


def impl_modes(impl: str) -> Tuple[str, ...]:
    """The gradient modes an implementation runs in: main_grad fusion only with persistent buffers."""
    return ("kept",) if impl == "switch-main-grad" else MODES


# ---------------------------------------------------------------------------------------------------
# Building one implementation (inside the child process)


@dataclasses.dataclass
class Built:
    """One implementation, ready to step.

    forward() -> (output [T, h], loss): the loss is output.sum() plus whatever auxiliary loss the
    implementation hands back instead of attaching it to its output. zero_grad(): the mode's zeroing.
    own_dropped(): the implementation's own dropped-token fraction of the last forward, where it has one.
    """

    module: "torch.nn.Module"
    forward: Callable
    zero_grad: Callable[[], None]
    settings: Dict
    patches: List[str] = dataclasses.field(default_factory=list)
    own_dropped: Optional[Callable[[], float]] = None
    gradient_buffer_bytes: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_group(env: Dict[str, str]) -> None:
    """RANK/WORLD_SIZE/MASTER_* for a world of one process (this one)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", **env)


def _zeroing(module, mode: str) -> Callable[[], None]:
    return lambda: module.zero_grad(set_to_none=(mode == "none"))


def _megatron_ddp_buffers(module) -> Tuple[Callable[[], None], int]:
    """megatron-core DDP's gradient contract on one process: every parameter gets a `main_grad` view
    into one flat float32 buffer; a post-accumulate hook adds .grad into it (unless the op already
    wrote there: `grad_added_to_main_grad`) and drops .grad. Returns (zero_grad, buffer bytes)."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
    offset = 0
    for p in params:
        p.main_grad = flat[offset:offset + p.numel()].view_as(p)
        p.grad_added_to_main_grad = False
        offset += p.numel()

        def hook(param):
            if param.grad is not None and not param.grad_added_to_main_grad:
                param.main_grad.add_(param.grad)
            param.grad = None

        p.register_post_accumulate_grad_hook(hook)

    def zero_grad():
        flat.zero_()
        for p in params:
            p.grad = None
            p.grad_added_to_main_grad = False

    return zero_grad, flat.numel() * flat.element_size()


def build_dense(x, mode, tokens, hidden, ffn, experts) -> Built:
    import torch

    module = torch.nn.Sequential(torch.nn.Linear(hidden, ffn, bias=False), torch.nn.ReLU(),
                                 torch.nn.Linear(ffn, hidden, bias=False))

    def forward():
        y = module(x.view(tokens, hidden))
        return y, y.sum()

    return Built(module, forward, _zeroing(module, mode), dict(note="Linear(h, ffn) -> ReLU -> Linear(ffn, h)"))


def build_switch(x, mode, tokens, hidden, ffn, experts, main_grad: bool = False) -> Built:
    sys.path.insert(0, ROOT)
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_switch import SwitchConfig, SwitchMLP

    config = TransformerConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=1,
                               use_cpu_initialization=True, add_bias_linear=False,
                               gradient_accumulation_fusion=main_grad)
    switch = SwitchConfig(num_experts=experts, capacity_factor=CAPACITY_FACTOR,
                          eval_capacity_factor=CAPACITY_FACTOR, min_capacity=0, expert_bias=False,
                          jitter_eps=JITTER_EPS, aux_loss_coeff=AUX_LOSS_COEFF)
    module = SwitchMLP(config, switch=switch, ep_group=None, tp_group=None)
    module.train()
    zero_grad, buffer_bytes = (_megatron_ddp_buffers(module) if main_grad else (_zeroing(module, mode), 0))

    def forward():
        y = module(x)[0].view(tokens, hidden)
        return y, y.sum()

    settings = dict(capacity=switch.capacity(tokens, True), min_capacity=0, drop_policy=switch.drop_policy,
                    jitter_eps=JITTER_EPS, aux_loss_coeff=AUX_LOSS_COEFF,
                    pads_to_capacity=switch.pads_to_capacity("cpu"),
                    gradient_accumulation_fusion=main_grad,
                    note=("experts compute the kept tokens only (grouped GEMM)"
                          if not switch.pads_to_capacity("cpu") else "experts compute all E x C slots"))
    if main_grad:
        settings["main_grad"] = ("one flat float32 buffer zeroed in place per step; the expert banks' weight "
                                 "gradients accumulate into it inside backward, the other parameters' .grad "
                                 "through a post-accumulate hook (megatron-core DDP's contract)")
    return Built(module, forward, zero_grad, settings,
                 own_dropped=lambda: float(module.last_stats.dropped_fraction), gradient_buffer_bytes=buffer_bytes)


def build_huggingface(x, mode, tokens, hidden, ffn, experts) -> Built:
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    capacity = math.ceil(CAPACITY_FACTOR * tokens / experts)
    module = SwitchTransformersSparseMLP(SwitchTransformersConfig(
        d_model=hidden, d_ff=ffn, num_experts=experts, expert_capacity=capacity,
        router_jitter_noise=JITTER_EPS, dropout_rate=0.0, dense_act_fn="relu"))
    module.train()

    def forward():
        # (x + 0): HF's router multiplies its input in place, which fails on a view of a leaf.
        y = module((x + 0).view(1, tokens, hidden)).view(tokens, hidden)
        return y, y.sum()

    return Built(module, forward, _zeroing(module, mode), dict(
        capacity=capacity, drop_policy="first come, first served in token order (cumsum of the one-hot)",
        jitter_eps=JITTER_EPS, aux_loss="none in the block (the model computes it from router logits)",
        note="one sequence of T tokens (capacity is per sequence); a loop over the experts that received "
             "tokens, index_add_ combine; input copied once (x + 0) for its in-place jitter"))


def build_deepspeed(x, mode, tokens, hidden, ffn, experts) -> Built:
    import torch

    _one_process_group(dict(DS_ACCELERATOR="cpu"))
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo")
    expert = torch.nn.Sequential(torch.nn.Linear(hidden, ffn, bias=False), torch.nn.ReLU(),
                                 torch.nn.Linear(ffn, hidden, bias=False))
    module = MoE(hidden, expert, num_experts=experts, ep_size=1, k=1, capacity_factor=CAPACITY_FACTOR,
                 eval_capacity_factor=CAPACITY_FACTOR, min_capacity=0, noisy_gate_policy="Jitter")
    module.set_deepspeed_parallelism()
    module.train()
    capacity = math.ceil(tokens / experts * CAPACITY_FACTOR)
    last = {}

    def forward():
        y, l_aux, counts = module(x)
        last["counts"] = counts
        y = y.view(tokens, hidden)
        return y, y.sum() + AUX_LOSS_COEFF * l_aux

    def own_dropped():
        return float((last["counts"] - capacity).clamp(min=0).sum()) / tokens

    return Built(module, forward, _zeroing(module, mode), dict(
        capacity=capacity, min_capacity=0, eval_capacity_factor=CAPACITY_FACTOR,
        drop_policy="random token selection (use_rts=True, DeepSpeed's default)",
        jitter="noisy_gate_policy='Jitter' (multiplicative, eps 1e-2, as ours)",
        aux_loss_coeff=f"{AUX_LOSS_COEFF} x l_aux added to the loss by the benchmark",
        note="experts: a loop over E copies of Linear -> ReLU -> Linear, each over all C slots"),
        patches=["environment DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator)",
                 "a one-process gloo group: RANK=0, WORLD_SIZE=1, MASTER_ADDR/MASTER_PORT, "
                 "deepspeed.init_distributed(dist_backend='gloo')"],
        own_dropped=own_dropped)


def build_megatron_core(x, mode, tokens, hidden, ffn, experts) -> Built:
    import torch
    import torch.nn.functional as F

    _one_process_group({})
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    patches = []
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"
        patches.append("torch.cuda.current_device = lambda: 'cpu' (the router moves its weight to "
                       "torch.cuda.current_device())")
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        patches.append("megatron.core.transformer.moe.moe_utils.te_general_gemm = None (the router's GEMM "
                       "reads this name, undefined without Transformer Engine)")
    parallel_state.initialize_model_parallel()
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, ffn_hidden_size=ffn, moe_ffn_hidden_size=ffn, num_attention_heads=1,
        num_moe_experts=experts, moe_router_topk=1, moe_router_pre_softmax=True,
        moe_expert_capacity_factor=CAPACITY_FACTOR, moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=AUX_LOSS_COEFF,
        moe_input_jitter_eps=JITTER_EPS, moe_router_dtype="fp32", activation_func=F.relu,
        add_bias_linear=False, use_cpu_initialization=True)
    spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False).submodules.mlp
    module = MoELayer(config, submodules=spec.submodules)
    module.train()

    def forward():
        y = module(x)[0].view(tokens, hidden)
        return y, y.sum()

    return Built(module, forward, _zeroing(module, mode), dict(
        capacity=math.ceil(tokens / experts * CAPACITY_FACTOR),
        drop_policy=f"{config.moe_token_drop_policy} (megatron-core's default)",
        jitter_eps=JITTER_EPS, aux_loss_coeff=AUX_LOSS_COEFF, moe_router_pre_softmax=True,
        dispatcher="allgather", experts=type(module.experts).__name__,
        note="experts: a loop over E MLPs over their kept tokens; aux loss attached to the output"),
        patches=patches + ["a one-process gloo group and parallel_state.initialize_model_parallel()"])


BUILDERS = {
    "dense": build_dense,
    "switch": build_switch,
    "switch-main-grad": lambda *a, **k: build_switch(*a, **k, main_grad=True),
    "huggingface": build_huggingface,
    "deepspeed": build_deepspeed,
    "megatron-core": build_megatron_core,
}


# ---------------------------------------------------------------------------------------------------
# Measuring (inside the child process)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's resident high-water mark (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def dropped_by_output(y_Th) -> float:
    return float((y_Th.detach() == 0).all(-1).float().mean())


def _grad_bytes(module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None)


def measure(case: Dict) -> Dict:
    import torch

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    tokens, hidden = case["tokens"], case["hidden"]
    x = torch.randn(tokens, 1, hidden, requires_grad=True)
    built = BUILDERS[case["impl"]](x, case["mode"], tokens, hidden, case["ffn"], case["experts"])
    module = built.module
    params = list(module.parameters())

    def step():
        built.zero_grad()
        x.grad = None
        y, loss = built.forward()
        loss.backward()
        return y

    baseline = rss_bytes()
    reset_peak_rss()
    steps = case["warmup"] + case["steps"] if case["kind"] == "speed" else MEMORY_STEPS
    times, cpu_times, dropped, own = [], [], [], []
    for i in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        y = step()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if case["kind"] == "speed" and i >= case["warmup"]:
            times.append(elapsed)
            cpu_times.append(cpu)
        dropped.append(dropped_by_output(y))
        if built.own_dropped is not None:
            own.append(built.own_dropped())
        del y
    peak = peak_rss_bytes()
    grad_bytes = _grad_bytes(module)
    result = dict(
        settings=built.settings, patches=built.patches,
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        grad_bytes=grad_bytes, gradient_buffer_bytes=built.gradient_buffer_bytes,
        peak_rss_beyond_start_bytes=peak - baseline,
        peak_rss_beyond_params_and_grads_bytes=peak - baseline - grad_bytes,
        dropped_fraction=(statistics.mean(dropped) if case["impl"] != "dense" else None),
        dropped_fraction_method="tokens whose output row is exactly zero, mean over the steps",
        own_dropped_fraction=statistics.mean(own) if own else None)
    if case["kind"] == "speed":
        result.update(times_s=times, min_s=min(times), median_s=statistics.median(times), max_s=max(times),
                      cpu_times_s=cpu_times, cpu_min_s=min(cpu_times), cpu_median_s=statistics.median(cpu_times))
    elif case.get("tensor_peak"):
        result["tensor_peak_beyond_params_and_grads_bytes"] = tensor_peak(
            step, result["param_bytes"] + grad_bytes + built.gradient_buffer_bytes)
    return result


def tensor_peak(step, known_bytes: int) -> Optional[int]:
    """Peak bytes of live tensors during one step beyond `known_bytes`, from torch's memory
    profiler timeline; None where the timeline misses tensors the step never touched."""
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


def child(case: Dict) -> None:
    warnings.filterwarnings("ignore")
    try:
        result = measure(case)
    except Exception as err:  # a peer that cannot run here is reported, not fatal
        result = dict(error=f"{type(err).__name__}: {err}")
    print(json.dumps(dict(case, **result)), flush=True)


# ---------------------------------------------------------------------------------------------------
# The parent: idle waits, one process per case, the report


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs' time spent busy over the next `seconds` (/proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


def wait_for_idle(busy_threshold: float, max_wait_s: float, window_s: float = 2.0) -> Dict:
    """Wait until the CPUs were busy less than `busy_threshold` of the last `window_s` seconds (other
    processes: the previous case has exited), or `max_wait_s` passed. The 1-minute load average lags
    a minute behind and mostly counts the previous case, so it is recorded, not waited on."""
    start = time.monotonic()
    busy = cpu_busy_fraction(window_s)
    while busy >= busy_threshold and time.monotonic() - start < max_wait_s:
        busy = cpu_busy_fraction(window_s)
    return dict(waited_s=round(time.monotonic() - start, 1), cpu_busy_before_start=busy,
                idle=busy < busy_threshold, load_at_start=[round(v, 2) for v in os.getloadavg()])


def spawn_case(case: Dict, script: str = __file__) -> Dict:
    """Run `case` in a fresh `script --child CASE` process (this benchmark's, or the profile's); its
    last JSON line, or the case with the error."""
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1", OMP_NUM_THREADS=str(case["threads"]))
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--child", json.dumps(case)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return dict(case, error=f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def missing_modules(impls) -> Dict[str, List[str]]:
    """{implementation: modules it needs that this interpreter cannot import}, without importing them.
    Checked before the first case: a peer that cannot run would otherwise cost a full run and leave its
    rows out of the report."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ModuleNotFoundError:  # its parent package is missing
            return True

    missing = {impl: [m for m in NEEDS[impl] if absent(m)] for impl in impls}
    return {impl: modules for impl, modules in missing.items() if modules}


def versions() -> Dict[str, Optional[str]]:
    found = {}
    for name in ("torch", "megatron-core", "deepspeed", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine(threads: int) -> Dict:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return dict(cpu_count=os.cpu_count(), cpu=cpu, python=platform.python_version(),
                platform=platform.platform(), threads=threads,
                memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def pooled(cases: List[Dict]) -> Dict:
    """min, median, max over every timed step of every repetition, and per-repetition min/median; peak
    memory: the largest and the median over the repetitions' processes."""
    ok = [c for c in cases if "times_s" in c]
    if not ok:
        return dict(error=next((c.get("error", "") for c in cases), "")[:300])
    times = [t for c in ok for t in c["times_s"]]
    cpu = [t for c in ok for t in c.get("cpu_times_s", [])]
    dropped = [c["dropped_fraction"] for c in ok if c.get("dropped_fraction") is not None]
    own = [c["own_dropped_fraction"] for c in ok if c.get("own_dropped_fraction") is not None]
    return dict(min_ms=round(1e3 * min(times), 1), median_ms=round(1e3 * statistics.median(times), 1),
                max_ms=round(1e3 * max(times), 1),
                rep_min_ms=[round(1e3 * c["min_s"], 1) for c in ok],
                rep_median_ms=[round(1e3 * c["median_s"], 1) for c in ok],
                cpu_min_ms=round(1e3 * min(cpu), 1) if cpu else None,
                cpu_median_ms=round(1e3 * statistics.median(cpu), 1) if cpu else None,
                dropped_fraction=round(statistics.mean(dropped), 4) if dropped else None,
                own_dropped_fraction=round(statistics.mean(own), 4) if own else None,
                peak_rss_beyond_start_mib=round(max(c["peak_rss_beyond_start_bytes"] for c in ok) / 2**20, 1),
                peak_rss_beyond_params_and_grads_mib=round(
                    max(c["peak_rss_beyond_params_and_grads_bytes"] for c in ok) / 2**20, 1),
                # the processes of one case peak up to ~50 MiB apart: the median process too
                peak_rss_beyond_params_and_grads_median_mib=round(
                    statistics.median(c["peak_rss_beyond_params_and_grads_bytes"] for c in ok) / 2**20, 1),
                load_at_start=[c["idle_wait"]["load_at_start"][0] for c in ok if "idle_wait" in c],
                cpu_busy_before_start=[c["idle_wait"].get("cpu_busy_before_start") for c in ok if "idle_wait" in c],
                errors=len(cases) - len(ok))


def summarize(cases: List[Dict], speed_experts, modes) -> Dict:
    summary = {}
    for mode in modes:
        for experts in speed_experts:
            rows = {}
            for impl in IMPLS:
                group = [c for c in cases if c["kind"] == "speed" and c["impl"] == impl
                         and c["experts"] == experts and c["mode"] == mode]
                if group:
                    rows[impl] = pooled(group)
            dense = rows.get("dense", {})
            for row in rows.values():
                for stat in ("min", "median", "cpu_min", "cpu_median"):
                    if row.get(f"{stat}_ms") and dense.get(f"{stat}_ms"):
                        row[f"vs_dense_{stat}"] = round(row[f"{stat}_ms"] / dense[f"{stat}_ms"], 3)
                paired = [m / d for m, d in zip(row.get("rep_min_ms", []), dense.get("rep_min_ms", []))]
                if paired and not row.get("errors") and not dense.get("errors"):  # rep r's min / dense's in rep r
                    row["vs_dense_rep_min"] = [round(r, 3) for r in paired]
                    row["vs_dense_rep_min_median"] = round(statistics.median(paired), 3)
            summary[f"speed_E{experts}_grads_{mode}"] = rows
    memory = {}
    for mode in modes:
        for impl in IMPLS:
            by_e = {c["experts"]: c for c in cases if c["kind"] == "memory" and c["impl"] == impl
                    and c["mode"] == mode}
            if not by_e:
                continue
            row = {f"E{e}_mib": (round(c["peak_rss_beyond_params_and_grads_bytes"] / 2**20, 1)
                                 if "error" not in c else c["error"][:200]) for e, c in sorted(by_e.items())}
            small, large = by_e.get(min(by_e)), by_e.get(max(by_e))
            if len(by_e) > 1 and "error" not in small and "error" not in large:
                row[f"ratio_E{max(by_e)}_vs_E{min(by_e)}"] = round(
                    large["peak_rss_beyond_params_and_grads_bytes"]
                    / max(1, small["peak_rss_beyond_params_and_grads_bytes"]), 3)
            memory[f"{impl}_grads_{mode}"] = row
    summary["memory_peak_beyond_params_and_grads"] = memory
    return summary


def print_table(summary: Dict) -> None:
    for key, rows in summary.items():
        if not key.startswith("speed_"):
            continue
        print(f"\n{key}: impl, min ms, median ms, vs dense (min, median), CPU ms (min, median), vs dense, dropped, "
              "peak beyond start MiB, vs dense per repetition (min / min)")
        for impl, row in rows.items():
            if "error" in row:
                print(f"  {impl:18s} error: {row['error'][:150]}")
                continue
            print(f"  {impl:18s} {row['min_ms']:8.1f} {row['median_ms']:8.1f}  "
                  f"{row.get('vs_dense_min', float('nan')):.3f} {row.get('vs_dense_median', float('nan')):.3f}  "
                  f"{row.get('cpu_min_ms') or float('nan'):8.1f} {row.get('cpu_median_ms') or float('nan'):8.1f}  "
                  f"{row.get('vs_dense_cpu_min', float('nan')):.3f} "
                  f"{row.get('vs_dense_cpu_median', float('nan')):.3f}  "
                  f"{row['dropped_fraction'] if row['dropped_fraction'] is not None else '-'!s:7s} "
                  f"{row['peak_rss_beyond_start_mib']:8.1f}  {row.get('vs_dense_rep_min', '')}")
    print("\nmemory (peak beyond params and grads):")
    for key, row in summary["memory_peak_beyond_params_and_grads"].items():
        print(f"  {key:28s} {json.dumps(row)}")


def write_report(args, cases: List[Dict], complete: bool) -> Dict:
    """The JSON report of the cases so far (written after every case, so a run cut short leaves one)."""
    summary = summarize(cases, args.experts, args.modes)
    report = dict(
        benchmark="layer", complete=complete, summary=summary, cases=cases, versions=versions(),
        machine=machine(args.threads),
        settings=dict(quick=args.quick, reps=args.reps, warmup=args.warmup, steps=args.steps, threads=args.threads,
                      idle_busy=args.idle_busy, idle_wait_s=args.idle_wait, speed=dict(SPEED, tokens=args.tokens),
                      memory=dict(MEMORY, tokens=args.tokens, steps=MEMORY_STEPS),
                      capacity_factor=CAPACITY_FACTOR, jitter_eps=JITTER_EPS, aux_loss_coeff=AUX_LOSS_COEFF,
                      dtype="float32", biases=False),
        note="vs_dense: step time / dense FFN step time of the same gradient mode and expert count (min/min "
             "and median/median, pooled over the repetitions); vs_dense_cpu_*: the same for the process's CPU "
             "time per step (all threads: what the step consumed, less sensitive than wall time to other "
             "processes taking the cores, though not to their use of caches and memory bandwidth); "
             "a step is zero_grad + forward + backward; "
             "each case a fresh process (THP_MEM_ALLOC_ENABLE=1); patches are per case, in that process only")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    return summary


def comma_list(value: str, allowed, kind=str) -> Tuple:
    items = tuple(kind(v) for v in value.split(",") if v)
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(map(str, allowed))}")
    return items


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="JSON report (default benchmarks/results/layer.json; layer_quick.json with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 repetition of 1 warm-up + 2 timed steps at T=1024, no idle waits, "
                             "memory cases at E in {8, 256} (numbers not comparable with a full run)")
    parser.add_argument("--reps", type=int, default=3, help="processes per speed case (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process (default 2)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per process (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per case (default 2)")
    parser.add_argument("--only", type=lambda v: comma_list(v, IMPLS), default=IMPLS,
                        help=f"implementations, comma-separated ({','.join(IMPLS)}); dense is always "
                             "measured too, as the unit of the ratios")
    parser.add_argument("--experts", type=lambda v: comma_list(v, None, int), default=SPEED["experts"],
                        help="expert counts of the speed cases (default 8,64)")
    parser.add_argument("--memory-experts", type=lambda v: comma_list(v, None, int), default=MEMORY["experts"],
                        help="expert counts of the memory cases (default 8,256,2048)")
    parser.add_argument("--modes", type=lambda v: comma_list(v, MODES), default=MODES,
                        help="gradient modes: none, kept (default both)")
    parser.add_argument("--tokens", type=int, default=SPEED["tokens"], help="T of every case (default 4096)")
    parser.add_argument("--idle-busy", type=float, default=0.1,
                        help="wait before each speed case until the CPUs were busy less than this share of "
                             "the last 2 s (default 0.1)")
    parser.add_argument("--idle-wait", type=float, default=180.0,
                        help="longest wait for idle before a speed case, in seconds (default 180)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--tensor-peak", action="store_true",
                        help="memory cases also report torch's memory-profiler peak of live tensors")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.warmup, args.steps, args.tokens, args.idle_wait = 1, 1, 2, 1024, 0.0
        args.memory_experts = tuple(e for e in args.memory_experts if e <= 256) or (8,)
    if args.out is None:
        args.out = os.path.join(ROOT, "benchmarks", "results", "layer_quick.json" if args.quick else "layer.json")
    impls = ("dense",) + tuple(i for i in args.only if i != "dense")
    missing = missing_modules(impls)
    if missing:
        listed = "; ".join(f"{impl} needs {', '.join(modules)}" for impl, modules in missing.items())
        runnable = [i for i in args.only if i not in missing and i != "dense"]
        parser.error(f"cannot import what these implementations need: {listed}. Install the peers with "
                     f"pip install -c constraints.txt \"torch==2.13.0\" -e \".[bench]\""
                     + (f", or leave them out with --only {','.join(runnable)}" if runnable else ""))

    cases = []
    common = dict(threads=args.threads, warmup=args.warmup, steps=args.steps, tokens=args.tokens)
    if not args.skip_speed:
        # Repetitions outermost: each round measures every case once, so drift reaches them all.
        for rep in range(args.reps):
            for experts in args.experts:
                for mode in args.modes:
                    for impl in impls:
                        if mode not in impl_modes(impl):
                            continue
                        case = dict(common, kind="speed", impl=impl, mode=mode, rep=rep, experts=experts,
                                    hidden=SPEED["hidden"], ffn=SPEED["ffn"])
                        idle = wait_for_idle(args.idle_busy, args.idle_wait)
                        result = spawn_case(case)
                        result["idle_wait"] = idle
                        cases.append(result)
                        write_report(args, cases, complete=False)
                        print(json.dumps({k: result.get(k) for k in
                                          ("impl", "mode", "experts", "rep", "min_s", "median_s", "cpu_min_s",
                                           "dropped_fraction", "error")})[:400],
                              f"busy {idle['cpu_busy_before_start']}", flush=True)
    if not args.skip_memory:
        for experts in args.memory_experts:
            for mode in args.modes:
                for impl in impls:
                    if mode not in impl_modes(impl) or (impl == "dense" and experts != args.memory_experts[0]):
                        continue
                    case = dict(common, kind="memory", impl=impl, mode=mode, experts=experts,
                                hidden=MEMORY["hidden"], ffn=MEMORY["ffn"], tensor_peak=args.tensor_peak)
                    result = spawn_case(case)
                    result["load_at_start"] = [round(v, 2) for v in os.getloadavg()]
                    cases.append(result)
                    write_report(args, cases, complete=False)
                    print(json.dumps({k: result.get(k) for k in
                                      ("impl", "mode", "experts", "peak_rss_beyond_params_and_grads_bytes",
                                       "error")})[:400], flush=True)

    summary = write_report(args, cases, complete=True)
    print_table(summary)


if __name__ == "__main__":
    main()
