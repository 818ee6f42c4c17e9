"""The embedded default corpus: the Python standard library's own source, present wherever the
project runs. Tokenized on first use and cached as an indexed dataset (one document per file) under
MEGATRON_SWITCH_CACHE; in a distributed run, once per filesystem (`default_corpus_on_every_node`)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

from megatron_switch.ops.collectives import comm_device
from megatron_switch.data.preprocess import DataError, iter_documents, write_indexed_dataset
from megatron_switch.parallel import local_rank


def cache_dir() -> str:
    return os.environ.get("MEGATRON_SWITCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "megatron_switch"))


def stdlib_sources() -> list:
    """The standard library's top-level .py files, in a fixed order."""
    root = os.path.dirname(os.__file__)
    return [os.path.join(root, name) for name in sorted(os.listdir(root)) if name.endswith(".py")]


def corpus_prefix(tokenizer_name: str) -> str:
    """Where the default corpus for `tokenizer_name` is cached (PREFIX.bin, PREFIX.idx)."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.join(cache_dir(), f"stdlib-{version}-{tokenizer_name}")


def _present(prefix: str) -> bool:
    return os.path.exists(get_bin_path(prefix)) and os.path.exists(get_idx_path(prefix))


def default_corpus(tokenizer, tokenizer_name: str) -> str:
    """Path prefix of the cached default corpus for `tokenizer` (built if missing). The files appear
    atomically, complete or not at all, so concurrent builders only repeat work."""
    prefix = corpus_prefix(tokenizer_name)
    if not _present(prefix):
        write_indexed_dataset(iter_documents(stdlib_sources()), prefix, tokenizer)
    return prefix


def _build_on_some_ranks(builds_here: bool, tokenizer, tokenizer_name: str) -> None:
    """Collective: the ranks with `builds_here` build the corpus if they do not see it; a failure on
    any rank fails every rank (instead of leaving the others at a barrier)."""
    error = None
    if builds_here and not _present(corpus_prefix(tokenizer_name)):
        try:
            default_corpus(tokenizer, tokenizer_name)
        except (OSError, DataError) as err:
            error = err
    failed = torch.tensor([1.0 if error else 0.0], device=comm_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise DataError(f"building the default corpus in {cache_dir()} failed ({error}); set "
                        "MEGATRON_SWITCH_CACHE to a writable directory or pass --data-path") from error
    if failed.item():
        raise DataError(f"another rank failed to build the default corpus in {cache_dir()} (see its error); set "
                        "MEGATRON_SWITCH_CACHE to a writable directory or pass --data-path")


def default_corpus_on_every_node(tokenizer, tokenizer_name: str) -> str:
    """Collective over the default process group: the corpus prefix, present on every rank.

    Global rank 0 builds it first; a node that does not see rank 0's copy (MEGATRON_SWITCH_CACHE on a
    disk of its own) then builds its own, on its first local rank only. Nodes that share the
    directory find it there and build nothing."""
    _build_on_some_ranks(dist.get_rank() == 0, tokenizer, tokenizer_name)
    _build_on_some_ranks(local_rank() == 0, tokenizer, tokenizer_name)
    prefix = corpus_prefix(tokenizer_name)
    if not _present(prefix):
        raise DataError(f"the default corpus {prefix} is missing on rank {dist.get_rank()} after its node's first "
                        "local rank built it: LOCAL_RANK must number the processes of each node from 0 "
                        "(torchrun and the generated sbatch script set it)")
    return prefix
