"""Checks of Megatron's indexed datasets (`PREFIX.bin` + `PREFIX.idx`) that need neither torch nor
megatron-core, so `megatron-switch train` answers about bad data before any process starts.

The `.idx` layout (megatron.core.datasets.indexed_dataset): a 9-byte magic, version (<Q, 1), dtype
code (<B), sequence count S and document count D (<Q each), then S int32 lengths, S int64 byte
pointers into `.bin`, D int64 document indices. A truncated or foreign file, a `.bin` shorter than
the index says, and a dataset too small for one training sample are each named with the file and
the fix.
"""

from __future__ import annotations

import os
import struct

import numpy

MAGIC = b"MMIDIDX\x00\x00"
_HEADER = 34  # magic 9 + version 8 + dtype 1 + counts 16
_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # Megatron's DType codes


class DataError(ValueError):
    """Bad data input; the message names the file and what to change."""


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: `PREFIX ...`, or a weighted blend `WEIGHT PREFIX WEIGHT PREFIX ...`."""
    items = list(data_path)
    if len(items) > 1 and len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            return items, None
        if any(not w > 0 for w in weights):
            raise DataError(f"--data-path {' '.join(items)}: blend weights must be > 0, got {weights}")
        return items[1::2], weights
    if len(items) > 1 and _is_number(items[0]):
        raise DataError(f"--data-path {' '.join(items)}: a weighted blend is WEIGHT PREFIX pairs (an even count), "
                        f"e.g. --data-path 0.5 data/a 0.5 data/b")
    return items, None


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
        lengths = numpy.fromfile(f, dtype=numpy.int32, count=sequences)
        pointers = numpy.fromfile(f, dtype=numpy.int64, count=sequences)
    tokens = int(lengths.sum(dtype=numpy.int64))
    expected = int(pointers[-1]) + int(lengths[-1]) * _ITEMSIZE[code] if sequences else 0
    found = os.path.getsize(bin_path(prefix))
    if found < expected:
        raise DataError(f"{bin_path(prefix)} is truncated: {found} bytes, its index needs {expected}; "
                        f"{_preprocess_hint(prefix)}")
    return tokens


def check_enough_tokens(prefixes: list[str], seq_length: int) -> None:
    """Every dataset must hold at least one sample (seq_length + 1 tokens: inputs and shifted labels)."""
    for prefix in prefixes:
        tokens = dataset_tokens(prefix)
        if tokens < seq_length + 1:
            raise DataError(f"--data-path {prefix} holds {tokens} tokens, fewer than one training sample of "
                            f"--seq-length {seq_length} needs ({seq_length + 1}): add data or lower --seq-length")
