"""What each model (--model gpt|t5) reads and how one micro-batch enters it: the trainer's only
per-model seam besides `training.model.build_model`.

An `Objective` gives the run's datasets (GPT: next-token samples of megatron's GPTDataset; T5:
span corruption over the same indexed data, `data.span_corruption`), the micro-batch of samples
[start, start + micro) of a dataset, the megatron forward-step function (model call and loss mask),
and the tokens one sample puts through the model (for tokens/s).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Dict

import torch

from megatron_switch.data.sampler import TokenOutOfRange, collate
from megatron_switch.training.schedule import gpt_forward_step, masked_loss

Batch = Dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Objective:
    datasets: Callable  # (args, tokenizer, data_path, num_samples (train, valid, test), cache) -> 3 datasets
    micro_batch: Callable[..., Batch]  # (dataset, start, micro, vocab_size or None) -> CPU tensors
    forward_step: Callable  # megatron's forward_step_func: (iterator of batches, model) -> (output, loss fn)
    tokens_per_sample: Callable[[object], int]  # args -> tokens


def _gpt_datasets(args, tokenizer, data_path, num_samples, cache):
    from megatron_switch.data.datasets import build_gpt_datasets

    return build_gpt_datasets(data_path, args.split, args.seq_length, args.seed, num_samples, tokenizer, cache)


def _t5_datasets(args, tokenizer, data_path, num_samples, cache):
    from megatron_switch.data.span_corruption import SpanCorruption, build_span_corruption_datasets

    objective = SpanCorruption.for_tokenizer(tokenizer, args.encoder_seq_length, args.decoder_seq_length)
    return build_span_corruption_datasets(data_path, args.split, objective, args.seed, num_samples, tokenizer, cache)


def _t5_micro_batch(dataset, start: int, micro_batch_size: int, vocab_size: int | None = None) -> Batch:
    """Samples [start, start + micro) of a span-corruption dataset (`collate_span_corruption`); with
    `vocab_size`, an id the embedding does not have raises TokenOutOfRange, as for GPT."""
    from megatron_switch.data.span_corruption import collate_span_corruption

    batch = collate_span_corruption([dataset[i] for i in range(start, start + micro_batch_size)])
    if vocab_size is not None:
        largest = int(torch.maximum(batch["text_enc"].max(), batch["labels"].max()))
        if largest >= vocab_size:
            raise TokenOutOfRange(
                f"a span-corruption sample from {start} on holds token id {largest}, but the tokenizer has "
                f"{vocab_size} ids: the data was tokenized with another tokenizer; train with that one "
                f"(--tokenizer-type/--tokenizer-model), or preprocess the text again with this one")
    return batch


def t5_forward_step(batches, model):
    """T5Model(encoder ids, decoder ids, the three attention masks, labels) -> per-token loss [b, s_d]."""
    batch = next(batches)
    output = model(batch["text_enc"], batch["text_dec"], batch["enc_attn_mask"], batch["dec_attn_mask"],
                   batch["enc_dec_attn_mask"], lm_labels=batch["labels"])
    return output, partial(masked_loss, batch["loss_mask"])


OBJECTIVES = {
    "gpt": Objective(_gpt_datasets, collate, gpt_forward_step, lambda args: args.seq_length),
    "t5": Objective(_t5_datasets, _t5_micro_batch, t5_forward_step,
                    lambda args: args.encoder_seq_length + args.decoder_seq_length),
}
