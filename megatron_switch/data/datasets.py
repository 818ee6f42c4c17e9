"""GPT train/valid/test datasets over indexed .bin/.idx files, through megatron.core.datasets."""

from __future__ import annotations

from typing import Sequence, Tuple

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

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
