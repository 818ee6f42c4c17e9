"""Expert-parallel groups beside TP/PP/DP, and the layout checks that come before them.

`validate_layout` is pure: it checks a (world, TP, PP, EP, num_experts) layout and raises
`LayoutError` naming the violated constraint and a valid alternative, before any process group
exists. `initialize_parallel` validates, then creates the default group (if needed) and
Megatron's groups through `megatron.core.parallel_state`, with expert tensor parallelism 1:
the expert-parallel group folds over TP x DP, and expert parameters are reduced over the
expert-data-parallel group.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from typing import Optional


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message says which constraint and what would."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parallel layout, the one type the package uses for it (validation, checkpoints, planning).

    tp, pp: tensor and pipeline model parallelism; ep: expert parallelism (it folds over TP x DP of a
    pipeline stage); dp: data-parallel size (world / (tp x pp)); etp: expert tensor parallelism (1).
    A checkpoint's layout is its (tp, pp, ep) (`as_dict`; any data-parallel size reads it).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    etp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert: world / (ETP x EP x PP)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def min_world_size(self) -> int:
        """Fewest processes that run the (tp, pp, ep) part: PP x lcm(TP, EP) (experts fold over TP x DP)."""
        return self.pp * math.lcm(self.tp, self.ep)

    def coords(self) -> list[tuple[int, int, int]]:
        """Every (tp, pp, ep) rank coordinate, pipeline stage outermost (one legacy file each)."""
        return [(t, p, e) for p in range(self.pp) for t in range(self.tp) for e in range(self.ep)]

    def as_dict(self) -> dict[str, int]:
        """What a checkpoint records: {"tp", "pp", "ep"}."""
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep}

    @classmethod
    def from_dict(cls, record: dict) -> "Layout":
        """A layout from a checkpoint's record (unknown keys, e.g. world_size, are ignored)."""
        return cls(**{k: int(v) for k, v in record.items() if k in ("tp", "pp", "ep", "dp", "etp")})

    def __str__(self) -> str:
        return f"TP{self.tp} PP{self.pp} EP{self.ep}" + (f" DP{self.dp}" if self.dp > 1 else "")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by x TP (each TP rank an equal share)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def _closest_ep(world_size: int, pp: int, etp: int, ep: int, num_experts: Optional[int]) -> int:
    """The largest EP <= ep that divides the experts and the ranks left after PP and ETP."""
    ranks = world_size // (pp * etp) if world_size % (pp * etp) == 0 else 1
    fits = [d for d in _divisors(ranks) if d <= ep and (num_experts is None or num_experts % d == 0)]
    return max(fits) if fits else 1


def validate_layout(world_size: int, tp: int = 1, pp: int = 1, ep: int = 1,
                    num_experts: Optional[int] = None, etp: int = 1) -> Layout:
    """Check a layout before any process group exists; raise LayoutError with a valid alternative."""
    for name, value in (("world size", world_size), ("--tensor-model-parallel-size", tp),
                        ("--pipeline-model-parallel-size", pp), ("--expert-model-parallel-size", ep),
                        ("--expert-tensor-parallel-size", etp)):
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"{name} must be a positive integer, got {value!r}")
    if num_experts is not None and num_experts < 1:
        raise LayoutError(f"--num-experts must be >= 1, got {num_experts}")
    if num_experts is None and ep > 1:
        raise LayoutError(f"--expert-model-parallel-size {ep} needs --num-experts")
    model = tp * pp
    if world_size % model:
        fits = [d for d in _divisors(world_size) if world_size % (d * pp) == 0 and d <= tp]
        raise LayoutError(
            f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} = {model}: launch a "
            f"multiple of {model} processes (e.g. {model * max(1, -(-world_size // model))}), or use "
            f"--tensor-model-parallel-size {max(fits) if fits else 1}"
            + ("" if world_size % pp == 0 else " with --pipeline-model-parallel-size 1"))
    if num_experts is not None and num_experts % ep:
        raise LayoutError(
            f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size {ep}: "
            f"each rank must hold the same number of experts; use --expert-model-parallel-size "
            f"{_closest_ep(world_size, pp, etp, ep, num_experts)}")
    expert_model = etp * ep * pp
    if world_size % expert_model:
        raise LayoutError(
            f"world size {world_size} is not divisible by ETP x EP x PP = {etp} x {ep} x {pp} = "
            f"{expert_model}: the expert-parallel group folds over the {world_size // pp} ranks of a "
            f"pipeline stage; use --expert-model-parallel-size "
            f"{_closest_ep(world_size, pp, etp, ep, num_experts)}")
    return Layout(tp, pp, ep, world_size // (tp * pp), etp)


def local_rank() -> int:
    """This process's index among the processes of its node (torchrun's LOCAL_RANK, else SLURM's)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def initialize_parallel(tp: int = 1, pp: int = 1, ep: int = 1, num_experts: Optional[int] = None,
                        backend: Optional[str] = None, timeout_minutes: float = 10) -> Layout:
    """Validate the layout, then create the default process group (from torchrun's or SLURM's
    environment, if not created yet) and Megatron's TP/PP/DP/EP groups.

    backend: None picks NCCL with CUDA, gloo otherwise.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    layout = validate_layout(world_size, tp, pp, ep, num_experts)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        if world_size == 1:  # one process meets no one: no port, an in-memory store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                os.environ["MASTER_PORT"] = str(slurm_job_port())
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    from megatron.core import parallel_state

    # Every group megatron-core creates gets the same timeout as the default group (its own default
    # is 30 minutes, whatever the default group's: a stalled rank would hold the others that long).
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
        distributed_timeout_minutes=timeout_minutes)
    return layout


def slurm_job_port() -> int:
    """The rendezvous port of a job step started by a plain `srun` without MASTER_PORT: derived from
    the job id as the sbatch template does (20000 + id % 20000), so that two jobs sharing a node do not
    meet at one fixed port. Outside SLURM there is no default: the launcher sets MASTER_PORT."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or not job.isdigit():
        raise RuntimeError("MASTER_PORT is not set: start several processes with `megatron-switch train "
                           "--nproc-per-node N` (a free port is chosen), torchrun or srun, or set MASTER_ADDR "
                           "and MASTER_PORT")
    return 20000 + int(job) % 20000


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
