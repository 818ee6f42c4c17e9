"""Shims for megatron-core 0.16.1 code paths that assume CUDA where nothing needs it.

Applied once, and only when CUDA is absent, so GPU behaviour is untouched:
- megatron's `dist_checkpointing` (torch_dist) save path stages tensors with `non_blocking=True`
  and then `torch.cuda.synchronize()`, and allocates one-element status flags on
  `torch.cuda.current_device()`;
- the pipeline schedules count tokens in `torch.zeros([], device="cuda")`, and their point-to-point
  layer allocates shape messages and receive buffers on `torch.cuda.current_device()`.
Inside those modules only, `torch` is replaced by a stand-in whose `cuda.current_device()` is the
CPU, whose `cuda.synchronize()` does nothing and whose `zeros(..., device="cuda")` allocates on the
CPU: on a CPU-only build every tensor already lives on the CPU and every copy is synchronous.
"""

from __future__ import annotations

import importlib
import types

import torch

_APPLIED = False
_CPU_SHIMMED_MODULES = (
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
)


class _CpuCuda(types.SimpleNamespace):
    """`torch.cuda` as seen by megatron's checkpoint code on a machine without CUDA."""

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithCpuCuda(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


def apply_cpu_shims() -> None:
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    proxy = _TorchWithCpuCuda()
    for name in _CPU_SHIMMED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    _APPLIED = True
