"""Stalled ranks: each rank's heartbeat in the rendezvous store, a watch on one neighbour, and the report
that names the rank that stopped answering and the operation the job was in.

Every process group has --distributed-timeout-minutes as its timeout (`parallel.initialize_parallel`),
so a collective never waits longer; but a timeout alone names neither the rank that stopped nor where,
and under NCCL its watchdog aborts the process with no word of the peer. So each rank runs `Heartbeat`,
a daemon thread that every `interval` seconds writes to the job's rendezvous store (its own client
connection, with a deadline on each request) a beat counter, the iteration and what its main thread is
doing (`operation`, read from the thread's Python stack: the torch.distributed call it waits in, and the
code that made it). Rank r also reads rank r+1's beat: a neighbour silent for the timeout less two beats
(before any collective's own timeout: the stall began at the latest when the collective did) is reported
by r, which then ends its own process with the trainer's reported-error status; the launcher (local, srun
--kill-on-bad-exit, torchrun) ends the rest. A rank whose collective fails first (gloo's timeout, or a peer
that went away) calls `report_collective_failure`, which names the ranks whose beats stopped, or, when
every rank still answers, where each one waits (ranks stuck in different collectives). One rank reports
(the store counts reports); each report is one line on stderr.

Cost: one small store write and one read per rank per interval (interval = timeout / 20, 0.1 s to 5 s).
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from types import FrameType
from typing import Callable, Dict, List, Optional, Tuple

PREFIX = "megatron-switch/heartbeat"
DONE = "done"  # a rank that finished (or is ending on purpose) writes this: silence after it is no stall
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = (os.path.abspath(__file__), os.path.join(_PACKAGE, "training", "faults.py"))


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between beats: a twentieth of the timeout, 0.1 s to 5 s."""
    return min(5.0, max(0.1, timeout_s / 20))


def _frames(frame: Optional[FrameType]) -> List[Tuple[FrameType, int]]:
    """(frame, line) from the outermost call to `frame`."""
    out = []
    while frame is not None:
        out.append((frame, frame.f_lineno))
        frame = frame.f_back
    return out[::-1]


def _traceback_frames(tb) -> List[Tuple[FrameType, int]]:
    out = []
    while tb is not None:
        out.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return out


def _where(frame: FrameType, line: int) -> str:
    path = frame.f_code.co_filename.replace(os.sep, "/")
    for marker in ("/megatron_switch/", "/megatron/core/"):
        if marker in path:
            path = path[path.rindex(marker) + 1:]
            break
    return f"{frame.f_code.co_qualname} ({path}:{line})"


def operation(frames: List[Tuple[FrameType, int]]) -> str:
    """What a stack (outermost first) is doing, in words: the innermost torch.distributed call, and the
    innermost frames of megatron-core and of this package under it; 'computing' without a collective."""
    collective = ours = library = None
    for frame, line in frames:
        path = frame.f_code.co_filename
        if f"torch{os.sep}distributed{os.sep}" in path and not path.endswith("c10d_logger.py"):
            collective = collective or "torch.distributed." + frame.f_code.co_name.lstrip("_")  # the outermost
        elif collective is None and path.startswith(_PACKAGE) and path not in _HERE:
            ours = (frame, line)
        elif collective is None and f"{os.sep}megatron{os.sep}core{os.sep}" in path:
            library = (frame, line)
    parts = [collective or "computing (no collective)"]
    if library is not None and (ours is None or frames.index(library) > frames.index(ours)):
        parts.append(f"in {_where(*library)}")
    if ours is not None:
        parts.append(f"{'called from' if len(parts) > 1 else 'in'} {_where(*ours)}")
    return " ".join(parts)


