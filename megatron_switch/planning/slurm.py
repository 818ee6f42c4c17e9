"""What the SLURM cluster at hand offers a CPU job, and fitting `megatron-switch sbatch --cpu` to it.

`query_partition` asks `sinfo` (when it is installed and answers) for the nodes of a partition that
can run jobs and their CPUs; `fit_cpu_job` turns the requested processes per node and CPUs per
process into ones that fit those nodes, or raises `ClusterMismatch` naming the missing resource and
the flag to change. Without `sinfo` (a script written away from its cluster) nothing is checked.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

# sinfo's compact states (%t) of nodes that cannot take a job now; a trailing '*' means not responding.
_UNUSABLE_STATES = ("down", "drain", "drng", "fail", "failg", "inval", "maint", "futr", "unk", "npc", "pow")


class ClusterMismatch(ValueError):
    """The job asks more than the cluster's nodes have; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Partition:
    """The usable nodes of one SLURM partition: how many, and the fewest CPUs any of them has."""

    name: str
    nodes: int
    cpus_per_node: int


def parse_sinfo(text: str, partition: str | None) -> Partition | None:
    """`sinfo -h -N -o "%N %c %t %P"` output -> the partition asked for (None: the default one,
    marked '*'); None when no such partition is listed."""
    rows = [line.split() for line in text.splitlines() if len(line.split()) == 4]
    if partition is None:
        partition = next((part.rstrip("*") for *_, part in rows if part.endswith("*")), None)
    rows = [(node, int(cpus), state) for node, cpus, state, part in rows if part.rstrip("*") == partition]
    if not rows:
        return None
    usable = {node: cpus for node, cpus, state in rows
              if not state.endswith("*") and not state.rstrip("~#!%$@^-+").startswith(_UNUSABLE_STATES)}
    return Partition(partition, len(usable), min(usable.values(), default=0))


def query_partition(partition: str | None) -> Partition | None:
    """The partition as `sinfo` describes it here; None when sinfo is missing or does not answer."""
    if shutil.which("sinfo") is None:
        return None
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c %t %P"], capture_output=True, text=True,
                              timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    found = parse_sinfo(done.stdout, partition)
    if found is None and partition is not None:
        raise ClusterMismatch(f"--partition {partition}: sinfo lists no such partition on this cluster")
    return found


@dataclasses.dataclass(frozen=True)
class CpuFit:
    """Processes per node and CPUs per process for a CPU job, and where they came from."""

    tasks_per_node: int
    cpus_per_task: int
    overcommit: bool
    note: str  # one line for the script's header


def fit_cpu_job(found: Partition | None, nodes: int, tasks_per_node: int | None, cpus_per_task: int | None,
                overcommit: bool = False) -> CpuFit:
    """Fit a CPU job to the partition: by default 2 processes per node (fewer on smaller nodes) and
    every CPU of a node shared out among them. Explicit requests are kept, or refused when the nodes
    cannot hold them (unless `overcommit`: SLURM then runs several processes per CPU)."""
    if found is None:
        return CpuFit(tasks_per_node or 2, cpus_per_task or 1, overcommit,
                      "resources not checked against a cluster (no sinfo answered where this was written)")
    where = f"SLURM partition {found.name!r} (sinfo)"
    if found.nodes == 0:
        raise ClusterMismatch(f"{where} has no node that can run jobs now (all down or drained): resume them "
                              f"(scontrol update NodeName=... State=RESUME) or pick another --partition")
    if nodes > found.nodes:
        raise ClusterMismatch(f"{where} has {found.nodes} usable node(s), the job asks --nodes {nodes}: "
                              f"pass --nodes {found.nodes} or fewer (more processes per node with --gpus-per-node)")
    cpus = found.cpus_per_node
    tasks = tasks_per_node or max(1, min(2, cpus))
    per_task = cpus_per_task or max(1, cpus // tasks)
    if tasks * per_task > cpus and not overcommit:
        raise ClusterMismatch(
            f"{where} nodes have {cpus} CPU(s) each; this job asks {tasks} training process(es) x {per_task} "
            f"CPU(s) per node: pass --gpus-per-node {max(1, cpus // per_task)} (processes per node; more "
            f"--nodes for the same world size), a smaller --cpus-per-task, or --overcommit (processes share "
            f"CPUs: slower)")
    return CpuFit(tasks, per_task, overcommit and tasks * per_task > cpus,
                  f"fitted to {where}: {found.nodes} usable node(s) x {cpus} CPU(s); {tasks} process(es) x "
                  f"{per_task} CPU(s) per node" + (" (overcommitted)" if tasks * per_task > cpus else ""))
