"""Importing megatron-core without compiling at import.

megatron-core decorates its fused activations (`megatron.core.jit.jit_fuser`, bound to `torch.compile`
when `megatron.core.jit` is first imported) as its modules load. `torch.compile` compiles nothing until
the function is called, but the call itself imports TorchDynamo and Inductor: about 2 s of the 6 s a
process spends importing the trainer on one core, paid by every rank of every launch, for functions
that a Switch model on the CPU never calls.

`import_megatron_core()` imports megatron-core with `jit_fuser` bound to `compile_on_first_call`, which
hands each function to `torch.compile` (same options) the first time it is called: the same compiled
code when a fused activation is used, nothing imported when it is not. `torch.compile` itself is
restored before the call returns. The entry points call it before their first megatron-core import
(the trainer's ranks through `megatron_switch.training.preload`, the convert command, the tests);
importing the library does not.
"""

from __future__ import annotations

import functools
import sys

_torch_compile = None  # the real torch.compile, kept while import_megatron_core stands in for it


def _real_torch_compile():
    import torch

    return torch.compile


def compile_on_first_call(model=None, **options):
    """`torch.compile(model, **options)`, done the first time the result is called."""
    if model is None:  # used as @torch.compile(**options)
        return functools.partial(compile_on_first_call, **options)
    compile_now = _torch_compile or _real_torch_compile()
    compiled = None

    @functools.wraps(model)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = compile_now(model, **options)
        return compiled(*args, **kwargs)

    return call


def import_megatron_core() -> None:
    """Import megatron-core with its `jit_fuser` compiling on first call (does nothing once megatron-core
    is imported: its decorators have run)."""
    if "megatron.core.jit" in sys.modules:
        return
    global _torch_compile
    import torch

    _torch_compile = torch.compile
    torch.compile = compile_on_first_call
    try:
        import megatron.core  # noqa: F401  (its modules decorate as they load)
        import megatron.core.jit  # noqa: F401
    finally:
        torch.compile = _torch_compile
