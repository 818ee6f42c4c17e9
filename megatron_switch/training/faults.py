"""Fault injection for testing the trainer's guarantees: kill a rank at a named point of a run.

    MEGATRON_SWITCH_FAULT=<point>:<rank>[:<iteration>[:<signal>]]

makes global rank <rank> kill itself with SIGKILL (no cleanup, no message: what a crashed node or an
out-of-memory kill looks like) when it reaches <point>, optionally only at iteration <iteration> (`*`:
any). <signal> STOP sends SIGSTOP instead: the rank stops answering, as a hung or swapped-out node does.
Points: `step` (after a training step's backward, before the optimizer), `save` (after this rank
wrote its part of a checkpoint, before the checkpoint is complete), `load` (after the checksums
were verified, before the state is restored), `eval` (inside an evaluation pass). Unset (always, in
real runs), `fault_point` only reads one environment variable.
"""

from __future__ import annotations

import os
import signal

FAULT_VARIABLE = "MEGATRON_SWITCH_FAULT"
POINTS = ("step", "save", "load", "eval")


def fault_point(point: str, rank: int, iteration: int | None = None) -> None:
    """SIGKILL (or SIGSTOP) this process if MEGATRON_SWITCH_FAULT names this point, rank (and iteration)."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != rank:
        return
    if len(parts) > 2 and parts[2] != "*" and iteration is not None and int(parts[2]) != iteration:
        return
    os.kill(os.getpid(), signal.Signals["SIG" + (parts[3] if len(parts) > 3 else "KILL")])
