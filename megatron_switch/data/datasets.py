"""GPT train/valid/test datasets over indexed .bin/.idx files, through megatron.core.datasets, and the
check that their index cache is one directory for every rank (`check_cache_shared`)."""

from __future__ import annotations

import os
import uuid
from typing import Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_switch.ops.collectives import comm_device
from megatron_switch.data.check import DataError, dataset_tokens, parse_data_path, parse_split


def check_prefixes(prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        dataset_tokens(prefix)


SPLIT_NAMES = ("train", "validation", "test")


def used_split(split: str, num_samples: Sequence[int], prefixes: Sequence[str]) -> str:
    """The --split string with unused splits (0 samples requested) set to 0, after checking that
    every used split holds at least one document of every dataset (Megatron's rounding)."""
    weights = [w if n > 0 else 0.0 for w, n in zip(parse_split(split), num_samples)]
    if sum(weights) <= 0:
        raise DataError(f"--split {split!r} gives no documents to training")
    total = sum(weights)
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w / total)
    for prefix in prefixes:
        documents = len(IndexedDataset(prefix))
        edges = [int(round(documents * b)) for b in bounds]
        for name, w, a, b in zip(SPLIT_NAMES, weights, edges, edges[1:]):
            if w > 0 and b <= a:
                raise DataError(f"--split {split}: the {name} split of {prefix} ({documents} documents) "
                                f"is empty; give it a larger share or use more data")
    return ",".join(f"{w:g}" for w in weights)


def build_gpt_datasets(data_path: Sequence[str], split: str, seq_length: int, seed: int,
                       num_samples: Tuple[int, int, int], tokenizer, cache: str):
    """(train, valid, test) GPTDatasets; a split that is not used comes back as None."""
    prefixes, weights = parse_data_path(data_path)
    check_prefixes(prefixes)
    split = used_split(split, num_samples, prefixes)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=cache, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()


def check_cache_shared(cache: str) -> None:
    """Collective over the default process group: fail on every rank unless every rank sees a file
    that rank 0 writes in `cache`. megatron-core builds the sample indices there on rank 0 and then
    reads them on every rank, so a cache on a disk of each node's own (a node-local /tmp, a different
    MEGATRON_SWITCH_CACHE per node) would fail later with a missing .npy file."""
    rank = dist.get_rank()
    token = torch.zeros(1, dtype=torch.int64, device=comm_device())
    marker, problem = None, ""
    if rank == 0:
        try:
            os.makedirs(cache, exist_ok=True)
            token[0] = uuid.uuid4().int >> 65  # a positive int64, fresh for each run
            marker = os.path.join(cache, f".visible-{int(token.item()):x}")
            with open(marker, "w"):
                pass
        except OSError as err:
            token[0], problem = -1, f" ({err})"
    dist.broadcast(token, 0)
    if token.item() < 0:
        raise DataError(f"the dataset index cache {cache} is not writable on rank 0{problem}: pass "
                        "--data-cache-path DIR (a directory every node mounts) or set MEGATRON_SWITCH_CACHE")
    seen = os.path.exists(os.path.join(cache, f".visible-{int(token.item()):x}"))
    first_blind = torch.tensor([dist.get_world_size() if seen else rank], dtype=torch.int64, device=comm_device())
    dist.all_reduce(first_blind, op=dist.ReduceOp.MIN)  # every rank has looked once this returns
    if marker is not None:
        os.remove(marker)
    if first_blind.item() < dist.get_world_size():
        raise DataError(f"the dataset index cache {cache} is not one directory for every rank: rank "
                        f"{first_blind.item()} does not see the file rank 0 wrote there (a disk of each node's "
                        "own?). megatron-core writes the sample indices on rank 0 and reads them on every rank: "
                        "pass --data-cache-path DIR on a filesystem every node mounts (where --save is, for "
                        "instance), or point MEGATRON_SWITCH_CACHE there")
