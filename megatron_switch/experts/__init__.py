"""Expert banks: the contract (`base.ExpertBank`), the backends, and the choice between them.

Backends (`--switch-expert-backend`): `torch` (`torch_bank.TorchExperts`: bf16/fp32 everywhere, FP8
through `torch._scaled_mm` on GPUs of compute capability 8.9+) and `te` (`te_bank.TEExperts`:
Transformer Engine's GroupedLinear, imported only when chosen). `resolve_expert_backend` decides,
and refuses what this machine cannot run, before any model is built; `build_experts` constructs
the bank. `transformer_engine_problem` is the one Transformer Engine probe of the package.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.config import SwitchConfig, SwitchConfigError
from megatron_switch.experts.base import ExpertBank, expert_activation, expert_ffn_size
from megatron_switch.experts.torch_bank import TorchExperts
from megatron_switch.ops.fp8 import FP8_MULTIPLE

__all__ = ["ExpertBank", "TorchExperts", "build_experts", "check_fp8_shapes", "expert_activation",
           "expert_ffn_size", "resolve_expert_backend", "transformer_engine_available", "transformer_engine_problem"]


@functools.lru_cache(maxsize=None)
def transformer_engine_problem() -> Optional[str]:
    """None when Transformer Engine can build modules here, else why not. The one probe for both the
    expert backend and the dense layers' specs: TE needs a GPU (it cannot build a module without
    one) and must import (some builds fail at import without a driver)."""
    if not torch.cuda.is_available():
        return "no CUDA device (Transformer Engine cannot build a module without a GPU)"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or a driver/library error raised at import
        return f"Transformer Engine does not import ({type(err).__name__}: {err})"
    return None


def transformer_engine_available() -> bool:
    """Whether Transformer Engine can be used here (`transformer_engine_problem` is None)."""
    return transformer_engine_problem() is None


FP8_MIN_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: FP8 tensor cores


def resolve_expert_backend(switch: SwitchConfig) -> str:
    """"torch" or "te" for this machine, or SwitchConfigError saying what to use instead.

    auto: torch (te only when asked for: it has not been run anywhere yet). FP8 on the torch
    backend needs a CUDA GPU of compute capability 8.9+ and the tensorwise recipe; the other
    recipes need te.
    """
    cuda = torch.cuda.is_available()
    backend = switch.expert_backend
    if backend == "auto":
        backend = "torch"
    if backend == "te":
        if not cuda:
            raise SwitchConfigError(
                "--switch-expert-backend te needs CUDA: Transformer Engine cannot build a module without a "
                "GPU, and this machine has none. Use --switch-expert-backend torch (or auto).")
        problem = transformer_engine_problem()
        if problem is not None:
            raise SwitchConfigError(
                f"--switch-expert-backend te: {problem}. Install it in a CUDA image (pip install "
                "'megatron-switch[te]', or use an NGC PyTorch container), or use --switch-expert-backend torch.")
        if switch.fp8_format is not None:
            from megatron_switch.experts.te_bank import te_fp8_recipe

            te_fp8_recipe(switch.fp8_format, switch.fp8_recipe or "delayed")  # raises if unsupported
        return "te"
    if switch.fp8_format is not None:
        recipe = switch.fp8_recipe or "tensorwise"
        if recipe != "tensorwise":
            raise SwitchConfigError(
                f"--fp8-recipe {recipe}: the torch expert backend scales FP8 per tensor (--fp8-recipe "
                "tensorwise); delayed, blockwise and mxfp8 need --switch-expert-backend te.")
        if not cuda:
            raise SwitchConfigError(
                f"--fp8-format {switch.fp8_format} needs a GPU with FP8 tensor cores (compute capability "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+: Ada, Hopper, Blackwell) and this "
                "machine has no CUDA device. Drop --fp8-format to run the experts in bf16/fp32.")
        capability = torch.cuda.get_device_capability()
        if capability < FP8_MIN_CAPABILITY:
            raise SwitchConfigError(
                f"--fp8-format {switch.fp8_format}: {torch.cuda.get_device_name()} (compute capability "
                f"{capability[0]}.{capability[1]}) has no FP8 tensor cores; drop --fp8-format (bf16 experts).")
    return "torch"


def check_fp8_shapes(hidden: int, ffn: int, switch: SwitchConfig) -> None:
    """FP8 GEMMs need both weight dimensions to be multiples of 16."""
    if switch.fp8_format is None:
        return
    for name, size in (("--hidden-size", hidden), ("the expert FFN width", ffn)):
        if size % FP8_MULTIPLE:
            raise SwitchConfigError(
                f"--fp8-format needs {name} to be a multiple of {FP8_MULTIPLE}, got {size}")


def build_experts(config: TransformerConfig, switch: SwitchConfig, num_local_experts: int,
                  first_expert: int, layer_number: int = 1) -> ExpertBank:
    """The expert bank of the backend `resolve_expert_backend` picks for this machine."""
    check_fp8_shapes(config.hidden_size, expert_ffn_size(config, switch), switch)
    if resolve_expert_backend(switch) == "te":
        from megatron_switch.experts.te_bank import TEExperts

        return TEExperts(config, switch, num_local_experts, first_expert, layer_number)
    return TorchExperts(config, switch, num_local_experts, first_expert, layer_number)
