"""What every rank imports before it starts, imported once by the local launcher's forkserver for all
of its ranks: megatron-core, with its fused activations compiled on first call rather than at import
(`compat.startup.import_megatron_core`), then the trainer."""

from megatron_switch.compat.startup import import_megatron_core

import_megatron_core()

import megatron_switch.training.trainer  # noqa: E402,F401
