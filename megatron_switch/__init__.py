"""megatron-switch: the Switch Transformer (top-1 mixture of experts) as a Megatron-Core plugin."""

import warnings

# megatron-core warns at import that Transformer Engine and apex are absent (they are optional: torch
# fallbacks are used) and TransformerConfig warns about its own default; only these are silenced.
QUIET_IMPORT_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                         "full scope is deprecated")  # the last: TransformerConfig's own default
for _message in QUIET_IMPORT_WARNINGS:
    warnings.filterwarnings("ignore", message=_message)

from megatron_switch.arguments import add_switch_args  # noqa: E402  (after the filters)
from megatron_switch.config import SwitchConfig, SwitchConfigError  # noqa: E402  (after the filters)
from megatron_switch.initialization import switch_init_method  # noqa: E402  (after the filters)
from megatron_switch.layer import SwitchMLP, SwitchStats, switch_stats  # noqa: E402  (after the filters)
from megatron_switch.parallel import LayoutError, initialize_parallel, validate_layout  # noqa: E402  (after the filters)
from megatron_switch.router import SwitchRouter  # noqa: E402  (after the filters)
from megatron_switch.spec import get_switch_gpt_layer_spec  # noqa: E402  (after the filters)
from megatron_switch.t5 import get_switch_t5_layer_specs  # noqa: E402  (after the filters)

__version__ = "0.1.0"

__all__ = [
    "SwitchConfig", "SwitchConfigError", "SwitchRouter", "SwitchMLP", "SwitchStats", "switch_stats",
    "get_switch_gpt_layer_spec", "get_switch_t5_layer_specs", "add_switch_args", "switch_init_method",
    "initialize_parallel",
    "validate_layout", "LayoutError",
]
