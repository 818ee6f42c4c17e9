"""`megatron-switch plan` and `megatron-switch sbatch`: flags, the plan as a table or JSON, the script.

Both take a model (`--preset NAME`, or model flags with Megatron-LM's names), a cluster (`--nodes`,
`--gpus-per-node`, `--gpu-memory`) and training settings; `plan` prints the counts, the memory per
GPU and the best layouts with their reasons; `sbatch` prints a script for the best layout (or the
one given with --tensor/--pipeline/--expert-model-parallel-size). Errors exit with status 2 and a
message that says what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys

from megatron_switch.arguments import CommandParser
from megatron_switch.config import ACTIVATIONS
from megatron_switch.parallel import LayoutError
from megatron_switch.planning.memory import GIB, TrainingSetup
from megatron_switch.planning.model import (
    ModelSpec,
    ModelSpecError,
    count_parameters,
    flops_per_token,
)
from megatron_switch.planning.presets import PresetError, get_preset, load_presets
from megatron_switch.planning.sbatch import SbatchError, SbatchJob, render_sbatch, slurm_time_seconds
from megatron_switch.planning.search import (
    Cluster,
    NoLayoutFits,
    evaluate,
    search_layouts,
)
from megatron_switch.planning.slurm import ClusterMismatch, fit_cpu_job, query_partition

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(T|G|M)?(i?B)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> float:
    """'80GB', '80G', '80GiB', '141GB', '512MB' -> bytes; GB is read as GiB, as GPU memory is quoted."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 80GB or 141GiB")
    unit = {"T": 1 << 40, "G": GIB, "M": 1 << 20, None: GIB}[(match.group(2) or "").upper() or None]
    if float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a memory size must be more than 0")
    return float(match.group(1)) * unit


def _model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (a preset, or these flags; with a preset they override it)")
    g.add_argument("--preset", default=None, help=f"One of: {', '.join(load_presets())}.")
    g.add_argument("--architecture", choices=("gpt", "encoder-decoder"), default=None)
    for flag in ("--num-layers", "--decoder-num-layers", "--hidden-size", "--num-attention-heads",
                 "--kv-channels", "--ffn-hidden-size", "--moe-ffn-hidden-size", "--num-experts",
                 "--moe-layer-freq", "--vocab-size", "--seq-length", "--decoder-seq-length",
                 "--max-position-embeddings"):
        g.add_argument(flag, type=int, default=None)
    g.add_argument("--switch-expert-activation", choices=ACTIVATIONS, default=None)
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)


def _cluster_flags(parser: argparse.ArgumentParser, cpu_default_memory: str = "4GB") -> None:
    g = parser.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, required=True)
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default 8); with --cpu: training processes per node (default 2).")
    g.add_argument("--gpu-memory", type=parse_memory, default=None,
                   help=f"Memory per GPU, e.g. 80GB (default); with --cpu: memory per process (default "
                        f"{cpu_default_memory}).")
    g.add_argument("--memory-reserve", type=float, default=0.1,
                   help="Fraction of each GPU's memory kept free for the CUDA context, NCCL and fragmentation.")
    g.add_argument("--cpu", action="store_true",
                   help="CPU-only nodes: gloo, float32, no sequence parallelism (the tiny preset's mode).")
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--no-distributed-optimizer", action="store_true",
                   help="Plan without sharding the optimizer state over data-parallel ranks.")
    g.add_argument("--no-recompute", action="store_true", help="Never plan activation recomputation.")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None, help="Fix TP instead of searching.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=None, help="Fix PP instead of searching.")
    g.add_argument("--expert-model-parallel-size", type=int, default=None, help="Fix EP instead of searching.")


_SPEC_FLAGS = {"architecture": "architecture", "num_layers": "num_layers", "decoder_num_layers": "decoder_num_layers",
               "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
               "kv_channels": "kv_channels", "ffn_hidden_size": "ffn_hidden_size",
               "moe_ffn_hidden_size": "expert_ffn_hidden_size", "num_experts": "num_experts",
               "moe_layer_freq": "expert_interval", "vocab_size": "vocab_size", "seq_length": "seq_length",
               "decoder_seq_length": "decoder_seq_length", "max_position_embeddings": "max_position_embeddings",
               "switch_expert_activation": "activation", "moe_expert_capacity_factor": "capacity_factor"}


