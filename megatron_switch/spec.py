"""The `--spec` face: `get_switch_gpt_layer_spec` as Megatron-LM's `--spec megatron_switch.spec
get_switch_gpt_layer_spec` and as a function.

Called, it is `specs.gpt.get_switch_gpt_layer_spec(config, switch, ...)` (the layer specs of a
pipeline stage). Handed to Megatron-LM's GPTModel uncalled (what `--spec` does), it is a ModuleSpec
of `megatron_lm.layer.SwitchTransformerLayer`, which builds the same layers from Megatron-LM's
arguments. Library code and tests use `megatron_switch.specs`; this module exists for `--spec`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_switch.megatron_lm.layer import SwitchTransformerLayer
from megatron_switch.specs.gpt import get_switch_gpt_layer_spec as _layer_specs


@dataclasses.dataclass
class _SpecFunction(ModuleSpec):
    """A function that is also a layer spec: called, it runs `function`; handed to a model as a
    spec, it builds `module` (a TransformerLayer) for every layer."""

    function: Optional[Callable] = None

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)


get_switch_gpt_layer_spec = functools.update_wrapper(
    _SpecFunction(module=SwitchTransformerLayer, function=_layer_specs), _layer_specs)
get_switch_gpt_layer_spec.__name__ = get_switch_gpt_layer_spec.__qualname__ = "get_switch_gpt_layer_spec"