def _store_client(timeout_s: float):
    """A client of the job's rendezvous store (MASTER_ADDR:MASTER_PORT) with its own connection and a
    deadline of `timeout_s` on every request, or None for a job of one process."""
    from torch.distributed import PrefixStore, TCPStore

    if "MASTER_PORT" not in os.environ:
        return None
    store = TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]), None, False,
                     datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return PrefixStore(f"{PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def store_holder() -> str:
    """Who serves the rendezvous store: the local launcher or torchrun's agent, else rank 0."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return "the launcher"
    return "rank 0"


class Heartbeat:
    """This rank's beat and its watch on rank + 1 (see the module docstring). `iteration` is read with
    each beat; `stop()` writes 'done' and ends the thread."""

    def __init__(self, rank: int, world_size: int, timeout_minutes: float, exit_status: int,
                 report: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)):
        self.rank, self.world_size, self.exit_status, self.report = rank, world_size, exit_status, report
        self.timeout_s = timeout_minutes * 60
        self.interval = heartbeat_interval(self.timeout_s)
        self.silence_limit = self.timeout_s - 2 * self.interval
        self.iteration: Optional[int] = None
        self._main = threading.main_thread().ident
        self._stopped = threading.Event()
        self._store = _store_client(max(self.interval, min(10.0, self.silence_limit / 4))) if world_size > 1 else None
        self._thread = threading.Thread(target=self._run, name="megatron-switch heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        if self._store is not None:
            self._beat(0)
            self._thread.start()
        return self

    def stop(self) -> None:
        """No more beats; the others see 'done', not silence."""
        if self._store is None or self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join()
        try:
            self._store.set(str(self.rank), DONE)
        except Exception:  # noqa: BLE001  (the store's holder may be gone: nothing to tell then)
            pass

    def _beat(self, count: int) -> None:
        frames = _frames(sys._current_frames().get(self._main))
        self._store.set(str(self.rank), f"{count}|{self.iteration if self.iteration is not None else '-'}|"
                                        f"{operation(frames)}")

    def _run(self) -> None:
        neighbour = (self.rank + 1) % self.world_size
        seen, seen_at, store_ok_at, count = None, time.monotonic(), time.monotonic(), 0
        while not self._stopped.wait(self.interval):
            count += 1
            try:
                self._beat(count)
                value = self._store.get(str(neighbour)).decode() if self._store.check([str(neighbour)]) else None
                store_ok_at = time.monotonic()
            except Exception:  # noqa: BLE001  (a request past its deadline: the store does not answer)
                silent = time.monotonic() - store_ok_at
                if silent >= self.silence_limit:
                    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                    self._end(f"the rendezvous store at {where} (served by {store_holder()}) has not answered for "
                              f"{silent:.0f} s; rank {self.rank} was in {self._own()}", tell_store=False)
                continue
            if value == DONE:
                continue
            if value != seen:
                seen, seen_at = value, time.monotonic()
            elif time.monotonic() - seen_at >= self.silence_limit:
                silent = time.monotonic() - seen_at
                self._end(f"rank {neighbour} stopped answering: no heartbeat for {silent:.0f} s "
                          f"(--distributed-timeout-minutes {self.timeout_s / 60:g}); its last heartbeat said: "
                          f"{describe_beat(value)}; rank {self.rank} was in {self._own()}")

    def _own(self) -> str:
        where = operation(_frames(sys._current_frames().get(self._main)))
        return where + (f" at iteration {self.iteration}" if self.iteration is not None else "")

    def _end(self, message: str, tell_store: bool = True) -> None:
        """Report (unless another rank did) and end this process: the launcher ends the others."""
        first = True
        if tell_store:
            try:
                first = self._store.add("reported", 1) == 1
            except Exception:  # noqa: BLE001
                pass
        if first:
            self.report(f"megatron-switch train: error: {message}. Ending the job; see the stopped rank's "
                        f"machine (a stopped, swapping or hung process) and resume from the last checkpoint")
        sys.stdout.flush()
        os._exit(self.exit_status)

    def beats(self) -> Dict[int, Optional[str]]:
        """Every rank's last beat (None where it has not written one); {} without a store."""
        if self._store is None:
            return {}
        keys = [str(r) for r in range(self.world_size)]
        return {r: self._store.get(k).decode() if self._store.check([k]) else None for r, k in enumerate(keys)}

    def report_collective_failure(self, err: BaseException) -> str:
        """The report for a collective that failed in this rank's main thread (`err`, with its traceback):
        which ranks stopped beating over the next few beats, or where each rank waits when all answer.
        Returns '' when another rank has already reported (or is reporting) this job's stall."""
        what = operation(_traceback_frames(err.__traceback__))
        at = f" at iteration {self.iteration}" if self.iteration is not None else ""
        if self._store is None:
            return f"rank {self.rank}: {what}{at} failed: {err}"
        try:
            if self._store.check(["reported"]):
                return ""
            first = self.beats()
            self._stopped.wait(3 * self.interval)  # (the thread keeps beating: this rank answers too)
            if self._store.check(["reported"]):
                return ""
            last = self.beats()
            if self._store.add("reported", 1) != 1:
                return ""
        except Exception:  # noqa: BLE001
            return (f"rank {self.rank}: {what}{at} failed ({str(err).splitlines()[0]}), and the rendezvous store "
                    f"(served by {store_holder()}) does not answer")
        silent = [r for r in range(self.world_size) if r != self.rank and last[r] != DONE and last[r] == first[r]]
        if silent:
            return (f"rank {', '.join(map(str, silent))} stopped answering (no heartbeat for "
                    f"{3 * self.interval:.1f} s; last: {describe_beat(last[silent[0]])}); rank {self.rank} waited in "
                    f"{what}{at} until --distributed-timeout-minutes {self.timeout_s / 60:g} ran out")
        waiting: Dict[str, List[int]] = {}
        for r, beat in last.items():
            waiting.setdefault(describe_beat(beat), []).append(r)
        places = "; ".join(f"rank(s) {', '.join(map(str, ranks))}: {place}" for place, ranks in waiting.items())
        return (f"rank {self.rank}: {what}{at} failed ({str(err).splitlines()[0]}) while every rank answers: "
                f"the ranks wait in different places ({places})")


def in_collective(err: BaseException) -> bool:
    """Whether `err` was raised inside a torch.distributed call (a timeout, a peer that went away)."""
    return operation(_traceback_frames(err.__traceback__)).startswith("torch.distributed.")


def describe_beat(value: Optional[str]) -> str:
    if value is None:
        return "no heartbeat yet"
    if value == DONE:
        return "finished"
    _, iteration, where = value.split("|", 2)
    return where + ("" if iteration == "-" else f" at iteration {iteration}")
