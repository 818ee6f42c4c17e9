"""Tokenizers for preprocessing and training: a built-in byte-level tokenizer, and Hugging Face
tokenizers (a local tokenizer directory or file) when `transformers` is installed.

Both follow megatron.core's MegatronTokenizerBase, which its GPTDataset expects (`eod`, `pad`).
"""

from __future__ import annotations

import os

import numpy

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_switch.data import BYTE_LEVEL_VOCAB_SIZE

TOKENIZER_TYPES = ("ByteLevelTokenizer", "HuggingFaceTokenizer")


class ByteLevelTokenizer(MegatronTokenizerBase):
    """UTF-8 bytes 0-255 are tokens 0-255; 256 ends a document (eod), 257 pads."""

    def __init__(self):
        super().__init__(path="", config={})
        self.unique_identifiers = {"class": type(self).__name__}  # keys megatron's dataset cache

    def tokenize(self, text: str) -> numpy.ndarray:
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8).astype(numpy.int64)

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

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
        return BYTE_LEVEL_VOCAB_SIZE

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
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        pad = self._tokenizer.pad_token_id
        return self._eod if pad is None else pad


def build_tokenizer(tokenizer_type: str = "ByteLevelTokenizer", tokenizer_model: str | None = None):
    if tokenizer_type == "ByteLevelTokenizer":
        return ByteLevelTokenizer()
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH "
                             "(a local tokenizer directory)")
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}: use one of {', '.join(TOKENIZER_TYPES)}")
