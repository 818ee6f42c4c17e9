"""The notices megatron-core prints that say nothing to a Switch user, which the entry points silence.

megatron-core warns at import that Transformer Engine and apex are absent (both optional: its torch
fallbacks are used), TransformerConfig warns about its own default, and TransformerLayer logs
"Unknown MLP type" for every MLP spec it does not know, which a SwitchMLP is by design. The library
installs no filter when imported; the command-line entry points (and the test configuration) call
`quiet_import_warnings()`, which also tells processes they spawn through PYTHONWARNINGS.
"""

from __future__ import annotations

import logging
import os
import warnings

QUIET_IMPORT_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                         "full scope is deprecated")  # the last: TransformerConfig's own default


class _UnknownSwitchMLPSpec(logging.Filter):
    """Drops TransformerLayer's "Unknown MLP type" message (SwitchMLP's settings travel in its spec)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


_MLP_FILTER = _UnknownSwitchMLPSpec()


def quiet_import_warnings() -> None:
    """Ignore exactly these notices, here and (through the environment) in spawned workers."""
    for message in QUIET_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore:{m}" for m in QUIET_IMPORT_WARNINGS))
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if _MLP_FILTER not in logger.filters:
        logger.addFilter(_MLP_FILTER)
