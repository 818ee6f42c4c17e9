"""Checks of Megatron's indexed datasets (`PREFIX.bin` + `PREFIX.idx`) that need neither torch nor
megatron-core, so `megatron-switch train` answers about bad data before any process starts.

The `.idx` layout (megatron.core.datasets.indexed_dataset): a 9-byte magic, version (<Q, 1), dtype
code (<B), sequence count S and document count D (<Q each), then S int32 lengths, S int64 byte
pointers into `.bin`, D int64 document indices. A truncated or foreign file, a `.bin` shorter than
the index says (`check_index_entries`: every entry, not only the last), a `.bin` and `.idx` that were
not written together (`check_pair`), and a dataset too small for one training sample are each named
with the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy

MAGIC = b"MMIDIDX\x00\x00"
_HEADER = 34  # magic 9 + version 8 + dtype 1 + counts 16
_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # Megatron's DType codes


class DataError(ValueError):
    """Bad data input; the message names the file and what to change."""


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: `PREFIX ...`, or a weighted blend `WEIGHT PREFIX WEIGHT PREFIX ...` (a prefix
    may be given as its .bin or .idx file: `data_prefix`)."""
    items = list(data_path)
    if len(items) > 1 and len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            return [data_prefix(item) for item in items], None
        if any(not w > 0 for w in weights):
            raise DataError(f"--data-path {' '.join(items)}: blend weights must be > 0, got {weights}")
        return [data_prefix(item) for item in items[1::2]], weights
    if len(items) > 1 and _is_number(items[0]):
        raise DataError(f"--data-path {' '.join(items)}: a weighted blend is WEIGHT PREFIX pairs (an even count), "
                        f"e.g. --data-path 0.5 data/a 0.5 data/b")
    return [data_prefix(item) for item in items], None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_split(split: str) -> list[float]:
    """--split as three weights (train, validation, test), e.g. '969,30,1'."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise DataError(f"--split {split!r}: expected comma-separated weights such as 969,30,1") from None
    weights = (weights + [0.0, 0.0, 0.0])[:3]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"--split {split!r}: weights must be >= 0 with a positive sum")
    return weights


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def _preprocess_hint(prefix: str) -> str:
    return f"create it again with `megatron-switch preprocess --input FILES --output-prefix {prefix}`"


def data_prefix(item: str) -> str:
    """A --data-path item as Megatron's prefix: `x.bin` or `x.idx` (a file of the pair) means `x` when there is
    no `x.bin.bin`."""
    for suffix in (".bin", ".idx"):
        if item.endswith(suffix) and not os.path.isfile(bin_path(item)) and os.path.isfile(item):
            return item[:-len(suffix)]
    return item


def dataset_tokens(prefix: str) -> int:
    """Tokens in the indexed dataset `prefix`, after checking that both files exist and agree."""
    for path in (bin_path(prefix), idx_path(prefix)):
        if not os.path.isfile(path):
            raise DataError(f"--data-path {prefix}: {path} not found; {_preprocess_hint(prefix)}")
    idx = idx_path(prefix)
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER)
        if len(head) < _HEADER or head[:9] != MAGIC:
            raise DataError(f"{idx} is not a Megatron index file (too short or wrong magic): "
                            f"{_preprocess_hint(prefix)}")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in _ITEMSIZE:
            raise DataError(f"{idx}: unknown index version {version} or token type {code}: {_preprocess_hint(prefix)}")
        needed = _HEADER + 12 * sequences + 8 * documents
        if size < needed:
            raise DataError(f"{idx} is truncated: {size} bytes, its header needs {needed} for {sequences} sequences; "
                            f"{_preprocess_hint(prefix)}")
        tokens = check_index_entries(prefix, f, _ITEMSIZE[code], sequences, documents)
        end = 0
        if sequences:  # where the last sequence ends: Megatron's builder writes the .bin up to there, no further
            f.seek(_HEADER + 4 * (sequences - 1))
            length = int(numpy.fromfile(f, dtype=numpy.int32, count=1)[0])
            f.seek(_HEADER + 4 * sequences + 8 * (sequences - 1))
            end = int(numpy.fromfile(f, dtype=numpy.int64, count=1)[0]) + length * _ITEMSIZE[code]
    check_pair(prefix, end)
    return tokens


_CHUNK = 1 << 20  # index entries checked at a time (20 MiB of numpy arrays)


def check_index_entries(prefix: str, f, itemsize: int, sequences: int, documents: int) -> int:
    """Tokens of indexed dataset `prefix` after every entry of its `.idx` (open as `f`, just past the
    header) is checked against its `.bin`, a chunk at a time: every sequence length non-negative,
    every sequence (pointer + length x token size) inside the `.bin`, and the document index a
    non-decreasing run from 0 to the sequence count (megatron-core's reader checks none of it:
    a negative length reads as the rest of the .bin, a pointer past it fails when that sample
    is drawn). DataError names the file, the entry and the fix."""
    idx, data = idx_path(prefix), bin_path(prefix)
    size = os.path.getsize(data)
    hint = f"the index is corrupt or belongs to another .bin; {_preprocess_hint(prefix)}"
    tokens = 0
    for start in range(0, sequences, _CHUNK):
        count = min(_CHUNK, sequences - start)
        f.seek(_HEADER + 4 * start)
        lengths = numpy.fromfile(f, dtype=numpy.int32, count=count).astype(numpy.int64)
        f.seek(_HEADER + 4 * sequences + 8 * start)
        pointers = numpy.fromfile(f, dtype=numpy.int64, count=count)
        ends = pointers + lengths * itemsize  # no overflow once pointers are within the .bin
        bad = numpy.flatnonzero((lengths < 0) | (pointers < 0) | (pointers > size) | (ends > size))
        if bad.size:
            i = int(bad[0])
            where = f"{idx}: sequence {start + i} (of {sequences})"
            if lengths[i] < 0:
                raise DataError(f"{where} has a negative length, {lengths[i]}: {hint}")
            raise DataError(f"{where} lies at bytes {pointers[i]}..{pointers[i] + lengths[i] * itemsize} of {data}, "
                            f"which holds {size} bytes: {hint}")
        tokens += int(lengths.sum())
    f.seek(_HEADER + 12 * sequences)
    previous = 0
    for start in range(0, documents, _CHUNK):
        firsts = numpy.fromfile(f, dtype=numpy.int64, count=min(_CHUNK, documents - start))
        bad = (numpy.diff(firsts, prepend=previous) < 0) | (firsts > sequences)
        bad[0] |= start == 0 and firsts[0] != 0
        if bad.any():
            j = int(numpy.flatnonzero(bad)[0])
            raise DataError(f"{idx}: document index entry {start + j} (of {documents}) is {firsts[j]}; the entries "
                            f"rise from 0 to the sequence count {sequences}: {hint}")
        previous = int(firsts[-1])
    if previous != sequences or not documents:
        raise DataError(f"{idx}: its document index ({documents} entries) ends at {previous}, not at the sequence "
                        f"count {sequences}: {hint}")
    return tokens


FINGERPRINT_SUFFIX = ".fingerprint.json"  # beside PREFIX.bin and PREFIX.idx, written by `preprocess`


def check_pair(prefix: str, bin_bytes: int) -> None:
    """`prefix`.bin and .idx were written together: the .bin holds exactly the `bin_bytes` the index's last
    sequence ends at (Megatron's builder writes nothing else), and where `preprocess` left a fingerprint of
    the pair (`pair_fingerprint`), the files still match it. A .idx from another dataset whose sequences
    happen to fit in this .bin would otherwise read the wrong tokens without a word."""
    binary, index = bin_path(prefix), idx_path(prefix)
    found = os.path.getsize(binary)
    if found < bin_bytes:
        raise DataError(f"{binary} is truncated: {found} bytes, its index needs {bin_bytes}; "
                        f"{_preprocess_hint(prefix)}")
    if found > bin_bytes:
        raise DataError(f"{binary} ({found} bytes) and {index} (its sequences end at byte {bin_bytes}) are not one "
                        f"pair: the .bin holds {found - bin_bytes} bytes the index does not cover (a .idx from "
                        f"another dataset?); pass the prefix whose .bin and .idx were written together, or "
                        f"{_preprocess_hint(prefix)}")
    recorded = prefix + FINGERPRINT_SUFFIX
    if os.path.isfile(recorded):
        with open(recorded) as f:
            expected = json.load(f).get("sha256")
        if expected != pair_fingerprint(prefix):
            raise DataError(f"{binary} and {index} do not match {recorded}, written with them by preprocess: one "
                            f"of the files was replaced (a .bin or .idx from another dataset?); pass the prefix "
                            f"whose files were written together, or {_preprocess_hint(prefix)} (if the pair was "
                            f"rewritten by another tool, delete {recorded})")


def pair_fingerprint(prefix: str, samples: int = 64, block: int = 4096) -> str:
    """SHA-256 over both files' sizes, their first and last MiB and `samples` evenly spaced blocks of each: a
    constant cost per dataset (not a read of a terabyte .bin at every launch), and a different value for
    any pair of files of other contents."""
    digest = hashlib.sha256(b"megatron-switch indexed pair 1")
    for path in (bin_path(prefix), idx_path(prefix)):
        size = os.path.getsize(path)
        digest.update(struct.pack("<Q", size))
        with open(path, "rb") as f:
            spans = [(0, 1 << 20), (max(0, size - (1 << 20)), 1 << 20)]
            spans += [(size * k // (samples + 1), block) for k in range(1, samples + 1)]
            for offset, length in spans:
                f.seek(offset)
                digest.update(f.read(length))
    return digest.hexdigest()


def write_pair_fingerprint(prefix: str) -> None:
    """Record `pair_fingerprint(prefix)` beside the pair (written to a temporary name, then renamed)."""
    recorded = prefix + FINGERPRINT_SUFFIX
    temporary = f"{recorded}.tmp-{os.getpid()}-{os.urandom(4).hex()}"  # (builders on several hosts may race)
    with open(temporary, "w") as f:
        json.dump({"sha256": pair_fingerprint(prefix), "bin": os.path.basename(bin_path(prefix)),
                   "idx": os.path.basename(idx_path(prefix))}, f)
    os.replace(temporary, recorded)


def check_enough_tokens(prefixes: list[str], seq_length: int) -> None:
    """Every dataset must hold at least one sample (seq_length + 1 tokens: inputs and shifted labels)."""
    for prefix in prefixes:
        tokens = dataset_tokens(prefix)
        if tokens < seq_length + 1:
            raise DataError(f"--data-path {prefix} holds {tokens} tokens, fewer than one training sample of "
                            f"--seq-length {seq_length} needs ({seq_length + 1}): add data or lower --seq-length")
