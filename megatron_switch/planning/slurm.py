"""What the SLURM cluster at hand offers a CPU job, and fitting `megatron-switch sbatch --cpu` to it.

`query_partition` asks `sinfo` (when it is installed and answers) for the nodes of a partition that
can run jobs and their CPUs; `fit_cpu_job` turns the requested nodes, processes per node and CPUs per
process into ones that fit those nodes (the job's --nodes best-provided ones), or raises
`ClusterMismatch` naming the missing resource and the flag to change. Without `sinfo` (a script
written away from its cluster) nothing is checked.
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
    """The usable nodes of one SLURM partition: the CPUs of each, most first."""

    name: str
    node_cpus: tuple[int, ...]

    @property
    def nodes(self) -> int:
        return len(self.node_cpus)

    @property
    def cpus_per_node(self) -> int:
        """The fewest CPUs any usable node has (0 without nodes)."""
        return min(self.node_cpus, default=0)

    def cpus_on(self, nodes: int) -> int:
        """CPUs per node that a job of `nodes` nodes can count on: the `nodes`-th most of any node
        (SLURM picks nodes that hold the request)."""
        return self.node_cpus[nodes - 1]


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
    return Partition(partition, tuple(sorted(usable.values(), reverse=True)))


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


def _same_world_size(found: Partition, world: int, per_task: int) -> str | None:
    """'--nodes N --gpus-per-node T' that runs `world` processes of `per_task` CPUs on this partition."""
    for nodes in range(1, found.nodes + 1):
        tasks, rest = divmod(world, nodes)
        if not rest and tasks * per_task <= found.cpus_on(nodes):
            return f"--nodes {nodes} --gpus-per-node {tasks}"
    return None


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
    if nodes < 1:
        raise ClusterMismatch(f"--nodes {nodes}: a job needs at least one node")
    if nodes > found.nodes:
        raise ClusterMismatch(f"{where} has {found.nodes} usable node(s), the job asks --nodes {nodes}: "
                              f"pass --nodes {found.nodes} or fewer (more processes per node with --gpus-per-node)")
    cpus = found.cpus_on(nodes)
    tasks = tasks_per_node or max(1, min(2, cpus))
    per_task = cpus_per_task or max(1, cpus // tasks)
    if tasks * per_task > cpus and not overcommit:
        have = f"nodes have {cpus} CPU(s) each" if found.cpus_per_node == cpus else \
            f"{nodes} node(s) with the most CPUs have {cpus} CPU(s) each"
        fitting = max(1, cpus // per_task)
        same_world = _same_world_size(found, nodes * tasks, per_task)
        raise ClusterMismatch(
            f"{where} {have}; this job asks {tasks} training process(es) x {per_task} "
            f"CPU(s) per node: pass --gpus-per-node {fitting} (processes per node"
            + (f"; {same_world} keeps the {nodes * tasks} processes" if same_world else
               "; more --nodes for the same world size")
            + "), a smaller --cpus-per-task, or --overcommit (processes share CPUs: slower)")
    sizes = (f"{found.nodes} usable node(s) x {cpus} CPU(s)" if found.cpus_per_node == cpus else
             f"{found.nodes} usable node(s), {nodes} of them with {cpus} CPU(s) or more")
    return CpuFit(tasks, per_task, overcommit and tasks * per_task > cpus,
                  f"fitted to {where}: {sizes}; {tasks} process(es) x {per_task} CPU(s) per node on {nodes} "
                  f"node(s)" + (" (overcommitted)" if tasks * per_task > cpus else ""))
