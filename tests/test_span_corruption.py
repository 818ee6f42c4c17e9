"""T5's span corruption (data/span_corruption.py) against a slow, plain-Python reference written from
T5's code and the T5 paper's description, with property tests; sentinels from the byte-level
tokenizer (--vocab-extra-ids) and from a Hugging Face tokenizer; the dataset over indexed data:
deterministic per (seed, index), whatever the order of access."""

from __future__ import annotations

import collections
import random

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_switch.data.span_corruption import (
    SpanCorruption,
    SpanCorruptionDataset,
    SpanCorruptionError,
    build_span_corruption_datasets,
    collate_span_corruption,
    corrupted_lengths,
    random_spans_helper,
    random_spans_noise_mask,
    span_corruption,
)
from megatron_switch.data.tokenizers import ByteLevelTokenizer, build_tokenizer

EXTRA = 100
SENTINELS = [10_000 - i for i in range(EXTRA)]  # <extra_id_i> of a 10,001-id vocabulary
EOS = 1


# ---- the slow reference -------------------------------------------------------------------------

def t5_counts(length: int, density: float = 0.15, mean: float = 3.0):
    """T5's counts: float32 arithmetic (TensorFlow), round half to even (Python's round, tf.round)."""
    length = max(length, 2)
    noise = round(float(numpy.float32(length) * numpy.float32(density)))
    noise = min(max(noise, 1), length - 1)
    spans = max(round(float(numpy.float32(noise) / numpy.float32(mean))), 1)
    return noise, spans


def reference_mask(length: int, rng: numpy.random.Generator) -> list:
    """T5's random_spans_noise_mask as a loop: non-noise and noise spans alternate, non-noise first;
    each side split into `spans` non-empty pieces by a shuffled row of piece starts."""
    padded = max(length, 2)
    noise, spans = t5_counts(length)

    def pieces(items: int) -> list:
        starts = [0] + list(rng.permutation([1] * (spans - 1) + [0] * (items - spans)))
        lengths = []
        for start in starts:
            if start or not lengths:
                lengths.append(0)
            lengths[-1] += 1
        return lengths

    noise_pieces = pieces(noise)
    plain_pieces = pieces(padded - noise)
    mask = []
    for plain, noisy in zip(plain_pieces, noise_pieces):
        mask += [False] * plain + [True] * noisy
    return mask[:length]


def reference_corruption(tokens: list, mask: list):
    """(inputs, targets) by hand: a sentinel per noise span in the inputs; the targets are each
    sentinel followed by its span; sentinels numbered from <extra_id_0>; EOS at the end of both."""
    inputs, targets, span = [], [], -1
    for i, (token, noisy) in enumerate(zip(tokens, mask)):
        if noisy and (i == 0 or not mask[i - 1]):  # a noise span starts: its sentinel on both sides
            span += 1
            inputs.append(SENTINELS[span])
            targets.append(SENTINELS[span])
        if noisy:
            targets.append(token)
        else:
            inputs.append(token)
    return inputs + [EOS], targets + [EOS]


def runs(mask) -> list:
    """[(is_noise, length)] of consecutive equal values."""
    out = []
    for value in mask:
        if out and out[-1][0] == value:
            out[-1][1] += 1
        else:
            out.append([bool(value), 1])
    return [tuple(r) for r in out]


def fill_sentinels(inputs, targets) -> list:
    """Put each noise span of the targets back in place of its sentinel in the inputs."""
    spans, current = {}, None
    for token in targets[:-1]:
        if token in SENTINELS:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs[:-1]:
        out.extend(spans[token] if token in SENTINELS else [token])
    return out


# ---- against the reference ----------------------------------------------------------------------

