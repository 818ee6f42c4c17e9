"""T5's span corruption (the Switch Transformer's pre-training objective) over Megatron's indexed data.

As T5 does it (t5.data.preprocessors: `random_spans_helper`, `random_spans_noise_mask`,
`noise_span_to_unique_sentinel`, `span_corruption`), with noise density 0.15 and mean noise span
length 3:
- a raw window of `tokens_length` tokens is chosen so that the corrupted input is the encoder
  length (`random_spans_helper`: 568 raw tokens for 512, targets 114);
- `num_noise = round(length * density)` tokens (at least 1, at most length - 1) form
  `num_spans = round(num_noise / mean)` noise spans (at least 1), alternating with as many non-noise
  spans, non-noise first; among those, every segmentation is equally likely (`random_spans_noise_mask`,
  float32 arithmetic and round-half-to-even, as T5's TensorFlow);
- the encoder input is the text with each noise span replaced by one sentinel, the target is the
  sentinels each followed by its span; sentinel i is `<extra_id_i>` (T5: counted down from the top
  of the vocabulary), and both end with EOS.
T5's helper rounds in float64 while its mask rounds in float32; for a few lengths (e.g. 172: 190 raw
tokens, 28.5 noise tokens) the mask makes a target two tokens longer than the helper says, and T5's
output trimming cuts it. Here the decoder length comes from the mask's own arithmetic, so nothing is cut.
Random draws are numpy's (not TensorFlow's): the same distribution, not the same masks as T5.

Data: raw windows are GPT samples of megatron.core's GPTDataset (`build_gpt_datasets`, its document
shuffling per seed; documents keep their end-of-document token, which is the tokenizer's EOS).
megatron.core's own `T5MaskedWordPieceDataset` is not T5's objective (BERT-style n-gram masking of
whole words over sentences, a BOS-started decoder), so only its mask convention is kept (below).
Every sample is a pure function of (seed, index): the window by GPTDataset's index, the noise mask
by a generator seeded with (seed, index), so a resumed run reads exactly the samples it would have.

A sample: text_enc [L_e] (encoder input, padded), text_dec [L_d] (decoder input: the target shifted
right behind the decoder start token, T5's pad), labels [L_d] (the target, padded), loss_mask [L_d]
(1 on the target), enc_mask [L_e] and dec_mask [L_d] (1 on real tokens), int64 numpy arrays but
loss_mask (float32). `collate_span_corruption` stacks them and adds the attention masks T5Model
takes (megatron's convention, True: may not attend; padding masks keys only, as Hugging Face's T5).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy
import torch

from megatron_switch.data.tokenizers import ByteLevelTokenizer

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
SAMPLE_FIELDS = ("text_enc", "text_dec", "labels", "loss_mask", "enc_mask", "dec_mask")
_RNG_SALT = 0x5CA7  # keeps the noise draws apart from any other use of (seed, index)


class SpanCorruptionError(ValueError):
    """Span-corruption settings that cannot work; the message says what to change."""


def random_spans_helper(inputs_length: int, noise_density: float = NOISE_DENSITY,
                        mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> Tuple[int, int]:
    """T5's `random_spans_helper`: (raw tokens_length, targets_length) for an encoder of inputs_length.

    tokens_length is the largest raw length whose corrupted input (non-noise tokens, one sentinel
    per span, EOS) fits inputs_length; targets_length = noise tokens + sentinels + EOS. Python
    (float64) rounding, as T5's helper; e.g. 512 -> (568, 114).
    """
    def lengths(tokens_length: int) -> Tuple[int, int]:
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return (num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs + 1,
                num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:  # T5's nudge toward equal lengths
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def noise_span_counts(length: int, noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> Tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) of `random_spans_noise_mask` for `length` tokens: float32
    products and quotients rounded half to even, as T5's TensorFlow code; length is taken as >= 2."""
    length = max(length, 2)
    num_noise = int(numpy.round(numpy.float32(length) * numpy.float32(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = int(numpy.round(numpy.float32(num_noise) / numpy.float32(mean_noise_span_length)))
    return num_noise, max(num_spans, 1)


def corrupted_lengths(length: int, noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> Tuple[int, int]:
    """(encoder input, target) lengths, EOS included, that `span_corruption` makes of `length` tokens."""
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    if length < 2:  # the mask is cut back to the one token, which is non-noise
        return length + 1, 2
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def _random_segmentation(num_items: int, num_segments: int, rng: numpy.random.Generator) -> numpy.ndarray:
    """Lengths of a uniformly random split of num_items into num_segments non-empty segments (T5's
    `_random_segmentation`: a shuffled row of num_segments - 1 segment starts among the items 2..n)."""
    starts = numpy.zeros(num_items, dtype=numpy.int64)
    starts[1:] = rng.permutation((numpy.arange(num_items - 1) < num_segments - 1).astype(numpy.int64))
    return numpy.bincount(numpy.cumsum(starts), minlength=num_segments)


def random_spans_noise_mask(length: int, rng: numpy.random.Generator, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> numpy.ndarray:
    """[length] bool, True on noise: T5's `random_spans_noise_mask` (non-noise span first, spans alternate)."""
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    padded_length = max(length, 2)
    num_nonnoise = padded_length - num_noise
    if num_nonnoise < num_spans:
        raise SpanCorruptionError(
            f"noise density {noise_density} with mean span length {mean_noise_span_length} leaves {num_nonnoise} "
            f"non-noise tokens for {num_spans} spans in {length} tokens: lower the noise density")
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
    span_lengths = numpy.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise = numpy.tile(numpy.array([False, True]), num_spans)
    return numpy.repeat(is_noise, span_lengths)[:length]


def noise_span_to_sentinel(tokens: numpy.ndarray, noise_mask: numpy.ndarray,
                           sentinel_ids: Sequence[int]) -> numpy.ndarray:
    """T5's `noise_span_to_unique_sentinel`: each run of masked tokens becomes one sentinel, the i-th
    run sentinel_ids[i] (`<extra_id_i>`); unmasked tokens stay."""
    previous = numpy.concatenate([[False], noise_mask[:-1]])
    first = noise_mask & ~previous
    span_index = numpy.cumsum(first) - 1
    sentinels = numpy.asarray(sentinel_ids, dtype=numpy.int64)
    replaced = numpy.where(first, sentinels[numpy.clip(span_index, 0, None)], tokens)
    return replaced[~(noise_mask & previous)]


def span_corruption(tokens: numpy.ndarray, rng: numpy.random.Generator, sentinel_ids: Sequence[int], eos_id: int,
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """(encoder input, target) of one window of tokens, each ending with EOS (T5's `span_corruption`)."""
    tokens = numpy.asarray(tokens, dtype=numpy.int64)
    mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
    eos = numpy.array([eos_id], dtype=numpy.int64)
    return (numpy.concatenate([noise_span_to_sentinel(tokens, mask, sentinel_ids), eos]),
            numpy.concatenate([noise_span_to_sentinel(tokens, ~mask, sentinel_ids), eos]))


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """The objective for one model: lengths, sentinels and special ids. Build with `for_tokenizer`.

    encoder_length / decoder_length: the model's sequence lengths (--encoder-seq-length,
    --decoder-seq-length); tokens_length: raw tokens per window; sentinel_ids[i]: `<extra_id_i>`.
    """

    encoder_length: int
    decoder_length: int
    tokens_length: int
    sentinel_ids: Tuple[int, ...]
    eos_id: int
    pad_id: int
    decoder_start_id: int
    noise_density: float = NOISE_DENSITY
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH

    @classmethod
    def for_tokenizer(cls, tokenizer, encoder_length: int, decoder_length: Optional[int] = None,
                      noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> "SpanCorruption":
        """Check the lengths and the tokenizer's sentinels (`tokenizer.sentinel_ids`), with the fix in
        the error. decoder_length None: the target length T5's corruption makes (114 for 512)."""
        if not 0 < noise_density < 1:
            raise SpanCorruptionError(f"noise density must be in (0, 1) (T5: 0.15), got {noise_density}")
        if not mean_noise_span_length >= 1:
            raise SpanCorruptionError(f"mean noise span length must be >= 1 (T5: 3), got {mean_noise_span_length}")
        if encoder_length < 2:
            raise SpanCorruptionError(f"--encoder-seq-length {encoder_length}: span corruption needs at least 2")
        tokens_length, _ = random_spans_helper(encoder_length, noise_density, mean_noise_span_length)
        inputs, targets = corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)
        if inputs > encoder_length:  # very short encoders only (< 10 at T5's density), where T5 would trim
            raise SpanCorruptionError(f"--encoder-seq-length {encoder_length} is too short for span corruption at "
                                      f"noise density {noise_density}: use a longer one (T5 uses 512)")
        num_spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)[1]
        sentinel_ids = tuple(int(i) for i in getattr(tokenizer, "sentinel_ids", ()))
        if len(sentinel_ids) < num_spans:
            if isinstance(tokenizer, ByteLevelTokenizer):
                fix = f"give --vocab-extra-ids {max(100, num_spans)} (T5 uses 100)"
            else:
                fix = ("use a tokenizer with T5's sentinels (a T5 tokenizer has 100), or add them: tokenizer."
                       "add_special_tokens({'additional_special_tokens': [f'<extra_id_{i}>' for i in range(100)]}), "
                       "then tokenizer.save_pretrained(DIR) and pass --tokenizer-model DIR")
            raise SpanCorruptionError(
                f"span corruption of --encoder-seq-length {encoder_length} makes {num_spans} noise spans, one sentinel "
                f"each (<extra_id_0> ...), and the tokenizer has {len(sentinel_ids)}: {fix}")
        if decoder_length is None:
            decoder_length = targets
        elif decoder_length < targets:
            raise SpanCorruptionError(f"--decoder-seq-length {decoder_length} is shorter than the targets span "
                                      f"corruption makes of --encoder-seq-length {encoder_length} ({targets} tokens): "
                                      f"use --decoder-seq-length {targets} or more")
        return cls(encoder_length, decoder_length, tokens_length, sentinel_ids, int(tokenizer.eod),
                   int(tokenizer.pad), int(tokenizer.pad), noise_density, mean_noise_span_length)

    def rng(self, seed: int, index: int) -> numpy.random.Generator:
        """The noise generator of sample `index`: a function of (seed, index) alone."""
        return numpy.random.default_rng([seed, index, _RNG_SALT])

    def sample(self, window: numpy.ndarray, rng: numpy.random.Generator) -> Dict[str, numpy.ndarray]:
        """One model sample (see the module docstring) from a window of at most tokens_length tokens."""
        window = numpy.asarray(window, dtype=numpy.int64)
        if len(window) > self.tokens_length:
            raise SpanCorruptionError(f"a window of {len(window)} tokens, more than the {self.tokens_length} the "
                                      f"encoder length {self.encoder_length} takes")
        inputs, targets = span_corruption(window, rng, self.sentinel_ids, self.eos_id, self.noise_density,
                                          self.mean_noise_span_length)
        decoder_input = numpy.concatenate([[self.decoder_start_id], targets[:-1]])
        return {
            "text_enc": self._pad(inputs, self.encoder_length),
            "text_dec": self._pad(decoder_input, self.decoder_length),
            "labels": self._pad(targets, self.decoder_length),
            "loss_mask": (numpy.arange(self.decoder_length) < len(targets)).astype(numpy.float32),
            "enc_mask": (numpy.arange(self.encoder_length) < len(inputs)).astype(numpy.int64),
            "dec_mask": (numpy.arange(self.decoder_length) < len(targets)).astype(numpy.int64),
        }

    def _pad(self, ids: numpy.ndarray, length: int) -> numpy.ndarray:
        return numpy.concatenate([ids, numpy.full(length - len(ids), self.pad_id, dtype=numpy.int64)])


def _raw_window(sample) -> numpy.ndarray:
    """A window's tokens: a GPTDataset sample (tokens + the last label) or a plain token sequence."""
    if isinstance(sample, dict):
        return numpy.concatenate([numpy.asarray(sample["tokens"]), numpy.asarray(sample["labels"])[-1:]])
    return numpy.asarray(sample)


class SpanCorruptionDataset(torch.utils.data.Dataset):
    """Map-style: sample i is `objective.sample(window i, generator of (seed, i))`.

    windows: a map-style dataset of raw windows of objective.tokens_length tokens (a GPTDataset of
    sequence length tokens_length - 1, whose samples are cut back into one window, or token arrays).
    """

    def __init__(self, windows, objective: SpanCorruption, seed: int):
        self.windows, self.objective, self.seed = windows, objective, seed

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> Dict[str, numpy.ndarray]:
        index = int(index)
        return self.objective.sample(_raw_window(self.windows[index]), self.objective.rng(self.seed, index))


def build_span_corruption_datasets(data_path: Sequence[str], split: str, objective: SpanCorruption, seed: int,
                                   num_samples: Tuple[int, int, int], tokenizer, cache: str):
    """(train, valid, test) SpanCorruptionDatasets over Megatron's indexed data (`--data-path`,
    `--split`); a split that is not used comes back as None. The data must hold one window
    (objective.tokens_length tokens: `check.check_enough_tokens(prefixes, tokens_length - 1)`)."""
    from megatron_switch.data.datasets import build_gpt_datasets

    windows = build_gpt_datasets(data_path, split, objective.tokens_length - 1, seed, num_samples, tokenizer, cache)
    return tuple(None if w is None else SpanCorruptionDataset(w, objective, seed) for w in windows)


def t5_attention_masks(enc_mask: torch.Tensor, decoder_length: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(encoder, decoder, encoder-decoder) attention masks for megatron's T5Model, True where a query
    may not attend: encoder and cross-attention mask the encoder's padding keys ([b, 1, 1, L_e]);
    the decoder's self-attention is causal ([b, 1, L_d, L_d]: its padding is past every real token).
    enc_mask: [b, L_e], nonzero on real tokens."""
    padding = (enc_mask == 0)[:, None, None, :]
    future = torch.ones(decoder_length, decoder_length, dtype=torch.bool, device=enc_mask.device).triu(1)
    return padding, future.expand(enc_mask.shape[0], 1, decoder_length, decoder_length), padding


def collate_span_corruption(samples: Sequence[Dict[str, numpy.ndarray]]) -> Dict[str, torch.Tensor]:
    """Stack samples per field ([b, L] tensors) and add `enc_attn_mask`, `dec_attn_mask` and
    `enc_dec_attn_mask` (see t5_attention_masks)."""
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in SAMPLE_FIELDS}
    batch["enc_attn_mask"], batch["dec_attn_mask"], batch["enc_dec_attn_mask"] = t5_attention_masks(
        batch["enc_mask"], batch["dec_mask"].shape[1])
    return batch
