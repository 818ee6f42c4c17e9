"""Layout search: every valid (TP, PP, EP, DP) for a model on a cluster, the memory of each, and
the fitting ones ranked, with the reasons in words.

Valid: `megatron_switch.parallel.validate_layout` accepts it; TP divides the GPUs of a node (tensor
parallelism stays on NVLink), the heads and the FFN widths (and the sequence, for sequence
parallelism); PP divides the layers (encoder-decoder models: PP = 1); DP divides
global batch / micro batch. Fits: the memory estimate of its most loaded rank is within the GPU's
memory less a reserve (CUDA context, NCCL buffers, fragmentation).

Ranking, best first: no recomputation before recomputation; then the smallest model-parallel size
TP x PP (less communication per layer, no pipeline bubble), TP before PP at equal size; then an
expert-parallel group inside one node (all-to-all over NVLink) before one that spans nodes; then
the largest EP (fewer experts per GPU: less memory and a smaller expert-gradient reduction).
`NoLayoutFits` says how many GPUs the smallest fitting layout needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from megatron_switch.parallel import Layout, LayoutError, validate_layout
from megatron_switch.planning.memory import (
    GIB,
    MemoryEstimate,
    TrainingSetup,
    estimate_memory,
)
from megatron_switch.planning.model import ModelSpec


class NoLayoutFits(ValueError):
    """No valid layout fits in memory; the message says how many GPUs would, or what to change."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """nodes x gpus_per_node devices of gpu_memory bytes each (CPU: tasks and memory per task)."""

    nodes: int
    gpus_per_node: int
    gpu_memory: float
    memory_reserve: float = 0.1  # fraction kept free

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {self.nodes} and {self.gpus_per_node}")
        if self.gpu_memory <= 0 or not 0 <= self.memory_reserve < 1:
            raise ValueError("--gpu-memory must be > 0 and --memory-reserve in [0, 1)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_memory(self) -> float:
        return self.gpu_memory * (1 - self.memory_reserve)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One valid layout with its memory estimate and the reasons for its rank."""

    layout: Layout
    recompute: bool
    memory: MemoryEstimate
    fits: bool
    reasons: tuple[str, ...]
    gpus_per_node: int

    tp = property(lambda self: self.layout.tp)
    pp = property(lambda self: self.layout.pp)
    ep = property(lambda self: self.layout.ep)
    dp = property(lambda self: self.layout.dp)
    world_size = property(lambda self: self.layout.world_size)
    expert_dp = property(lambda self: self.layout.expert_dp)

    def sort_key(self) -> tuple:
        return (not self.fits, self.recompute, self.tp * self.pp, self.pp, self.ep > self.gpus_per_node,
                -self.ep, self.memory.total)

    def as_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "dp": self.dp, "expert_dp": self.expert_dp,
                "world_size": self.world_size, "recompute": self.recompute, "fits": self.fits,
                "memory_bytes": self.memory.as_dict(), "reasons": list(self.reasons)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_parallel_sizes(spec: ModelSpec, gpus_per_node: int, sequence_parallel: bool) -> list[int]:
    """TP sizes that fit in a node and divide the heads, the FFN widths (and the sequence)."""
    sizes = []
    for tp in _divisors(gpus_per_node):
        widths = (spec.num_attention_heads, spec.ffn_hidden_size, spec.expert_ffn)
        if any(w % tp for w in widths):
            continue
        if sequence_parallel and tp > 1 and (spec.seq_length % tp or spec.decoder_tokens % tp):
            continue
        sizes.append(tp)
    return sizes


def pipeline_parallel_sizes(spec: ModelSpec, allow_tied_pipeline: bool = True) -> list[int]:
    if spec.encoder_decoder or (spec.tie_embeddings and not allow_tied_pipeline):
        return [1]
    return _divisors(spec.num_layers)


