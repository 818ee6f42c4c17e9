"""Megatron's pretraining-sampler order and micro-batch collation, shared by the torch loader
(`training.trainer`) and the DALI loader (`data.dali`), so both read the same samples in the
same order.

The global sample stream is cut into groups of G = micro x DP consecutive samples; data-parallel
rank r takes samples [g*G + r*micro, g*G + (r+1)*micro) of group g as one micro-batch, and a step
of global batch B is the next B / G groups (Megatron's `MegatronPretrainingSampler`).
"""

from __future__ import annotations

import torch

FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


def rank_micro_batch_start(group: int, micro_batch_size: int, data_parallel_size: int,
                           data_parallel_rank: int) -> int:
    """First global sample of rank r's micro-batch in sampler group g: (g*DP + r) * micro."""
    return (group * data_parallel_size + data_parallel_rank) * micro_batch_size


class TokenOutOfRange(ValueError):
    """A sample holds a token id the tokenizer (and so the embedding) does not have."""


def collate(dataset, start: int, micro_batch_size: int, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Samples [start, start + micro) of a GPT dataset stacked per field: `FIELDS` -> [micro, seq]
    CPU tensors (int64; loss_mask float32). With `vocab_size`, a token id >= vocab_size raises
    TokenOutOfRange (it would index past the embedding: an error on CPU, a device assert on GPUs)."""
    samples = [dataset[i] for i in range(start, start + micro_batch_size)]
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in FIELDS}
    batch["loss_mask"] = batch["loss_mask"].float()
    if vocab_size is not None:
        largest = int(torch.maximum(batch["tokens"].max(), batch["labels"].max()))
        if largest >= vocab_size:
            raise TokenOutOfRange(
                f"sample {start + int((batch['tokens'] >= vocab_size).any(1).float().argmax())} of the data holds "
                f"token id {largest}, but the tokenizer has {vocab_size} ids: the data was tokenized with another "
                f"tokenizer; train with that one (--tokenizer-type/--tokenizer-model), or preprocess the text again "
                f"with this one (megatron-switch preprocess)")
    return batch