def _model(args) -> tuple[str, ModelSpec, dict, str]:
    """(name, spec, training defaults, description) from --preset and the model flags."""
    overrides = {field: getattr(args, flag) for flag, field in _SPEC_FLAGS.items() if getattr(args, flag) is not None}
    if args.untie_embeddings_and_output_weights:
        overrides["tie_embeddings"] = False
    if args.preset:
        preset = get_preset(args.preset)
        spec = dataclasses.replace(preset.model, **overrides)
        return preset.name, spec, dict(preset.training), preset.description
    missing = [f"--{flag.replace('_', '-')}" for flag in ("num_layers", "hidden_size", "num_attention_heads",
                                                          "num_experts") if getattr(args, flag) is None]
    if missing:
        raise ModelSpecError(f"give --preset NAME, or the model: missing {' '.join(missing)}")
    overrides.setdefault("architecture", "gpt")
    overrides.setdefault("ffn_hidden_size", 4 * args.hidden_size)
    return "custom", ModelSpec(**overrides), {}, "a Switch model from the command line"


def _setup(args, spec: ModelSpec, training: dict,
           distributed_optimizer: bool | None = None) -> tuple[Cluster, TrainingSetup]:
    """distributed_optimizer: None plans with it on GPUs (Megatron-LM's) unless --no-distributed-optimizer."""
    for flag in ("gpus_per_node", "micro_batch_size", "global_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise LayoutError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    gpn = args.gpus_per_node if args.gpus_per_node is not None else (2 if args.cpu else 8)
    memory = args.gpu_memory if args.gpu_memory is not None else parse_memory("4GB" if args.cpu else "80GB")
    cluster = Cluster(args.nodes, gpn, memory, args.memory_reserve)
    micro = args.micro_batch_size if args.micro_batch_size is not None else training.get("micro_batch_size", 1)
    global_batch = (args.global_batch_size if args.global_batch_size is not None
                    else training.get("global_batch_size", micro * cluster.world_size))
    if micro < 1 or global_batch < 1:
        raise LayoutError("--micro-batch-size and --global-batch-size must be >= 1")
    setup = TrainingSetup(micro_batch_size=micro, global_batch_size=global_batch,
                          precision="fp32" if args.cpu else "bf16",
                          distributed_optimizer=(not args.no_distributed_optimizer and not args.cpu
                                                 if distributed_optimizer is None else distributed_optimizer),
                          sequence_parallel=not args.cpu)
    return cluster, setup


def _layouts(args, spec: ModelSpec, cluster: Cluster, setup: TrainingSetup, top: int):
    fixed = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size)
    allow_recompute = not args.no_recompute
    if all(v is None for v in fixed):
        return search_layouts(spec, cluster, setup, top=top, allow_recompute=allow_recompute,
                              allow_tied_pipeline=not args.cpu)
    if any(v is None for v in fixed):
        raise LayoutError("to fix the layout give all of --tensor-model-parallel-size, "
                          "--pipeline-model-parallel-size and --expert-model-parallel-size (or none to search)")
    tp, pp, ep = fixed
    chosen = evaluate(spec, cluster, setup, tp, pp, ep)
    if not chosen.fits and allow_recompute:
        chosen = evaluate(spec, cluster, setup, tp, pp, ep, recompute=True)
    if not chosen.fits:
        raise NoLayoutFits(f"TP={tp} PP={pp} EP={ep} does not fit: {chosen.reasons[0]}; "
                           "search instead (drop the three size flags)")
    return [chosen]


def _gib(value: float) -> str:
    gib = value / GIB
    return f"{gib:.1f}" if gib >= 1 else f"{gib:.3f}"


