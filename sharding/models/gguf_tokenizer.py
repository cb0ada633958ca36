"""Tokenizers for the llama family: a byte-level BPE rebuilt from GGUF metadata, and a byte tokenizer.

The GGUF keeps the whole vocabulary in ``tokenizer.ggml.*``; rebuilding a ``tokenizers.Tokenizer`` from it
means we need no second download and the ids match the weights by construction.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
_SPECIAL_TYPES = {2, 3, 4, 5}

# Pre-tokenizer names (``tokenizer.ggml.pre``) we can reproduce exactly. llama.cpp gives "smollm" (and the
# StarCoder family) two regexes: every digit alone ("\p{N}"), then the GPT-2 regex. The HF equivalent is
# Digits(individual_digits) followed by ByteLevel's built-in GPT-2 regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_PLAIN_GPT2_PRE = {"gpt2", "default"}


class TokenizerError(ValueError):
    """A tokenizer could not be built, or was given ids/text it cannot handle."""


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class GgufVocab:
    """The tokenizer part of a GGUF file's metadata, as plain Python values."""

    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    model: str
    pre: str
    bos_id: int
    eos_id: int
    add_bos: bool


def read_gguf_vocab(reader) -> GgufVocab:
    """Read ``tokenizer.ggml.*`` from an open ``gguf.GGUFReader``."""
    fields = reader.fields

    def get(key: str, default=None):
        if key not in fields:
            if default is None:
                raise TokenizerError(f"GGUF has no {key!r}")
            return default
        return fields[key].contents()

    vocab = GgufVocab(
        tokens=list(get("tokenizer.ggml.tokens")),
        merges=list(get("tokenizer.ggml.merges")),
        token_types=[int(t) for t in get("tokenizer.ggml.token_type")],
        model=str(get("tokenizer.ggml.model")),
        pre=str(get("tokenizer.ggml.pre", "default")),
        bos_id=int(get("tokenizer.ggml.bos_token_id")),
        eos_id=int(get("tokenizer.ggml.eos_token_id")),
        # llama.cpp's default for BPE vocabularies when the key is absent is to add BOS.
        add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
    )
    if len(vocab.token_types) != len(vocab.tokens):
        raise TokenizerError(f"GGUF token_type has {len(vocab.token_types)} entries, tokens {len(vocab.tokens)}")
    for name, tid in (("bos", vocab.bos_id), ("eos", vocab.eos_id)):
        if not 0 <= tid < len(vocab.tokens):
            raise TokenizerError(f"GGUF {name} id {tid} outside vocabulary of {len(vocab.tokens)}")
    return vocab


def build_bpe_tokenizer(vocab: GgufVocab) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` equivalent to llama.cpp's for this vocabulary."""
    if vocab.model != "gpt2":
        raise TokenizerError(f"only gpt2-style byte-level BPE is supported, GGUF says {vocab.model!r}")
    if vocab.pre in _DIGIT_SPLIT_PRE:
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif vocab.pre in _PLAIN_GPT2_PRE:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise TokenizerError(f"unsupported pre-tokenizer {vocab.pre!r}")

    token_to_id = {tok: i for i, tok in enumerate(vocab.tokens)}
    if len(token_to_id) != len(vocab.tokens):
        raise TokenizerError("GGUF vocabulary has duplicate tokens")
    merges = []
    for m in vocab.merges:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise TokenizerError(f"malformed merge {m!r}")
        merges.append((left, right))

    tok = Tokenizer(models.BPE(vocab=token_to_id, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched whole in the text, as llama.cpp does with
    # parse_special, and are not split into bytes.
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(vocab.tokens, vocab.token_types, strict=True)
        if kind in _SPECIAL_TYPES
    ]
    tok.add_special_tokens(specials)
    for t in specials:
        if tok.token_to_id(t.content) != token_to_id[t.content]:
            raise TokenizerError(f"special token {t.content!r} got a new id")
    return tok


class HFTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with llama.cpp's BOS rule."""

    def __init__(self, tokenizer: Tokenizer, bos_id: int, eos_id: int, add_bos: bool) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos

    @classmethod
    def from_file(cls, path: Path, bos_id: int, eos_id: int, add_bos: bool) -> HFTokenizer:
        return cls(Tokenizer.from_file(str(path)), bos_id, eos_id, add_bos)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        _check_ids(ids, self.vocab_size)
        # Special tokens stay in the text so that decode(encode(s)) == s, also for chat markup.
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes, then BOS, EOS, and reserved ids up to ``vocab_size``."""

    def __init__(self, vocab_size: int = 512) -> None:
        if vocab_size < 258:
            raise TokenizerError(f"byte tokenizer needs vocab_size >= 258, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_id = 256
        self.eos_id = 257

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        _check_ids(ids, self.vocab_size)
        # BOS/EOS/reserved ids carry no bytes; a random model may emit them, so they decode to nothing.
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    for i in ids:
        if not isinstance(i, numbers.Integral) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise TokenizerError(f"token id {i!r} is not an int in [0, {vocab_size})")
