"""megatron-switch: the Switch Transformer (top-1 mixture of experts) as a Megatron-Core plugin.

The public names below are imported on first use (PEP 562), so `import megatron_switch` and the
command-line tools' flag checks do not pay for torch and megatron-core until something needs them.
Importing the package installs no warning filter and patches nothing; the entry points quiet
megatron-core's import-time notices themselves (`megatron_switch.quiet.quiet_import_warnings`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "SwitchConfig": "megatron_switch.config",
    "SwitchConfigError": "megatron_switch.config",
    "add_switch_args": "megatron_switch.arguments",
    "switch_init_method": "megatron_switch.initialization",
    "SwitchMLP": "megatron_switch.layer",
    "SwitchStats": "megatron_switch.layer",
    "switch_stats": "megatron_switch.layer",
    "LayoutError": "megatron_switch.parallel",
    "initialize_parallel": "megatron_switch.parallel",
    "validate_layout": "megatron_switch.parallel",
    "SwitchRouter": "megatron_switch.router",
    "get_switch_gpt_layer_spec": "megatron_switch.specs",
    "get_switch_t5_layer_specs": "megatron_switch.specs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_switch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
