"""Every difference between the megatron-core versions this package meets, as named functions.

setup.py asks for megatron-core 0.16.x (the newest for Python 3.11); the CPU suite has also been run
against 0.19's Python sources, and these are the places where the two differ. Anything that depends
on the version goes through a function here, so the rest of the package reads one API. (The
keyword arguments newer versions pass to every MLP they build, `pg_collection` from 0.17 and
`is_mtp_layer`/`name` from 0.19, are simply accepted by `SwitchMLP`.)
"""

from __future__ import annotations

from typing import Any, Callable


def checkpoint_write_results_queue() -> Callable[[], Any]:
    """dist_checkpointing's function that starts its write-results queue (a multiprocessing Manager):
    `_get_write_results_queue` in 0.16, `get_write_results_queue` in 0.19."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue


# 0.16 writes a torch_dist checkpoint's common state to `common.pt`; 0.19 keeps it inside the
# checkpoint under this key (its loader reads both).
COMMON_STATE_KEY = "common_state"
COMMON_STATE_FILE = "common.pt"
