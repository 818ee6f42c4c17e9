"""Tokenizers for preprocessing and training: a built-in byte-level tokenizer, and Hugging Face
tokenizers (a local tokenizer directory or file) when `transformers` is installed.

Both follow megatron.core's MegatronTokenizerBase, which its GPTDataset expects (`eod`, `pad`), and
give T5's sentinels as `sentinel_ids` (index i: the id of `<extra_id_i>`): the byte-level tokenizer
appends `vocab_extra_ids` of them to its vocabulary (Megatron-LM's --vocab-extra-ids, `<extra_id_0>`
the highest id, as in T5's vocabularies); a Hugging Face tokenizer has its own `<extra_id_N>` tokens.
"""

from __future__ import annotations

import os

import numpy

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_switch.data import BYTE_LEVEL_VOCAB_SIZE

TOKENIZER_TYPES = ("ByteLevelTokenizer", "HuggingFaceTokenizer")


class ByteLevelTokenizer(MegatronTokenizerBase):
    """UTF-8 bytes 0-255 are tokens 0-255; 256 ends a document (eod), 257 pads; with vocab_extra_ids
    N, ids 258 .. 258+N-1 are T5's sentinels, `<extra_id_0>` = 258+N-1 (the highest id) down to
    `<extra_id_{N-1}>` = 258."""

    def __init__(self, vocab_extra_ids: int = 0):
        super().__init__(path="", config={})
        if not isinstance(vocab_extra_ids, int) or vocab_extra_ids < 0:
            raise ValueError(f"--vocab-extra-ids must be an integer >= 0, got {vocab_extra_ids!r}")
        self.vocab_extra_ids = vocab_extra_ids
        self.unique_identifiers = {"class": type(self).__name__}  # keys megatron's dataset cache
        if vocab_extra_ids:
            self.unique_identifiers["vocab_extra_ids"] = vocab_extra_ids

    def tokenize(self, text: str) -> numpy.ndarray:
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8).astype(numpy.int64)

    def detokenize(self, ids) -> str:
        """Bytes as text, sentinels as `<extra_id_i>`; eod and padding are left out."""
        pieces, run = [], bytearray()
        for i in (int(i) for i in ids):
            if i < 256:
                run.append(i)
            elif i >= BYTE_LEVEL_VOCAB_SIZE:
                pieces += [run.decode("utf-8", errors="replace"), f"<extra_id_{self.vocab_size - 1 - i}>"]
                run = bytearray()
        return "".join(pieces) + run.decode("utf-8", errors="replace")

    @property
    def sentinel_ids(self) -> list:
        """[id of <extra_id_0>, id of <extra_id_1>, ...]: from the top of the vocabulary down."""
        return list(range(self.vocab_size - 1, BYTE_LEVEL_VOCAB_SIZE - 1, -1))

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("ByteLevelTokenizer has no chat template")

    @property
    def vocab(self):
        return {bytes([i]).decode("latin-1"): i for i in range(256)}

    @property
    def inv_vocab(self):
        return {i: bytes([i]).decode("latin-1") for i in range(256)}

    @property
    def vocab_size(self) -> int:
        return BYTE_LEVEL_VOCAB_SIZE + self.vocab_extra_ids

    @property
    def eod(self) -> int:
        return 256

    @property
    def pad(self) -> int:
        return 257


class HuggingFaceTokenizer(MegatronTokenizerBase):
    """A Hugging Face tokenizer loaded from a local path (no download, and never the Python code a
    tokenizer folder may ship: trust_remote_code is off)."""

    def __init__(self, path: str):
        super().__init__(path=path, config={})
        self.unique_identifiers = {"class": type(self).__name__, "path": path}
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs `pip install transformers`; "
                             "or use --tokenizer-type ByteLevelTokenizer") from err
        if not os.path.exists(path):
            raise ValueError(f"--tokenizer-model {path}: no such file or directory (a local Hugging Face tokenizer "
                             f"folder, as tokenizer.save_pretrained(DIR) writes it)")
        try:  # local files only; never code from the folder
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as err:  # noqa: BLE001  (transformers raises many types for a bad folder)
            if "trust_remote_code" in str(err):
                raise ValueError(f"--tokenizer-model {path}: this tokenizer needs Python code from its folder "
                                 f"(auto_map in tokenizer_config.json), which megatron-switch never runs; use a "
                                 f"tokenizer that loads without it (a tokenizer.json)") from None
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise ValueError(f"--tokenizer-model {path} is not a usable Hugging Face tokenizer ({type(err).__name__}: "
                             f"{first}); it needs the files tokenizer.save_pretrained(DIR) writes (tokenizer.json or "
                             f"tokenizer_config.json with its vocabulary files)") from None
        eod = self._tokenizer.eos_token_id
        self._eod = eod if eod is not None else len(self._tokenizer)

    def tokenize(self, text: str) -> numpy.ndarray:
        return numpy.asarray(self._tokenizer(text, add_special_tokens=False)["input_ids"], dtype=numpy.int64)

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode(list(ids))

    def apply_chat_template(self, *args, **kwargs):
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    @property
    def vocab(self):
        return self._tokenizer.get_vocab()

    @property
    def inv_vocab(self):
        return {v: k for k, v in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return max(len(self._tokenizer), self._eod + 1)

    @property
    def sentinel_ids(self) -> list:
        """[id of <extra_id_0>, id of <extra_id_1>, ...]: the tokenizer's own, up to the first missing."""
        vocab, ids = self._tokenizer.get_vocab(), []
        while f"<extra_id_{len(ids)}>" in vocab:
            ids.append(vocab[f"<extra_id_{len(ids)}>"])
        return ids

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        pad = self._tokenizer.pad_token_id
        return self._eod if pad is None else pad


def build_tokenizer(tokenizer_type: str = "ByteLevelTokenizer", tokenizer_model: str | None = None,
                    vocab_extra_ids: int = 0):
    """vocab_extra_ids: sentinel ids appended to the byte-level tokenizer (--vocab-extra-ids)."""
    if tokenizer_type == "ByteLevelTokenizer":
        return ByteLevelTokenizer(vocab_extra_ids)
    if tokenizer_type == "HuggingFaceTokenizer":
        if vocab_extra_ids:
            raise ValueError(f"--vocab-extra-ids {vocab_extra_ids} adds sentinel ids to the byte-level tokenizer; a "
                             f"Hugging Face tokenizer brings its own <extra_id_N> tokens: drop --vocab-extra-ids")
        if not tokenizer_model:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH "
                             "(a local tokenizer directory)")
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}: use one of {', '.join(TOKENIZER_TYPES)}")
