"""sbatch scripts: a planned layout and training settings, rendered through a template of launch/.

`training_command(job)` is the command one srun task runs: `megatron-switch train` (ours; `--model t5`
for encoder-decoder presets), or the user's Megatron-LM through `python -m
megatron_switch.megatron_lm.pretrain_gpt` (`pretrain_t5` for encoder-decoder models) with
Megatron-LM's flags plus the Switch flags. `render_sbatch(job)` fills
the template (`launch/switch.sbatch.template`; placeholders `@{name}`, `@@` for a literal `@`); the
template holds everything that runs per node (ranks, rendezvous, scratch, signal, requeue, dry run).
"""

from __future__ import annotations

import dataclasses
import shlex
import string
import sys
from pathlib import Path

from megatron_switch.arguments import moe_layer_freq_expression
from megatron_switch.planning.model import ModelSpec
from megatron_switch.planning.search import Candidate

TEMPLATE_NAME = "switch.sbatch.template"


class SbatchError(ValueError):
    """Settings that cannot make a working script; the message says which flag to change."""


class _Template(string.Template):
    delimiter = "@"


@dataclasses.dataclass(frozen=True)
class SbatchJob:
    """Everything a script needs. `layout` is the chosen plan candidate; `plan_text` its table."""

    name: str
    spec: ModelSpec
    layout: Candidate
    nodes: int
    tasks_per_node: int
    save: str
    train_iters: int
    micro_batch_size: int
    global_batch_size: int
    lr: float
    lr_warmup_iters: int
    save_interval: int
    log_interval: int = 10
    cpu: bool = False
    megatron_lm: str | None = None
    distributed_optimizer: bool = True  # Megatron-LM jobs: --use-distributed-optimizer, as planned
    data_path: tuple[str, ...] = ()
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    output: str = "%x-%j.out"
    signal_seconds: int = 300
    container_image: str | None = None
    container_mounts: str | None = None
    container_workdir: str | None = None
    python: str = "python"
    env: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    plan_text: str = ""
    generated_by: str = ""
    overcommit: bool = False  # CPU jobs: more processes x CPUs than a node has (#SBATCH --overcommit)
    resources_note: str = ""  # how the CPU resources were fitted to the cluster


def slurm_time_seconds(text: str) -> int | None:
    """SLURM's --time forms (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None for no limit."""
    value = text.strip()
    if value.upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    days, dash, rest = value.rpartition("-") if "-" in value else ("0", "", value)
    try:
        parts = [int(p) for p in rest.split(":")]
        day_count = int(days)
    except ValueError:
        raise SbatchError(f"--time {text!r} is not a SLURM time: use HH:MM:SS (e.g. 04:00:00), minutes, MM:SS "
                          f"or D-HH[:MM[:SS]]") from None
    if len(parts) > 3 or min(parts + [day_count]) < 0:
        raise SbatchError(f"--time {text!r} is not a SLURM time: use HH:MM:SS (e.g. 04:00:00), minutes, MM:SS "
                          f"or D-HH[:MM[:SS]]")
    if dash:  # D-H, D-H:M, D-H:M:S
        h, m, s = parts + [0] * (3 - len(parts))
    elif len(parts) == 3:  # H:M:S
        h, m, s = parts
    else:  # M, M:S
        h, (m, s) = 0, parts + [0] * (2 - len(parts))
    return ((day_count * 24 + h) * 60 + m) * 60 + s


def template_path(explicit: str | None = None) -> Path:
    """The template: `explicit`, else launch/ of this source tree, else the installed copy."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise SbatchError(f"--template {explicit}: no such file")
        return path
    here = Path(__file__).resolve().parents[2] / "launch" / TEMPLATE_NAME
    installed = Path(sys.prefix) / "share" / "megatron-switch" / "launch" / TEMPLATE_NAME
    for path in (here, installed):
        if path.is_file():
            return path
    raise SbatchError(f"{TEMPLATE_NAME} not found in {here.parent} or {installed.parent}: pass --template PATH "
                      "(a copy of launch/switch.sbatch.template from the source tree)")


# `megatron-switch train --model t5`: the planner's activation -> --feed-forward-proj
T5_FFN = {"relu": "relu", "geglu_tanh": "gated-gelu"}


def _moe_layer_pattern(spec: ModelSpec, layers: int) -> str:
    """Megatron-LM's --moe-layer-freq list form of the placement (arguments.moe_layer_freq_expression)."""
    return moe_layer_freq_expression(spec.expert_interval, layers)


