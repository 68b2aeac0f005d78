"""BERT-style encoding of one or two texts: ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from lora_jax.errors import LoraError

if TYPE_CHECKING:
    from lora_jax.data.loading import Examples


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Unpadded encodings: one int32 array per example for ids and token types, plus labels."""

    input_ids: tuple[np.ndarray, ...]
    token_type_ids: tuple[np.ndarray, ...]
    labels: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each example, special tokens included."""
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int32, count=len(self.input_ids))


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise LoraError(f"the tokenizer has no {token} token; a BERT-style WordPiece vocabulary is expected")
    return token_id


def truncated_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Longest-first truncation: shortens the longer text until both fit ``budget`` tokens together."""
    keep_b = min(len_b, max(budget - len_a, budget // 2))
    keep_a = min(len_a, budget - keep_b)
    return keep_a, keep_b


def bare_copy(tokenizer: Tokenizer) -> Tokenizer:
    """Return a copy of ``tokenizer`` without truncation or padding; the caller's keeps its own settings."""
    bare = Tokenizer.from_str(tokenizer.to_str())
    bare.no_truncation()
    bare.no_padding()
    return bare


def _encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def tokenize(examples: Examples, tokenizer: Tokenizer, max_length: int = 128) -> Encoded:
    """Encodes every example, truncating to ``max_length`` tokens including ``[CLS]`` and ``[SEP]``.

    Token type ids are 0 for ``[CLS] a [SEP]`` and 1 for ``b [SEP]``.
    """
    pairs = len(examples.texts) == 2
    specials = 3 if pairs else 2
    if max_length < specials + 2:
        raise ValueError(f"max_length {max_length} leaves no room for text")
    cls_id, sep_id = _special_id(tokenizer, "[CLS]"), _special_id(tokenizer, "[SEP]")
    pad_id = _special_id(tokenizer, "[PAD]")
    bare = bare_copy(tokenizer)
    first = _encode_texts(bare, examples.texts[0])
    second = _encode_texts(bare, examples.texts[1]) if pairs else [[] for _ in first]
    budget = max_length - specials
    input_ids, type_ids = [], []
    for a, b in zip(first, second, strict=True):
        keep_a, keep_b = truncated_lengths(len(a), len(b), budget)
        ids = [cls_id, *a[:keep_a], sep_id]
        types = [0] * len(ids)
        if pairs:
            ids += [*b[:keep_b], sep_id]
            types += [1] * (keep_b + 1)
        input_ids.append(np.asarray(ids, dtype=np.int32))
        type_ids.append(np.asarray(types, dtype=np.int32))
    return Encoded(
        input_ids=tuple(input_ids),
        token_type_ids=tuple(type_ids),
        labels=np.asarray(examples.labels, dtype=np.int32),
        pad_id=pad_id,
    )
