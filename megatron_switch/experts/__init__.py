"""Expert banks: the contract (`base.ExpertBank`), the backends, and the choice between them.

Backends (`--switch-expert-backend`): `torch` (`torch_bank.TorchExperts`: bf16/fp32 everywhere, FP8
through `torch._scaled_mm` on GPUs of compute capability 8.9+) and `te` (`te_bank.TEExperts`:
Transformer Engine's GroupedLinear, imported only when chosen). `backend.resolve_expert_backend`
decides, and refuses what this machine cannot run, before any model is built; `build_experts`
constructs the bank. `transformer_engine_problem` is the one Transformer Engine probe of the package.
The banks (which import megatron-core) load on first use, so that checking flags stays quick.
"""

from __future__ import annotations

import importlib

from megatron_switch.experts.backend import (
    FP8_MIN_CAPABILITY,
    build_experts,
    check_fp8_shapes,
    resolve_expert_backend,
    transformer_engine_available,
    transformer_engine_problem,
)

_BANKS = {"ExpertBank": "base", "expert_activation": "base", "expert_ffn_size": "base", "TorchExperts": "torch_bank"}

__all__ = ["FP8_MIN_CAPABILITY", "build_experts", "check_fp8_shapes", "resolve_expert_backend",
           "transformer_engine_available", "transformer_engine_problem", *_BANKS]


def __getattr__(name: str):
    if name in _BANKS:
        return getattr(importlib.import_module(f"megatron_switch.experts.{_BANKS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