def _count(value: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def plan_report(name: str, description: str, spec: ModelSpec, cluster: Cluster, setup: TrainingSetup,
                layouts: list) -> dict:
    """The plan as plain data (the --json output)."""
    counts = count_parameters(spec)
    return {
        "model": name, "description": description, "spec": dataclasses.asdict(spec),
        "parameters": {"total": counts.total, "experts": counts.experts, "dense": counts.dense,
                       "embeddings": counts.embeddings, "active_per_token": counts.active},
        "flops_per_token": flops_per_token(spec),
        "cluster": {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
                    "gpu_memory_bytes": cluster.gpu_memory, "memory_reserve": cluster.memory_reserve},
        "training": dataclasses.asdict(setup),
        "layouts": [c.as_dict() for c in layouts],
    }


def format_plan(report: dict) -> str:
    """The plan as a readable table."""
    spec, p, f, cl, tr = (report[k] for k in ("spec", "parameters", "flops_per_token", "cluster", "training"))
    s = ModelSpec(**spec)
    heads = f"{s.num_attention_heads} heads x {s.head_dim}"
    k = s.expert_interval
    where = "every layer" if k == 1 else f"layers {k}, {2 * k}, ..."
    if s.encoder_decoder:
        shape = f"encoder-decoder, {s.num_layers}+{s.decoder_layers} layers"
    else:
        shape = f"decoder-only GPT, {s.num_layers} layers"
    lines = [
        f"{report['model']}: {report['description']}",
        (f"  model        {shape}, hidden {s.hidden_size}, {heads}, FFN {s.ffn_hidden_size}, "
         f"{s.num_experts} {s.activation} experts of width {s.expert_ffn} in {where}, vocab {s.vocab_size}"),
        (f"  parameters   {_count(p['total'])} total: {_count(p['experts'])} in experts, "
         f"{_count(p['dense'])} dense ({_count(p['embeddings'])} embeddings); "
         f"{_count(p['active_per_token'])} active per token"),
        f"  FLOPs/token  {f['forward'] / 1e9:.2f} GFLOP forward, {f['train'] / 1e9:.2f} GFLOP per training token (3x)",
        (f"  cluster      {cl['nodes']} node(s) x {cl['gpus_per_node']} x {_gib(cl['gpu_memory_bytes'])} GiB "
         f"({cl['memory_reserve']:.0%} reserved); {tr['precision']}, micro batch {tr['micro_batch_size']}, "
         f"global batch {tr['global_batch_size']}, "
         + ("distributed optimizer" if tr["distributed_optimizer"] else "optimizer state not sharded")),
        "",
        "  memory per GPU, GiB (most loaded rank); optimizer: in force (with / without the distributed optimizer)",
        "  rank  TP  PP    EP    DP  EDP  weights  grads  optimizer              activations   total",
    ]
    for i, c in enumerate(report["layouts"], 1):
        m = c["memory_bytes"]
        opt = (f"{_gib(m['optimizer'])} ({_gib(m['optimizer_with_distributed_optimizer'])} / "
               f"{_gib(m['optimizer_without_distributed_optimizer'])})")
        lines.append(f"  {i:>4}  {c['tp']:>2}  {c['pp']:>2}  {c['ep']:>4}  {c['dp']:>4}  {c['expert_dp']:>3}  "
                     f"{_gib(m['weights']):>7}  {_gib(m['gradients']):>5}  {opt:<21}  {_gib(m['activations']):>11}  "
                     f"{_gib(m['total']):>6}")
        lines += [f"          - {reason}" for reason in c["reasons"]]
    return "\n".join(lines)


def _plan_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description=description)
    _model_flags(parser)
    _cluster_flags(parser)
    return parser


def _plan(args, top: int, distributed_optimizer: bool | None = None):
    name, spec, training, description = _model(args)
    cluster, setup = _setup(args, spec, training, distributed_optimizer)
    layouts = _layouts(args, spec, cluster, setup, top)
    return name, spec, training, description, cluster, setup, layouts


_USER_ERRORS = (ModelSpecError, PresetError, LayoutError, NoLayoutFits, SbatchError, ClusterMismatch, ValueError)


def plan_main(argv: list[str] | None = None) -> None:
    parser = _plan_parser("megatron-switch plan", "Parameters, FLOPs and memory per GPU of a Switch model, "
                                                  "and the best TP/PP/EP/DP layouts for a cluster.")
    parser.add_argument("--top", type=int, default=3, help="How many fitting layouts to show (best first).")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    args = parser.parse_args(argv)
    try:
        name, spec, _, description, cluster, setup, layouts = _plan(args, args.top)
    except NoLayoutFits as err:
        if args.json:  # the answer is still a plan: the model and cluster, and no layout (with why)
            name, spec, training, description = _model(args)
            cluster, setup = _setup(args, spec, training)
            report = plan_report(name, description, spec, cluster, setup, [])
            print(json.dumps({**report, "fits": False, "error": str(err)}, indent=2))
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except _USER_ERRORS as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    report = plan_report(name, description, spec, cluster, setup, layouts)
    print(json.dumps({**report, "fits": True}, indent=2) if args.json else format_plan(report))