def test_helper_gives_t5s_lengths():
    assert random_spans_helper(512) == (568, 114)  # T5's span-corruption lengths for its 512 inputs
    assert random_spans_helper(114) == (126, 26)
    for inputs_length in range(10, 2000, 7):
        tokens, targets = random_spans_helper(inputs_length)
        noise = int(round(tokens * 0.15))
        spans = int(round(noise / 3))
        assert tokens - noise + spans + 1 <= inputs_length  # fits (T5's own float64 rounding)
        noise1 = int(round((tokens + 1) * 0.15))
        assert tokens + 1 - noise1 + int(round(noise1 / 3)) + 1 > inputs_length  # and is the longest that fits
        assert targets == noise + spans + 1


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
def test_noise_mask_and_corruption_equal_the_reference(length, seed):
    tokens = list(numpy.random.default_rng(seed + 1).integers(2, 900, size=length))
    mask = random_spans_noise_mask(length, numpy.random.default_rng(seed))
    expected_mask = reference_mask(length, numpy.random.default_rng(seed))
    assert mask.tolist() == expected_mask
    inputs, targets = span_corruption(numpy.array(tokens), numpy.random.default_rng(seed), SENTINELS, EOS)
    expected_inputs, expected_targets = reference_corruption(tokens, expected_mask)
    assert inputs.tolist() == expected_inputs
    if length >= 2:
        assert targets.tolist() == expected_targets
    assert (len(inputs), len(targets)) == corrupted_lengths(length)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(2, 2000), seed=st.integers(0, 2**32 - 1))
def test_noise_density_span_lengths_and_sentinel_order(length, seed):
    mask = random_spans_noise_mask(length, numpy.random.default_rng(seed))
    noise, spans = t5_counts(length)
    assert mask.dtype == bool and mask.shape == (length,)
    assert int(mask.sum()) == noise
    if noise > 1 and noise < length - 1:  # not clamped: the density is 0.15 to the nearest token
        assert abs(noise - 0.15 * length) <= 0.5 + 1e-6 * length
    pieces = runs(mask)
    assert [noisy for noisy, _ in pieces] == [False, True] * spans  # non-noise first, then alternating
    assert all(n >= 1 for _, n in pieces)
    if spans > 1:  # spans = noise / 3 to the nearest integer: the mean noise span length is 3
        assert abs(noise - 3 * spans) <= 1.5

    tokens = numpy.arange(10, 10 + length)  # distinct, never a sentinel or EOS
    inputs, targets = span_corruption(tokens, numpy.random.default_rng(seed), SENTINELS, EOS)
    in_sentinels = [t for t in inputs.tolist() if t in SENTINELS]
    out_sentinels = [t for t in targets.tolist() if t in SENTINELS]
    assert in_sentinels == out_sentinels == SENTINELS[:spans]  # <extra_id_0>, <extra_id_1>, ... once each
    assert targets[0] == SENTINELS[0] and inputs[-1] == targets[-1] == EOS
    assert fill_sentinels(inputs.tolist(), targets.tolist()) == tokens.tolist()  # exact reconstruction


def test_every_segmentation_is_equally_likely():
    """40 tokens: 6 noise tokens in 2 spans, 34 others in 2 spans; the first noise span has 1-5 tokens
    with equal chances, the first non-noise span 1-33."""
    first_noise, first_plain = collections.Counter(), collections.Counter()
    for seed in range(5000):
        pieces = runs(random_spans_noise_mask(40, numpy.random.default_rng(seed)))
        first_plain[pieces[0][1]] += 1
        first_noise[pieces[1][1]] += 1
    assert sorted(first_noise) == [1, 2, 3, 4, 5] and sorted(first_plain) == list(range(1, 34))
    assert max(first_noise.values()) / min(first_noise.values()) < 1.15
    counts = numpy.array([first_plain[k] for k in range(1, 34)])
    assert abs(counts.mean() - 5000 / 33) < 1e-9 and counts.std() < 0.15 * counts.mean()


# ---- the objective and its sentinels ------------------------------------------------------------

