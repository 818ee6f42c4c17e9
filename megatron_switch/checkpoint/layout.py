"""Where checkpoints live on disk, as Megatron-LM lays them out; no torch needed.

    <root>/latest_checkpointed_iteration.txt   the tracker: the iteration of the newest complete save
    <root>/iter_0000100/                        one iteration: torch_dist (metadata.json, *.distcp, ...)
                                                or Megatron's legacy per-rank files (mp_rank_*/...)
    <root>/iter_0000100.tmp/                    a save in progress (never read)

The trainer and `megatron-switch convert` both use these functions: `write_tracker` replaces the
tracker atomically (temporary file, fsync, rename), `latest_checkpoint` resolves what `--load`
points at and says what to pass instead when it points at something else.

A checkpoint reads only itself: every file a checkpoint's records name (a storage index, a weight
map, checksum entries) goes through `inside` before it is opened, and records that are small by
nature (the tracker, a config) are read with a size cap (`read_small_file`).
"""

from __future__ import annotations

import os
import re

TRACKER = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^iter_(\d{7,})$")
# A consolidated safetensors folder (checkpoint/consolidated.py) is recognised by this file.
CONSOLIDATED_INDEX = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why, and what to do."""


class OutsideCheckpointError(CheckpointError):
    """A checkpoint names a file outside its own folder; the message names the record and the path."""


def inside(folder: str, name: object, record: str, also: tuple[str, ...] = ()) -> str:
    """`folder`/`name`, for a file that `record` (a storage index entry, a weight map entry, ...)
    names, once it is shown to stay in `folder`: `name` is a relative path that does not climb out,
    and the file it resolves to (symbolic links followed) lies in `folder`, or in one of `also` (a
    Hugging Face cache's blobs). OutsideCheckpointError names the record and the path otherwise.
    Nothing is opened here; the caller opens what this returns."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise OutsideCheckpointError(f"{record} names {name!r}, which is not a file name: the record is damaged or "
                                     f"was not written by a checkpoint writer")
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise OutsideCheckpointError(f"{record} names {name!r}, a path outside the checkpoint's folder {folder}: a "
                                     f"checkpoint reads only its own files, so this record was crafted or edited. "
                                     f"If that file really belongs to the checkpoint, copy it into {folder} and name "
                                     f"it relative to that folder")
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    for root in (folder, *also):
        base = os.path.realpath(root)
        if os.path.commonpath([real, base]) == base:
            return path
    raise OutsideCheckpointError(f"{record} names {name!r}, which resolves (through a symbolic link) to {real}, "
                                 f"outside the checkpoint's folder {folder}: a checkpoint reads only its own files. If "
                                 f"that file really belongs to the checkpoint, copy it into {folder} in place of the "
                                 f"link")


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def iteration_of(path: str) -> int | None:
    """7 for `.../iter_0000007`, None for any other name."""
    match = _ITER.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def checkpoint_format(path: str) -> str | None:
    """"torch_dist", "torch" (legacy mp_rank_* files) or None for what an iteration directory holds."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return "torch_dist"
    if os.path.isdir(path) and any(n.startswith("mp_rank_") for n in os.listdir(path)):
        return "torch"
    return None


def saved_iterations(root: str) -> list[int]:
    """Iterations under `root` with a complete-looking directory (not `.tmp`), oldest first."""
    if not os.path.isdir(root):
        return []
    found = [iteration_of(name) for name in os.listdir(root)]
    return sorted(i for i in found if i is not None and checkpoint_format(checkpoint_dir(root, i)))


def holds_checkpoints(root: str) -> bool:
    """Whether `root` already holds checkpoints (a tracker or complete iteration directories)."""
    return os.path.isfile(os.path.join(root, TRACKER)) or bool(saved_iterations(root))


def read_small_file(path: str, limit: int, what: str) -> bytes:
    """The bytes of `path`, a record that is small by nature (a tracker, a config): at most `limit`
    bytes are read, and CheckpointError names the file and its size when it holds more."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes, more than {what} holds (at most {limit}): "
                              f"it is not {what}; replace it with one, or remove it")
    return data


TRACKER_LIMIT = 4096  # an iteration number (or Megatron-LM's "release"), with room for whitespace


def read_tracker(root: str) -> int:
    """The iteration the tracker of `root` names (read with a size cap)."""
    tracker = os.path.join(root, TRACKER)
    text = read_small_file(tracker, TRACKER_LIMIT, "a tracker").decode(errors="replace").strip()
    if not re.fullmatch(r"\d+", text):
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}; write the iteration "
                              f"to load into it, or pass --ckpt-step N")
    return int(text)


def latest_checkpoint(root: str, step: int | None = None) -> tuple[int, str]:
    """(iteration, directory) to load from `root`: the tracker's iteration, or `step` (--ckpt-step).

    Errors say what to pass instead: the parent of an iteration directory, `convert` for a
    consolidated safetensors folder, an existing iteration when the tracker's is gone."""
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: no such directory")
    if iteration_of(root) is not None and checkpoint_format(root):
        parent = os.path.dirname(os.path.normpath(root)) or "."
        raise CheckpointError(f"--load {root} is one iteration's directory: pass its parent, --load {parent} "
                              f"--ckpt-step {iteration_of(root)} (--ckpt-step picks an iteration other than the "
                              f"latest)")
    if os.path.isfile(os.path.join(root, CONSOLIDATED_INDEX)):
        raise CheckpointError(f"--load {root} is a consolidated safetensors checkpoint, which training does not "
                              f"read: convert it first, `megatron-switch convert --load {root} --save NEW_DIR "
                              f"--format torch_dist`, then --load NEW_DIR")
    saved = saved_iterations(root)
    if step is None:
        tracker = os.path.join(root, TRACKER)
        if not os.path.isfile(tracker):
            hint = f" (found iterations {saved}: pass --ckpt-step N to load one)" if saved else ""
            raise CheckpointError(f"--load {root}: no {TRACKER} (no complete checkpoint was saved there){hint}")
        step = read_tracker(root)
        where = f"{tracker} names iteration {step}"
    else:
        where = f"--ckpt-step {step}"
    path = checkpoint_dir(root, step)
    if checkpoint_format(path) is None:
        others = f"; saved iterations there: {saved}" if saved else ""
        raise CheckpointError(f"{where}, but {path} is missing or incomplete (no metadata.json, no mp_rank_* "
                              f"files){others}")
    return step, path


def write_tracker(root: str, iteration: int) -> None:
    """Point the tracker at `iteration`, atomically: a reader sees the old number or the new one."""
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself on disk
    finally:
        os.close(fd)
