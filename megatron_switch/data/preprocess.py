"""Text or JSONL -> Megatron's indexed dataset (`PREFIX.bin` + `PREFIX.idx`), written atomically.

Plain-text files are one document each; JSONL files hold one document per line under `--json-keys`
(default "text"). Each document ends with the tokenizer's eod token. The files are written under
temporary names and renamed into place only when complete, so an interrupted run leaves no
half-written dataset behind.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Iterable, Iterator, List

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

from megatron_switch.data.check import FINGERPRINT_SUFFIX, DataError, write_pair_fingerprint  # noqa: F401
# (DataError is raised here; importers take it from here too)


def _text(path: str, raw: bytes, where: str) -> str:
    """`raw` as UTF-8 text, or DataError naming the file (and line) for binary or otherwise encoded data."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{where}: a NUL byte at byte {nul}: binary data, not text; pass text (UTF-8) or JSONL files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 text (byte {err.start} is {raw[err.start:err.start + 1]!r}): binary "
                        f"data, or text in another encoding (convert it, e.g. `iconv -f latin1 -t utf-8 {path}`)"
                        ) from None


def iter_documents(paths: Iterable[str], json_key: str = "text") -> Iterator[str]:
    """Each input's documents: a text file is one, a JSONL file one per line (its `json_key` value; empty
    documents are skipped). Binary, non-UTF-8 or empty inputs are refused with the file (and line) named."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"input {path!r} does not exist or is not a file")
        if path.endswith((".jsonl", ".json")):
            with open(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    line = _text(path, raw, f"{path}:{number}")
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{number}: not a JSON line ({err.msg})") from err
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{number}: a JSON {type(record).__name__}, not an object with "
                                        f"a {json_key!r} key")
                    if json_key not in record:
                        raise DataError(f"{path}:{number}: no key {json_key!r}; pass --json-keys "
                                        f"with one of {sorted(record)}")
                    if not isinstance(record[json_key], str):
                        raise DataError(f"{path}:{number}: {json_key!r} holds a {type(record[json_key]).__name__}, "
                                        f"not text")
                    if record[json_key]:
                        yield record[json_key]
        else:
            with open(path, "rb") as f:
                text = _text(path, f.read(), path)
            if not text.strip():
                raise DataError(f"input {path} is empty: it holds no text to tokenize; leave it out of --input")
            yield text


def write_indexed_dataset(documents: Iterable[str], output_prefix: str, tokenizer) -> int:
    """Tokenize `documents` into `output_prefix`.{bin,idx}; returns the number of tokens written."""
    dtype = numpy.uint16 if tokenizer.vocab_size < 65500 else numpy.int32
    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{uuid.uuid4().hex}"  # unique also across hosts sharing the directory
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    total = documents_written = 0
    try:
        for text in documents:
            ids = numpy.append(tokenizer.tokenize(text), tokenizer.eod).astype(numpy.int64)
            builder.add_document(torch.from_numpy(ids), [len(ids)])
            total += len(ids)
            documents_written += 1
        if documents_written == 0:
            raise DataError("no documents found in the inputs (every JSONL document is empty)")
        builder.finalize(get_idx_path(tmp_prefix))
        try:  # an earlier pair's fingerprint: gone before the files change
            os.remove(output_prefix + FINGERPRINT_SUFFIX)
        except FileNotFoundError:
            pass
        os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
        write_pair_fingerprint(output_prefix)
    finally:
        for path in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            if os.path.exists(path):
                os.remove(path)
    return total


def preprocess(inputs: List[str], output_prefix: str, tokenizer, json_key: str = "text") -> int:
    return write_indexed_dataset(iter_documents(inputs, json_key), output_prefix, tokenizer)