def test_byte_level_sentinels_count_down_from_the_top():
    tokenizer = ByteLevelTokenizer(vocab_extra_ids=4)
    assert tokenizer.vocab_size == 262
    assert tokenizer.sentinel_ids == [261, 260, 259, 258]  # <extra_id_0> is the highest id
    assert tokenizer.detokenize([104, 105, 261, 33, 258, 256]) == "hi<extra_id_0>!<extra_id_3>"
    assert ByteLevelTokenizer().sentinel_ids == [] and ByteLevelTokenizer().vocab_size == 258
    # The dataset cache of a tokenizer without sentinels keeps its key.
    assert ByteLevelTokenizer().unique_identifiers == {"class": "ByteLevelTokenizer"}
    assert build_tokenizer("ByteLevelTokenizer", vocab_extra_ids=3).vocab_size == 261
    with pytest.raises(ValueError, match="--vocab-extra-ids must be an integer >= 0"):
        ByteLevelTokenizer(-1)


def test_objective_lengths_and_errors_name_the_fix():
    objective = SpanCorruption.for_tokenizer(ByteLevelTokenizer(100), 512)
    assert (objective.tokens_length, objective.decoder_length) == (568, 114)
    assert objective.sentinel_ids[0] == 357 and objective.eos_id == 256 and objective.decoder_start_id == 257
    assert SpanCorruption.for_tokenizer(ByteLevelTokenizer(100), 512, 128).decoder_length == 128
    # 172 inputs: T5's helper says 38 targets, its own mask arithmetic (float32) makes 40.
    assert SpanCorruption.for_tokenizer(ByteLevelTokenizer(100), 172).decoder_length == 40
    with pytest.raises(SpanCorruptionError, match="makes 28 noise spans.*has 0: give --vocab-extra-ids 100"):
        SpanCorruption.for_tokenizer(ByteLevelTokenizer(), 512)
    with pytest.raises(SpanCorruptionError, match="has 10: give --vocab-extra-ids 100"):
        SpanCorruption.for_tokenizer(ByteLevelTokenizer(10), 512)
    with pytest.raises(SpanCorruptionError, match="use --decoder-seq-length 114 or more"):
        SpanCorruption.for_tokenizer(ByteLevelTokenizer(100), 512, 113)
    with pytest.raises(SpanCorruptionError, match="too short"):
        SpanCorruption.for_tokenizer(ByteLevelTokenizer(100), 6)
    with pytest.raises(SpanCorruptionError, match="noise density must be in"):
        SpanCorruption.for_tokenizer(ByteLevelTokenizer(100), 512, noise_density=0.0)


def test_sample_fields_shift_and_padding():
    tokenizer = ByteLevelTokenizer(100)
    objective = SpanCorruption.for_tokenizer(tokenizer, 40, 16)
    window = numpy.frombuffer(b"Switch layers route each token to one expert, and more.", numpy.uint8)
    window = window[:objective.tokens_length].astype(numpy.int64)
    short = window[:30]
    for tokens in (window, short):
        sample = objective.sample(tokens, objective.rng(7, 3))
        inputs, targets = span_corruption(tokens, objective.rng(7, 3), objective.sentinel_ids, 256)
        n_in, n_out = len(inputs), len(targets)
        assert sample["text_enc"].tolist() == inputs.tolist() + [257] * (40 - n_in)
        assert sample["labels"].tolist() == targets.tolist() + [257] * (16 - n_out)
        assert sample["text_dec"].tolist() == [257] + targets[:-1].tolist() + [257] * (16 - n_out)
        assert sample["loss_mask"].tolist() == [1.0] * n_out + [0.0] * (16 - n_out)
        assert sample["enc_mask"].tolist() == [1] * n_in + [0] * (40 - n_in)
        assert sample["dec_mask"].sum() == n_out
    assert len(window) == objective.tokens_length and n_in < 40  # the short window is padded

    batch = collate_span_corruption([objective.sample(window, objective.rng(1, i)) for i in range(2)]
                                    + [objective.sample(short, objective.rng(1, 2))])
    enc, dec, cross = batch["enc_attn_mask"], batch["dec_attn_mask"], batch["enc_dec_attn_mask"]
    assert enc.shape == cross.shape == (3, 1, 1, 40) and dec.shape == (3, 1, 16, 16)
    assert torch.equal(enc[:, 0, 0], batch["enc_mask"] == 0)  # padding keys only
    assert torch.equal(dec[2, 0], torch.ones(16, 16, dtype=torch.bool).triu(1))  # causal


