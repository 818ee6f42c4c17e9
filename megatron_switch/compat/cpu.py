"""CPU support: shims for megatron-core code paths that assume CUDA where nothing needs it, and
megatron's named RNG streams on the CPU.

Applied once, and only when CUDA is absent, so GPU behaviour is untouched:
- megatron's `dist_checkpointing` (torch_dist) save path stages tensors with `non_blocking=True`
  and then `torch.cuda.synchronize()`, and allocates one-element status flags on
  `torch.cuda.current_device()`;
- the pipeline schedules count tokens in `torch.zeros([], device="cuda")`, and their point-to-point
  layer allocates shape messages and receive buffers on `torch.cuda.current_device()`;
- sequence parallelism gathers and scatters the sequence into buffers allocated on
  `torch.cuda.current_device()` (tensor-parallel mappings and linear layers, megatron's global
  memory buffer);
- megatron's DistributedDataParallel allocates its contiguous gradient buffers (`main_grad`) on
  `torch.cuda.current_device()` (CUDA streams only for options this trainer never sets).
Inside those modules only, `torch` is replaced by a stand-in whose `cuda.current_device()` is the
CPU, whose `cuda.synchronize()` does nothing, whose `cuda.current_stream()` has nothing to wait for
(megatron-core 0.19's DDP waits on it before each reduction) and whose `zeros(..., device="cuda")`
allocates on the CPU: on a CPU-only build every tensor already lives on the CPU and every copy is
synchronous.

`seed_parallel_rng` seeds megatron's named RNG streams (tensor-parallel dropout and the like): on
CUDA through megatron's own function, without CUDA in a CPU tracker with the same interface.
"""

from __future__ import annotations

import contextlib
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
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
)


class _CpuStream:
    """The one stream of a CPU: every operation is synchronous, so there is nothing to wait for."""

    def wait_event(self, event) -> None:
        return None

    def wait_stream(self, stream) -> None:
        return None


class _CpuCuda(types.SimpleNamespace):
    """`torch.cuda` as the shimmed megatron modules see it on a machine without CUDA."""

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def current_stream(*args, **kwargs):
        return _CpuStream()

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


class CpuRNGStatesTracker:
    """megatron-core's RNG tracker (`tensor_parallel.get_cuda_rng_tracker()`) for a machine without
    CUDA: the same named streams (data-, tensor- and expert-parallel), each a CPU generator state
    that `fork(name)` swaps in for the duration of the block. Megatron forks the tensor-parallel
    stream around dropout in sharded regions (the embedding's output under sequence parallelism)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict:
        return dict(self.states_)

    def set_states(self, states: dict) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG stream {name} or seed {seed} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG stream {name} was not added (seed_parallel_rng seeds them)")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def install_cpu_rng_tracker() -> None:
    """Without CUDA, make a `CpuRNGStatesTracker` megatron's RNG tracker (once; later calls keep it)."""
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as megatron_random

    if isinstance(megatron_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        return
    # Activation recomputation saves and restores the CPU state, the CUDA state and the
    # tracker's streams; there is no CUDA generator here, so its part is nothing.
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: None
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None
    megatron_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True  # megatron keeps this tracker


def seed_parallel_rng(seed: int) -> None:
    """Seed megatron-core's named RNG streams (data-, tensor- and expert-parallel) with megatron's
    own `model_parallel_cuda_manual_seed`, as Megatron-LM does. Without CUDA a `CpuRNGStatesTracker`
    is installed as megatron's tracker first, so the same streams and seeds live on the CPU.
    Call after the parallel groups exist."""
    from megatron.core import tensor_parallel

    install_cpu_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