def _switch_flags(spec: ModelSpec, megatron_lm: bool) -> list[str]:
    freq = _moe_layer_pattern(spec, spec.num_layers) if megatron_lm else str(spec.expert_interval)
    flags = ["--moe-switch", "--num-experts", str(spec.num_experts), "--moe-layer-freq", freq,
             "--moe-expert-capacity-factor", f"{spec.capacity_factor:g}"]
    if spec.activation != "relu":
        flags += ["--switch-expert-activation", spec.activation]
    if spec.expert_ffn_hidden_size:
        flags += ["--moe-ffn-hidden-size", str(spec.expert_ffn_hidden_size)]
    return flags


def training_command(job: SbatchJob) -> list[str]:
    """argv of one training process (without --load, which the script adds once a checkpoint exists)."""
    spec, c = job.spec, job.layout
    megatron_lm = job.megatron_lm is not None
    t5 = spec.encoder_decoder and not megatron_lm  # `megatron-switch train --model t5`
    if t5 and spec.activation not in T5_FFN:
        raise SbatchError(f"{job.name}: `megatron-switch train --model t5` has {' or '.join(T5_FFN.values())} FFNs "
                          f"(--feed-forward-proj), not {spec.activation}; use --megatron-lm PATH")
    if t5 and c.recompute:
        raise SbatchError(f"{job.name} needs activation recomputation to fit this cluster, which `megatron-switch "
                          "train --model t5` does not offer: give more nodes, or use --megatron-lm PATH")
    if not spec.encoder_decoder and not megatron_lm and spec.kv_channels and \
            spec.kv_channels * spec.num_attention_heads != spec.hidden_size:
        raise SbatchError("`megatron-switch train` has no --kv-channels: heads x kv channels must equal the "
                          "hidden size, or use --megatron-lm PATH")
    if megatron_lm:
        entry = "pretrain_t5" if spec.encoder_decoder else "pretrain_gpt"
        argv = [job.python, "-m", f"megatron_switch.megatron_lm.{entry}"]
    else:
        argv = [job.python, "-m", "megatron_switch.cli", "train"]
    if t5:
        argv += ["--model", "t5", "--feed-forward-proj", T5_FFN[spec.activation]]
    if spec.encoder_decoder:
        argv += ["--encoder-num-layers", str(spec.num_layers), "--decoder-num-layers", str(spec.decoder_layers),
                 "--kv-channels", str(spec.head_dim), "--encoder-seq-length", str(spec.seq_length),
                 "--decoder-seq-length", str(spec.decoder_tokens)]
    else:
        argv += ["--num-layers", str(spec.num_layers), "--seq-length", str(spec.seq_length)]
        if megatron_lm and spec.kv_channels:
            argv += ["--kv-channels", str(spec.kv_channels)]
    argv += ["--hidden-size", str(spec.hidden_size), "--num-attention-heads", str(spec.num_attention_heads),
             "--ffn-hidden-size", str(spec.ffn_hidden_size),
             "--max-position-embeddings", str(max(spec.positions, spec.decoder_tokens))]
    if not spec.tie_embeddings:
        argv += ["--untie-embeddings-and-output-weights"]
    argv += _switch_flags(spec, megatron_lm)
    argv += ["--tensor-model-parallel-size", str(c.tp), "--pipeline-model-parallel-size", str(c.pp),
             "--expert-model-parallel-size", str(c.ep)]
    if c.tp > 1 and not job.cpu and not (spec.encoder_decoder and spec.decoder_tokens % c.tp):
        argv += ["--sequence-parallel"]
    argv += ["--micro-batch-size", str(job.micro_batch_size), "--global-batch-size", str(job.global_batch_size),
             "--train-iters", str(job.train_iters), "--lr", f"{job.lr:g}", "--lr-warmup-iters",
             str(job.lr_warmup_iters)]
    if not job.cpu:
        argv += ["--bf16"]
    if megatron_lm:
        if job.distributed_optimizer:
            argv += ["--use-distributed-optimizer"]
        argv += ["--ckpt-format", "torch_dist"]
    if c.recompute:  # both trainers take Megatron's recomputation flags
        argv += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if job.data_path:
        argv += ["--data-path", *job.data_path]
    if job.tokenizer_type:
        argv += ["--tokenizer-type", job.tokenizer_type]
    if job.tokenizer_model:
        argv += ["--tokenizer-model", job.tokenizer_model]
    argv += ["--save", job.save, "--save-interval", str(job.save_interval), "--log-interval", str(job.log_interval),
             "--exit-signal-handler"]
    if megatron_lm:
        argv += ["--exit-signal", "SIGUSR1"]  # Megatron-LM listens for SIGTERM unless told (core_v0.16.1)
    else:
        argv += ["--no-progress-bar"]
    return argv + list(job.extra_args)