def test_hugging_face_tokenizer_uses_its_own_extra_ids(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from megatron_switch.data.tokenizers import HuggingFaceTokenizer

    def save(path, extra: int):
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4}
        model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
        model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>",
                                                    unk_token="<unk>")
        fast.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(extra)]})
        fast.save_pretrained(path)
        return str(path)

    with_ids = HuggingFaceTokenizer(save(tmp_path / "t5like", 30))
    ids = with_ids.sentinel_ids
    assert len(ids) == 30 and ids == [with_ids.vocab[f"<extra_id_{i}>"] for i in range(30)]
    objective = SpanCorruption.for_tokenizer(with_ids, 128)
    assert objective.sentinel_ids == tuple(ids) and objective.eos_id == 1 and objective.decoder_start_id == 0

    without = HuggingFaceTokenizer(save(tmp_path / "plain", 0))
    with pytest.raises(SpanCorruptionError, match=r"tokenizer has 0: use a tokenizer with T5's sentinels.*"
                                                  r"add_special_tokens"):
        SpanCorruption.for_tokenizer(without, 128)
    with pytest.raises(ValueError, match="brings its own <extra_id_N> tokens: drop --vocab-extra-ids"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "t5like"), vocab_extra_ids=100)


# ---- the dataset over indexed data --------------------------------------------------------------

def write_corpus(prefix: str) -> None:
    from megatron_switch.data.preprocess import write_indexed_dataset

    rng = random.Random(0)
    words = ["expert", "router", "token", "capacity", "switch", "layer", "gate", "shard", "seed", "batch"]
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) for _ in range(60)]
    write_indexed_dataset(documents, prefix, ByteLevelTokenizer())


def test_dataset_is_a_function_of_seed_and_index(tmp_path):
    prefix, cache = str(tmp_path / "corpus"), str(tmp_path / "cache")
    write_corpus(prefix)
    tokenizer = ByteLevelTokenizer(100)
    objective = SpanCorruption.for_tokenizer(tokenizer, 64)

    def build(seed):
        return build_span_corruption_datasets([prefix], "98,2,0", objective, seed, (40, 4, 0), tokenizer, cache)

    train, valid, test = build(1234)
    assert test is None and len(train) >= 40 and len(valid) >= 4
    first = [train[i] for i in range(12)]
    again, _, _ = build(1234)
    for i in reversed(range(12)):  # another instance, another order of access: the same samples
        for key in first[i]:
            assert numpy.array_equal(again[i][key], first[i][key]), (i, key)
    other, _, _ = build(99)
    assert any(not numpy.array_equal(other[i]["text_enc"], first[i]["text_enc"]) for i in range(12))

    for i, sample in enumerate(first):
        window = train.windows[i]
        raw = torch.cat([window["tokens"], window["labels"][-1:]]).tolist()
        assert len(raw) == objective.tokens_length
        n_in, n_out = int(sample["enc_mask"].sum()), int(sample["dec_mask"].sum())
        inputs, targets = sample["text_enc"][:n_in].tolist(), sample["labels"][:n_out].tolist()
        sentinels = set(objective.sentinel_ids)
        found = [t for t in inputs if t in sentinels]
        assert found and found == list(objective.sentinel_ids[:len(found)])  # <extra_id_0>, 1, ... in order
        spans, current = {}, None
        for token in targets[:-1]:
            if token in sentinels:
                current = spans[token] = []
            else:
                current.append(token)
        rebuilt = [t for token in inputs[:-1] for t in (spans[token] if token in sentinels else [token])]
        assert rebuilt == raw  # the window comes back from the sample
    assert objective.tokens_length == 70
    with pytest.raises(SpanCorruptionError, match="a window of 71 tokens"):
        SpanCorruptionDataset([numpy.zeros(71, dtype=numpy.int64)], objective, 0)[0]