def _train_distributed_optimizer(args, extra_args: list[str]) -> bool:
    """Whether a `megatron-switch train` job shards its optimizer state: only with
    --use-distributed-optimizer among its --extra-args."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--use-distributed-optimizer", action="store_true")
    train_flags, _ = probe.parse_known_args(extra_args)
    if not train_flags.use_distributed_optimizer:
        return False
    if args.no_distributed_optimizer:
        raise SbatchError("--no-distributed-optimizer contradicts --use-distributed-optimizer in --extra-args: "
                          "drop one of them")
    return True


def _check_extra_train_args(extra_args: list[str]) -> None:
    """--extra-args for `megatron-switch train`: every flag must be one the trainer knows."""
    from megatron_switch.training.arguments import build_parser

    _, unknown = build_parser().parse_known_args(extra_args)
    flags = [a for a in unknown if a.startswith("-")]
    if unknown:
        raise SbatchError(f"--extra-args: `megatron-switch train` does not take {' '.join(flags or unknown)} "
                          f"(see megatron-switch train --help)")


def sbatch_main(argv: list[str] | None = None) -> None:
    parser = _plan_parser("megatron-switch sbatch", "Write an sbatch script for the best layout of a Switch "
                                                    "model on a SLURM cluster (to stdout).")
    g = parser.add_argument_group("job")
    g.add_argument("--save", required=True, help="Checkpoint directory (also resumed from after a requeue).")
    g.add_argument("--time", default="04:00:00")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--job-name", default=None)
    g.add_argument("--output", default="%x-%j.out", help="Log file (appended to across requeues).")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="With --cpu: default the node's CPUs shared out among its processes (sinfo).")
    g.add_argument("--overcommit", action="store_true",
                   help="With --cpu: allow more processes x CPUs per node than the nodes have (they share CPUs).")
    g.add_argument("--signal-seconds", type=int, default=None,
                   help="Send the save-and-exit signal this long before the time limit (default 300; 60 with --cpu).")
    g.add_argument("--container-image", default=None, help="pyxis/enroot image for srun.")
    g.add_argument("--container-mounts", default=None)
    g.add_argument("--container-workdir", default=None)
    g.add_argument("--megatron-lm", default=None, metavar="PATH",
                   help="Run the user's Megatron-LM (pretrain_gpt.py / pretrain_t5.py through "
                        "megatron_switch.megatron_lm) instead of `megatron-switch train`.")
    g.add_argument("--python", default="python", help="Python interpreter of the training processes.")
    g.add_argument("--template", default=None, help="Own template instead of launch/switch.sbatch.template.")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="Extra environment (repeatable).")
    g = parser.add_argument_group("training run")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--data-path", nargs="+", default=None)
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--extra-args", default="", help="More training flags, appended as given (one quoted string).")
    args = parser.parse_args(argv)
    if args.cpu and args.megatron_lm:
        parser.error("--cpu runs `megatron-switch train` (Megatron-LM's pretrain scripts need CUDA): "
                     "drop --megatron-lm")
    try:
        cpu_fit = None
        if args.cpu:  # fit processes and CPUs per node to the partition sinfo describes here
            cpu_fit = fit_cpu_job(query_partition(args.partition), args.nodes, args.gpus_per_node,
                                  args.cpus_per_task, args.overcommit)
            args.gpus_per_node, args.cpus_per_task = cpu_fit.tasks_per_node, cpu_fit.cpus_per_task
        extra_args = shlex.split(args.extra_args)
        slurm_time_seconds(args.time)  # a malformed --time fails here (render_sbatch checks the signal fits)
        signal_seconds = args.signal_seconds if args.signal_seconds is not None else (60 if args.cpu else 300)
        if args.megatron_lm is None:
            _check_extra_train_args(extra_args)
        distributed_optimizer = None
        if args.megatron_lm is None:
            distributed_optimizer = _train_distributed_optimizer(args, extra_args)
        name, spec, training, description, cluster, setup, layouts = _plan(args, 1, distributed_optimizer)
        best = layouts[0]
        report = plan_report(name, description, spec, cluster, setup, [best])

        def pick(flag: str, default):
            value = getattr(args, flag)
            return value if value is not None else training.get(flag, default)

        job = SbatchJob(
            name=args.job_name or name, spec=spec, layout=best, nodes=cluster.nodes,
            tasks_per_node=cluster.gpus_per_node, save=args.save, train_iters=pick("train_iters", 1000),
            micro_batch_size=setup.micro_batch_size, global_batch_size=setup.global_batch_size,
            lr=pick("lr", 1e-4), lr_warmup_iters=pick("lr_warmup_iters", 0),
            save_interval=pick("save_interval", 1000), log_interval=args.log_interval, cpu=args.cpu,
            megatron_lm=args.megatron_lm, distributed_optimizer=setup.distributed_optimizer,
            data_path=tuple(args.data_path or ()),
            tokenizer_type=pick("tokenizer_type", None), tokenizer_model=args.tokenizer_model, time=args.time,
            partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task, output=args.output,
            signal_seconds=signal_seconds,
            container_image=args.container_image, container_mounts=args.container_mounts,
            container_workdir=args.container_workdir, python=args.python, env=tuple(args.env),
            extra_args=tuple(extra_args), plan_text=format_plan(report),
            overcommit=bool(cpu_fit and cpu_fit.overcommit), resources_note=cpu_fit.note if cpu_fit else "",
            generated_by="megatron-switch sbatch " + shlex.join(sys.argv[2:] if argv is None else argv))
        script = render_sbatch(job, args.template)
    except _USER_ERRORS as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    sys.stdout.write(script)
