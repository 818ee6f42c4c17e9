"""The embedded default corpus: the Python standard library's own source, present wherever the
project runs. Tokenized on first use and cached as an indexed dataset (one document per file)."""

from __future__ import annotations

import os
import sys

from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

from megatron_switch.data.preprocess import iter_documents, write_indexed_dataset


def cache_dir() -> str:
    return os.environ.get("MEGATRON_SWITCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "megatron_switch"))


def stdlib_sources() -> list:
    """The standard library's top-level .py files, in a fixed order."""
    root = os.path.dirname(os.__file__)
    return [os.path.join(root, name) for name in sorted(os.listdir(root)) if name.endswith(".py")]


def default_corpus(tokenizer, tokenizer_name: str) -> str:
    """Path prefix of the cached default corpus for `tokenizer` (built if missing). Call it on
    one rank first (or under a barrier): the files appear atomically, complete or not at all."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    prefix = os.path.join(cache_dir(), f"stdlib-{version}-{tokenizer_name}")
    if not (os.path.exists(get_bin_path(prefix)) and os.path.exists(get_idx_path(prefix))):
        write_indexed_dataset(iter_documents(stdlib_sources()), prefix, tokenizer)
    return prefix