def _reasons(spec: ModelSpec, cluster: Cluster, setup: TrainingSetup, tp: int, pp: int, ep: int, dp: int,
             memory: MemoryEstimate, recompute: bool) -> tuple[str, ...]:
    usable = cluster.usable_memory / GIB
    need = memory.total / GIB
    fits = (f"fits: {need:.1f} of {usable:.1f} GiB usable" if memory.total <= cluster.usable_memory
            else f"does not fit: needs {need:.1f} GiB, {usable:.1f} GiB usable")
    reasons = [fits]
    reasons.append("TP=1: no tensor-parallel all-reduces" if tp == 1
                   else f"TP={tp} inside a node" + (" with sequence parallelism" if setup.sequence_parallel else ""))
    micro = max(1, setup.global_batch_size // (setup.micro_batch_size * dp))
    reasons.append("PP=1: no pipeline bubble" if pp == 1
                   else f"PP={pp}: 1F1B bubble (PP-1)/(m+PP-1) = {(pp - 1) / (micro + pp - 1):.0%} with m={micro}")
    if ep == 1:
        reasons.append("EP=1: every rank holds all experts, no all-to-all")
    elif ep <= cluster.gpus_per_node:
        reasons.append(f"EP={ep}: expert all-to-all inside a node")
    else:
        reasons.append(f"EP={ep} spans {ep // cluster.gpus_per_node} nodes: all-to-all over the network")
    world = tp * pp * dp
    expert_dp = world // (ep * pp)
    reasons.append(f"{spec.num_experts // ep} experts per GPU, " + (
        f"expert gradients reduced over {expert_dp} ranks" if expert_dp > 1 else "one copy of each expert"))
    if recompute:
        reasons.append("full activation recomputation (one more forward pass per step)")
    return tuple(reasons)


def evaluate(spec: ModelSpec, cluster: Cluster, setup: TrainingSetup, tp: int, pp: int, ep: int,
             recompute: bool = False) -> Candidate:
    """One layout on `cluster` (validated first: raises LayoutError if it cannot work)."""
    layout = validate_layout(cluster.world_size, tp, pp, ep, spec.num_experts)
    dp = layout.dp
    if setup.global_batch_size % (setup.micro_batch_size * dp):
        raise LayoutError(f"global batch {setup.global_batch_size} is not divisible by micro batch "
                          f"{setup.micro_batch_size} x DP {dp}")
    run = dataclasses.replace(setup, recompute=recompute)
    memory = estimate_memory(spec, run, tp, pp, ep, dp)
    return Candidate(layout, recompute, memory, memory.total <= cluster.usable_memory,
                     _reasons(spec, cluster, run, tp, pp, ep, dp, memory, recompute), cluster.gpus_per_node)


def candidates(spec: ModelSpec, cluster: Cluster, setup: TrainingSetup, allow_recompute: bool = True,
               allow_tied_pipeline: bool = True) -> Iterator[Candidate]:
    """Every valid layout of the cluster (fitting or not), unordered."""
    world = cluster.world_size
    for tp in tensor_parallel_sizes(spec, cluster.gpus_per_node, setup.sequence_parallel):
        for pp in pipeline_parallel_sizes(spec, allow_tied_pipeline):
            if world % (tp * pp):
                continue
            for ep in _divisors(spec.num_experts):
                try:
                    plain = evaluate(spec, cluster, setup, tp, pp, ep)
                except LayoutError:
                    continue
                # Recomputation is offered only where the layout does not fit without it.
                yield evaluate(spec, cluster, setup, tp, pp, ep, True) if allow_recompute and not plain.fits else plain


def search_layouts(spec: ModelSpec, cluster: Cluster, setup: TrainingSetup, top: int = 5,
                   allow_recompute: bool = True, allow_tied_pipeline: bool = True) -> list[Candidate]:
    """The `top` fitting layouts, best first; NoLayoutFits if none fits."""
    found = sorted(candidates(spec, cluster, setup, allow_recompute, allow_tied_pipeline), key=Candidate.sort_key)
    fitting = [c for c in found if c.fits]
    if fitting:
        return fitting[:top]
    smallest = smallest_fitting_cluster(spec, cluster, setup, allow_recompute, allow_tied_pipeline)
    what = f"{cluster.nodes} node(s) x {cluster.gpus_per_node} GPU(s) of {cluster.gpu_memory / GIB:.0f} GiB"
    if not found:
        problem = (f"no valid layout for {what}: the world size, global batch {setup.global_batch_size} / "
                   f"micro batch {setup.micro_batch_size}, heads, layers and experts leave no TP/PP/EP/DP "
                   "combination")
    else:
        least = min(found, key=lambda c: c.memory.total)
        problem = (f"nothing fits on {what}: the smallest layout needs {least.memory.total / GIB:.1f} GiB per GPU "
                   f"(TP={least.tp} PP={least.pp} EP={least.ep} DP={least.dp}), "
                   f"{cluster.usable_memory / GIB:.1f} GiB usable")
    if smallest is None:
        raise NoLayoutFits(f"{problem}; no cluster of {cluster.gpus_per_node}-GPU nodes fits it with these "
                           "settings: lower --micro-batch-size or --seq-length, or allow recomputation")
    raise NoLayoutFits(
        f"{problem}; {smallest.world_size} GPUs would fit it "
        f"(--nodes {max(1, smallest.world_size // cluster.gpus_per_node)} --gpus-per-node {cluster.gpus_per_node}: "
        f"TP={smallest.tp} PP={smallest.pp} EP={smallest.ep} DP={smallest.dp}"
        + (", full recomputation" if smallest.recompute else "") + ")")


def smallest_fitting_cluster(spec: ModelSpec, cluster: Cluster, setup: TrainingSetup,
                             allow_recompute: bool = True, allow_tied_pipeline: bool = True,
                             max_nodes: int = 1 << 16) -> Candidate | None:
    """The best-ranked fitting layout with the fewest GPUs, on whole nodes of this cluster's kind
    (or on part of one node); None if none up to max_nodes nodes."""
    gpn = cluster.gpus_per_node
    if setup.global_batch_size % setup.micro_batch_size:
        return None
    worlds = {tp * pp * dp
              for tp in tensor_parallel_sizes(spec, gpn, setup.sequence_parallel)
              for pp in pipeline_parallel_sizes(spec, allow_tied_pipeline)
              for dp in _divisors(setup.global_batch_size // setup.micro_batch_size)}
    for world in sorted(w for w in worlds if (w < gpn or w % gpn == 0) and w <= max_nodes * gpn):
        trial = dataclasses.replace(cluster, nodes=max(1, world // gpn), gpus_per_node=min(gpn, world))
        fitting = [c for c in candidates(spec, trial, setup, allow_recompute, allow_tied_pipeline) if c.fits]
        if fitting:
            return min(fitting, key=Candidate.sort_key)
    return None
