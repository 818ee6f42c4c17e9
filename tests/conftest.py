import os

import pytest

from megatron_switch.compat.startup import import_megatron_core
from megatron_switch.quiet import quiet_import_warnings

quiet_import_warnings()  # (the library installs no filter itself; the entry points and this file do)
import_megatron_core()  # as the entry points do (compat/startup.py)


@pytest.fixture
def single_process_groups():
    """Megatron's parallel state for one gloo process (world size 1), torn down afterwards."""
    from megatron_switch.parallel import destroy_parallel, initialize_parallel
    from tests.helpers import free_port

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    initialize_parallel(backend="gloo")
    try:
        yield
    finally:
        destroy_parallel()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