def _format_command(argv: list[str], indent: str = "    ") -> str:
    """argv as shell words for a bash array, one flag (with its values) per line."""
    lines, current = [], []
    for word in argv:
        if word.startswith("--") and current:
            lines.append(current)
            current = []
        current.append(shlex.quote(word))
    lines.append(current)
    return "\n".join(indent + " ".join(words) for words in lines)


def _environment(job: SbatchJob) -> str:
    env = ["export PYTHONUNBUFFERED=1"]
    if job.cpu:
        env += [f"export OMP_NUM_THREADS={job.cpus_per_task or 1}"]
    else:
        env += ["export CUDA_DEVICE_MAX_CONNECTIONS=1      # Megatron: TP/SP communication kernels run in order",
                "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed collective ends the job instead of hanging",
                'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
                f"export OMP_NUM_THREADS={job.cpus_per_task or 8}"]
    if job.megatron_lm is not None:
        env += [f'export PYTHONPATH={shlex.quote(job.megatron_lm)}"${{PYTHONPATH:+:$PYTHONPATH}}"  # Megatron-LM']
    for item in job.env:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SbatchError(f"--env {item!r}: expected NAME=VALUE")
        env.append(f"export {key}={shlex.quote(value)}")
    return "\n".join(env)


def render_sbatch(job: SbatchJob, template: str | None = None) -> str:
    """The whole sbatch script."""
    if job.nodes * job.tasks_per_node != job.layout.world_size:
        raise SbatchError(f"the layout has {job.layout.world_size} ranks, the job {job.nodes} x {job.tasks_per_node}")
    if job.signal_seconds < 1:
        raise SbatchError("--signal-seconds must be >= 1")
    if job.lr_warmup_iters and job.lr_warmup_iters >= job.train_iters:
        raise SbatchError(f"--lr-warmup-iters {job.lr_warmup_iters} must be fewer than --train-iters "
                          f"{job.train_iters}: lower --lr-warmup-iters or train longer")
    limit = slurm_time_seconds(job.time)
    if limit is not None and job.signal_seconds >= limit:
        raise SbatchError(f"--signal-seconds {job.signal_seconds} is not inside --time {job.time} ({limit} s): "
                          f"the save signal must come before the limit; give a longer --time or a smaller "
                          f"--signal-seconds (slurmctld checks signal times every 30 s: leave a margin)")
    tasks = [f"#SBATCH --ntasks-per-node={job.tasks_per_node}"]
    if job.overcommit:  # SLURM refuses --ntasks-per-node above a node's CPUs even with --overcommit
        tasks = [f"# overcommitted: SLURM takes --ntasks; srun places {job.tasks_per_node} per node",
                 f"#SBATCH --ntasks={job.nodes * job.tasks_per_node}"]
    resources = []
    if job.cpu:
        if job.resources_note:
            resources.append(f"# {job.resources_note}")
        resources.append(f"#SBATCH --cpus-per-task={job.cpus_per_task or 1}")
        if job.overcommit:
            resources.append("#SBATCH --overcommit")
    else:
        resources += [f"#SBATCH --gpus-per-node={job.tasks_per_node}", "#SBATCH --exclusive"]
        if job.cpus_per_task:
            resources.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    if job.partition:
        resources.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        resources.append(f"#SBATCH --account={job.account}")
    srun = ["--kill-on-bad-exit=1", f"--ntasks-per-node={job.tasks_per_node}"]
    if job.container_image:
        srun.append(f"--container-image={shlex.quote(job.container_image)}")
        if job.container_mounts:
            srun.append(f"--container-mounts={shlex.quote(job.container_mounts)}")
        if job.container_workdir:
            srun.append(f"--container-workdir={shlex.quote(job.container_workdir)}")
    elif job.container_mounts or job.container_workdir:
        raise SbatchError("--container-mounts and --container-workdir need --container-image (pyxis)")
    text = template_path(template).read_text()
    try:
        return _Template(text).substitute(
            title=f"{job.name}: Switch training on {job.nodes} node(s) x {job.tasks_per_node} "
                  f"{'CPU task' if job.cpu else 'GPU'}(s)",
            generated_by=job.generated_by, job_name=job.name, nodes=job.nodes, task_lines="\n".join(tasks),
            tasks_per_node=job.tasks_per_node,
            resource_lines="\n".join(resources), time=job.time, output=job.output,
            signal_seconds=job.signal_seconds, device="CPU task" if job.cpu else "GPU", save=job.save,
            plan="\n".join(("# " + line).rstrip() for line in job.plan_text.splitlines()),
            save_quoted=shlex.quote(job.save), train_iters=job.train_iters, environment=_environment(job),
            srun_flags=" ".join(srun), command=_format_command(training_command(job)))
    except (KeyError, ValueError) as err:
        raise SbatchError(f"template {template_path(template)}: bad placeholder ({err}); placeholders are "
                          "@{name}, a literal @ is @@") from None
