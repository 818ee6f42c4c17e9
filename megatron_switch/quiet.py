"""The notices megatron-core prints when it is imported, which the entry points silence.

megatron-core warns at import that Transformer Engine and apex are absent (both optional: its torch
fallbacks are used) and TransformerConfig warns about its own default. The library installs no
filter when imported; the command-line entry points (and the test configuration) call
`quiet_import_warnings()`, which also tells processes they spawn through PYTHONWARNINGS.
"""

from __future__ import annotations

import os
import warnings

QUIET_IMPORT_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                         "full scope is deprecated")  # the last: TransformerConfig's own default


def quiet_import_warnings() -> None:
    """Ignore exactly these notices, here and (through the environment) in spawned workers."""
    for message in QUIET_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore:{m}" for m in QUIET_IMPORT_WARNINGS))
