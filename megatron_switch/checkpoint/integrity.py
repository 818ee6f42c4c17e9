"""Checksums and the writer's identity of an iteration directory: `integrity.json`.

Written beside the data of every checkpoint the trainer saves (and every one `convert` writes),
before the directory is renamed into place:

    {"version": 1,
     "writer": {"iteration", "format", "model_config", "layout", "written_by", "training"?},
     "entries": [{"what", "file", "start", "length", "sha256"}, ...]}

An entry is a byte range of one file: for torch_dist, one per tensor shard and object in the
`.distcp` files (named by the tensor's key and its global offset, from the checkpoint's own storage
index) plus the small metadata files whole; for Megatron's legacy format, each `mp_rank_*` file
whole. Verification reads those byte ranges and nothing else, and unpickles nothing, so it names the
exact file, bytes and tensor that changed, and it runs before any loader touches the data. The
writer's identity (JSON) lets the launcher compare a checkpoint with the flags of a run before any
process starts. Work splits over ranks: `entries[rank::world]`.

Checksums protect against corruption (disk, copy, truncation), not against someone who rewrites
the checksums too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from megatron_switch.checkpoint.layout import (
    CheckpointError,
    checkpoint_dir,
    checkpoint_format,
    inside,
    iteration_of,
    saved_iterations,
)

INTEGRITY = "integrity.json"
VERSION = 1
_CHUNK = 16 << 20
_WHOLE_FILES = (".metadata", "common.pt", "metadata.json")


def _sha256(path: str, start: int, length: int) -> str | None:
    """SHA-256 of `length` bytes of `path` from `start`; None when the file is shorter."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                return None
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def plan_entries(path: str) -> list[dict[str, Any]]:
    """The byte ranges of iteration directory `path` that get a checksum (without the checksums).

    torch_dist: reads the directory's DCP storage index (`.metadata`, through the allow-list)."""
    fmt = checkpoint_format(path)
    entries = []
    if fmt == "torch_dist":
        from megatron_switch.checkpoint.distcp import read_metadata

        storage = read_metadata(path, trusted=False).storage_data
        for index, info in sorted(storage.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
            offset = list(index.offset) if index.offset is not None else []
            entries.append({"what": f"{index.fqn}@{','.join(map(str, offset))}", "file": info.relative_path,
                            "start": int(info.offset), "length": int(info.length)})
        whole = [name for name in _WHOLE_FILES if os.path.isfile(os.path.join(path, name))]
    elif fmt == "torch":
        whole = sorted(os.path.relpath(os.path.join(folder, name), path)
                       for folder, _, names in os.walk(path) for name in names)
    else:
        raise CheckpointError(f"{path}: not a checkpoint iteration directory")
    entries += [{"what": name, "file": name, "start": 0, "length": os.path.getsize(os.path.join(path, name))}
                for name in whole]
    return entries


def checksum_entries(path: str, entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`entries` with their sha256 filled in (read from `path`)."""
    return [{**e, "sha256": _sha256(os.path.join(path, e["file"]), e["start"], e["length"])} for e in entries]


def write_integrity(path: str, entries: Sequence[dict[str, Any]], writer: dict[str, Any]) -> None:
    """Write integrity.json into `path` (fsynced): checksummed `entries` and the writer's identity."""
    tmp = os.path.join(path, INTEGRITY + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": VERSION, "writer": writer, "entries": list(entries)}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, INTEGRITY))


def record_integrity(path: str, writer: dict[str, Any]) -> None:
    """Checksum everything in `path` in this process and write integrity.json (one-process writers)."""
    write_integrity(path, checksum_entries(path, plan_entries(path)), writer)


def read_integrity(path: str) -> dict[str, Any] | None:
    """integrity.json of iteration directory `path`, or None when it has none; its records checked
    (`check_record`) before any file they name is opened."""
    file = os.path.join(path, INTEGRITY)
    if not os.path.isfile(file):
        return None
    damaged = ("the checkpoint's checksums are damaged; load an earlier iteration (--ckpt-step N) or start "
               "without --load")
    try:
        with open(inside(path, INTEGRITY, f"{path}: the checksum record"), "rb") as f:
            record = json.load(f)
        record["entries"], record["writer"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file} cannot be read ({type(err).__name__}): {damaged}") from None
    check_record(path, record, damaged)
    return record


_HEX = frozenset("0123456789abcdef")


def check_record(path: str, record: Any, damaged: str) -> None:
    """CheckpointError naming the first entry of integrity record `record` (of iteration directory
    `path`) that is not a byte range of a file inside `path` with a SHA-256: a `file` that is not a
    relative path inside the folder (OutsideCheckpointError), a `start` or `length` that is not a
    non-negative integer, a checksum that is not 64 hex digits. The one place integrity records are
    validated; `damaged` says what to do."""
    file = os.path.join(path, INTEGRITY)
    if not isinstance(record, dict) or not isinstance(record.get("entries"), list) \
            or not isinstance(record.get("writer"), dict):
        raise CheckpointError(f"{file}: not a checksum record (no entries list and writer): {damaged}")
    checked: set[str] = set()
    for i, entry in enumerate(record["entries"]):
        where = f"{file}: entry {i}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} is {type(entry).__name__}, not a record: {damaged}")
        where += f" ({str(entry.get('what'))[:80]})"
        name = entry.get("file")
        if not (isinstance(name, str) and name in checked):
            inside(path, name, where)
            checked.add(name)
        for key in ("start", "length"):
            value = entry.get(key)
            if type(value) is not int or value < 0:
                raise CheckpointError(f"{where}: {key} is {value!r}, not a byte count (a non-negative integer): "
                                      f"{damaged}")
        digest = entry.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
            raise CheckpointError(f"{where}: sha256 is {str(digest)[:80]!r}, not a SHA-256 (64 hex digits): "
                                  f"{damaged}")


def writer_of(path: str) -> dict[str, Any] | None:
    """The writer's identity recorded in iteration directory `path`, or None."""
    record = read_integrity(path)
    return None if record is None else record["writer"]


def check_entries(path: str, entries: Sequence[dict[str, Any]]) -> list[str]:
    """A line for each entry whose bytes differ from its checksum (empty: all good)."""
    problems = []
    for e in entries:
        file = os.path.join(path, e["file"])
        if not os.path.isfile(file):
            problems.append(f"{e['file']} is missing ({e['what']})")
            continue
        found = _sha256(file, e["start"], e["length"])
        if found is None:
            problems.append(f"{e['file']} is shorter than recorded: bytes {e['start']}..{e['start'] + e['length']} "
                            f"({e['what']}) are gone")
        elif found != e["sha256"]:
            problems.append(f"{e['file']} bytes {e['start']}..{e['start'] + e['length']} ({e['what']}) do not "
                            f"match their checksum")
    return problems


def corruption_message(path: str, problems: Sequence[str], last_good: int | None) -> str:
    """One paragraph: what is corrupt, and the iteration to load instead."""
    root = os.path.dirname(os.path.normpath(path))
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    if last_good is not None:
        advice = (f"the last checkpoint there that verifies is iteration {last_good}: resume from it with --load "
                  f"{root} --ckpt-step {last_good}, or start without --load")
    else:
        advice = "no earlier checkpoint there verifies: start without --load"
    return f"checkpoint {path} is corrupt: {shown}; {advice}"


def verify_checkpoint(path: str) -> None:
    """Check every recorded checksum of `path` in this process; CheckpointError naming the damage."""
    record = read_integrity(path)
    if record is None:
        return
    problems = check_entries(path, record["entries"])
    if problems:
        raise CheckpointError(corruption_message(path, problems, last_good_iteration(path)))


def last_good_iteration(path: str, check=None) -> int | None:
    """The newest iteration before `path`'s, in the same root, whose checksums hold. `check(dir)`
    returns its problems (default: this process checks everything)."""
    check = check or (lambda d: check_entries(d, (read_integrity(d) or {"entries": []})["entries"]))
    root, current = os.path.dirname(os.path.normpath(path)), iteration_of(path)
    for iteration in reversed(saved_iterations(root)):
        if current is not None and iteration >= current:
            continue
        earlier = checkpoint_dir(root, iteration)
        try:
            if not check(earlier):
                return iteration
        except CheckpointError:
            continue
    return None


# What a loading run must agree with, and the flag that sets it.
MODEL_FLAGS = {"num_layers": "--num-layers", "hidden_size": "--hidden-size",
               "num_attention_heads": "--num-attention-heads", "ffn_hidden_size": "--ffn-hidden-size",
               "gated_linear_unit": "--swiglu", "num_experts": "--num-experts", "expert_interval": "--moe-layer-freq",
               "padded_vocab_size": "--make-vocab-size-divisible-by",
               # the encoder-decoder (--model t5)
               "encoder_num_layers": "--encoder-num-layers", "decoder_num_layers": "--decoder-num-layers",
               "kv_channels": "--kv-channels", "feed_forward_proj": "--feed-forward-proj",
               "relative_attention_num_buckets": "--relative-attention-num-buckets",
               "relative_attention_max_distance": "--relative-attention-max-distance"}


def model_differences(saved: dict[str, Any], current: dict[str, Any], tp: int = 1,
                      vocab_size: int | None = None) -> list[str]:
    """One phrase per setting where checkpoint (`saved` model_config) and run (`current`) differ;
    only settings both record are compared. `tp` and `vocab_size` (the tokenizer's, unpadded) let
    the padded-vocabulary phrase say which --make-vocab-size-divisible-by matches the checkpoint."""
    differences = []
    if saved and current and saved.get("model", "gpt") != current.get("model", "gpt"):  # GPT records none
        return [f"the checkpoint is a {saved.get('model', 'gpt').upper()} model, this run builds "
                f"{current.get('model', 'gpt').upper()}: pass --model {saved.get('model', 'gpt')}"]
    for key, flag in MODEL_FLAGS.items():
        if key not in saved or key not in current or saved[key] == current[key]:
            continue
        if key == "padded_vocab_size":
            fix = ""
            rows = int(saved[key])
            if rows % tp == 0:
                by = rows // tp
                if vocab_size is None or -(-vocab_size // (by * tp)) * by * tp == rows:
                    fix = f": pass --make-vocab-size-divisible-by {by} at TP={tp}"
            differences.append(f"the padded vocabulary has {rows} rows in the checkpoint, {current[key]} here "
                               f"(megatron pads to a multiple of --make-vocab-size-divisible-by x TP){fix}")
        else:
            differences.append(f"{flag} is {saved[key]} in the checkpoint, {current[key]} here")
    if "num_experts" in saved and "num_experts" not in current:
        differences.append(f"the checkpoint is a Switch model ({saved['num_experts']} experts), this run is "
                           f"dense: add --moe-switch --num-experts {saved['num_experts']}")
    if "num_experts" in current and "num_experts" not in saved and saved:
        differences.append("the checkpoint is a dense model, this run has Switch layers: drop --moe-switch, or "
                           "turn the dense checkpoint into a Switch one first (upcycling)")
    return differences
