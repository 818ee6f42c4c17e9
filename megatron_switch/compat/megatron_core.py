"""Every difference between the megatron-core versions this package meets, as named functions.

setup.py asks for megatron-core 0.16.x (the newest for Python 3.11); the CPU suite has also been run
against 0.19's Python sources, and these are the places where the two differ. Anything that depends
on the version goes through a function here, so the rest of the package reads one API. (The
keyword arguments newer versions pass to every MLP they build, `pg_collection` from 0.17 and
`is_mtp_layer`/`name` from 0.19, are simply accepted by `SwitchMLP`.)
"""

from __future__ import annotations

import os


def start_checkpoint_write_results_queue() -> None:
    """Start dist_checkpointing's write-results queue, forked from this process.

    The torch_dist writer hands every save's results to a multiprocessing Manager queue that lives as
    long as the process. dist_checkpointing starts it at the first save from a spawned interpreter,
    which then imports torch to unpickle the first results: 2-4 s of each rank's first checkpoint on
    a CPU. A fork has torch already. (The writer itself forks its worker processes at every save.)
    0.19 takes the start method as an argument (`get_write_results_queue(mp_mode)`); 0.16's
    `_get_write_results_queue()` does not, so its module-level queue is set here the same way. Does
    nothing once the queue exists."""
    import inspect
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = getattr(filesystem_async, "get_write_results_queue", None)
    if start is not None and "mp_mode" in inspect.signature(start).parameters:
        start("fork")
    elif filesystem_async._results_queue is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


# 0.16 writes a torch_dist checkpoint's common state to `common.pt`; 0.19 keeps it inside the
# checkpoint under this key (its loader reads both).
COMMON_STATE_KEY = "common_state"
COMMON_STATE_FILE = "common.pt"


def common_state_file(path: str) -> str | None:
    """The file holding torch_dist checkpoint `path`'s common state as 0.16 writes it, or None: then
    it is the object COMMON_STATE_KEY inside the checkpoint, as 0.19 writes it."""
    file = os.path.join(path, COMMON_STATE_FILE)
    return file if os.path.isfile(file) else None
