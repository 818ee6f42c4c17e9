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

from megatron_switch.data.check import DataError  # noqa: F401  (raised here; importers take it from here too)




def iter_documents(paths: Iterable[str], json_key: str = "text") -> Iterator[str]:
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"input {path!r} does not exist or is not a file")
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{number}: not a JSON line ({err.msg})") from err
                    if json_key not in record:
                        raise DataError(f"{path}:{number}: no key {json_key!r}; pass --json-keys "
                                        f"with one of {sorted(record)}")
                    yield record[json_key]
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


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
            raise DataError("no documents found in the inputs")
        builder.finalize(get_idx_path(tmp_prefix))
        os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
    finally:
        for path in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            if os.path.exists(path):
                os.remove(path)
    return total


def preprocess(inputs: List[str], output_prefix: str, tokenizer, json_key: str = "text") -> int:
    return write_indexed_dataset(iter_documents(inputs, json_key), output_prefix, tokenizer)
