"""Running megatron-core where it assumes CUDA, and across its versions.

`enable_cpu_support()` is the one call that makes megatron-core's CUDA-assuming code paths (torch_dist
checkpoints, pipeline schedules, sequence parallelism, megatron's DDP buffers, named RNG streams) run
on a machine without CUDA; it does nothing where CUDA is present. Call it once after the process
groups exist and before building models (the trainer does; so must any program that uses those
megatron-core pieces on CPU). `seed_parallel_rng(seed)` seeds megatron's named RNG streams on either
device. `megatron_core` holds every version difference (cpu.py and megatron_core.py say what each
piece does).
"""

from __future__ import annotations

from megatron_switch.compat.cpu import CpuRNGStatesTracker, apply_cpu_shims, install_cpu_rng_tracker, seed_parallel_rng


def enable_cpu_support() -> None:
    """Without CUDA: map megatron-core's CUDA-only allocations and synchronisations to the CPU
    (`cpu.apply_cpu_shims`) and make megatron's RNG tracker a CPU one. With CUDA: nothing."""
    apply_cpu_shims()
    install_cpu_rng_tracker()


__all__ = ["CpuRNGStatesTracker", "enable_cpu_support", "seed_parallel_rng"]
