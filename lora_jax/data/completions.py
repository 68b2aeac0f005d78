"""Prompt-completion data for decoders: JSON Lines checked line by line, encoded with a mask on the completion.

Each line of a file is one JSON object, either ``{"prompt": ..., "completion": ...}`` (the text is
``prompt + completion`` as written, so a completion starts with its own space; the loss counts the tokens that
hold completion text) or ``{"text": ...}`` (every token counts). A line that is not such an object, a key that
is neither or appears twice, a value that is not a string (or holds a lone surrogate), an empty completion or
text, and a file without examples are refused naming the file and line: a misspelled key would otherwise train
on nothing, or on the wrong tokens.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lora_jax.data.batching import Batch, bucket_length
from lora_jax.data.encoding import bare_copy
from lora_jax.data.tsv import DataFileError, decode_utf8
from lora_jax.errors import LoraError

PAIR_KEYS = ("prompt", "completion")
TEXT_KEY = "text"


@dataclasses.dataclass(frozen=True)
class Completion:
    """One example: ``prompt`` (may be empty) and ``completion`` (the tokens the loss counts), from ``line``."""

    prompt: str
    completion: str
    line: int


@dataclasses.dataclass(frozen=True)
class Completions:
    """Encoded examples: per example ``prompt tokens, completion tokens[, EOS]``, and where the completion starts.

    Attributes:
      input_ids: one int32 ``[n_i]`` per example.
      prompt_lengths: ``[N]`` int32, the tokens before the completion's first (the loss starts there).
      pad_id: the id padding takes (masked out of attention and loss).
      cut: how many examples lost tokens at the end to ``max_length``.
    """

    input_ids: tuple[np.ndarray, ...]
    prompt_lengths: np.ndarray
    pad_id: int
    cut: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def pad_batch(self, rows: np.ndarray, batch_size: int, buckets: Sequence[int]) -> Batch:
        """Return ``rows`` padded into one batch: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, L]``.

        ``loss_mask`` is 1 on each completion's tokens (and its EOS); filler rows are all zero, so they count
        nothing. ``L`` is the smallest of ``buckets`` that holds the longest row.
        """
        length = bucket_length(max((len(self.input_ids[i]) for i in rows), default=1), buckets)
        input_ids = np.full((batch_size, length), self.pad_id, dtype=np.int32)
        attention_mask = np.zeros((batch_size, length), dtype=np.int32)
        loss_mask = np.zeros((batch_size, length), dtype=np.float32)
        for slot, i in enumerate(rows):
            n = len(self.input_ids[i])
            input_ids[slot, :n] = self.input_ids[i]
            attention_mask[slot, :n] = 1
            loss_mask[slot, self.prompt_lengths[i] : n] = 1.0
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(f"key {twice[0]!r} appears twice; keep one")
    return dict(pairs)


def _example(record: object, file: Path, line: int) -> Completion:
    if not isinstance(record, dict):
        raise DataFileError(file, line, f"a {type(record).__name__}, not a JSON object; give {_FORMS}")
    keys = sorted(record)
    if keys not in (sorted(PAIR_KEYS), [TEXT_KEY]):
        raise DataFileError(file, line, f"keys {keys}; give {_FORMS}")
    for name in keys:
        if not isinstance(record[name], str):
            raise DataFileError(file, line, f"{name!r} is a {type(record[name]).__name__}, not a string")
        try:
            record[name].encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataFileError(file, line, f"{name!r} holds {err.reason} at character {err.start}") from None
    last = keys[0]  # "completion" or "text": what the loss counts
    if not record[last].strip():
        raise DataFileError(file, line, f"the {last} is empty")
    return Completion(record.get("prompt", ""), record[last], line)


_FORMS = '{"prompt": ..., "completion": ...} or {"text": ...} on each line'


def read_completions(file: Path) -> list[Completion]:
    """Return the examples of a JSON Lines file, checked line by line (blank lines are skipped).

    Raises:
      FileNotFoundError: no such file.
      DataFileError: a line that is not UTF-8, not JSON or not one of the two forms (``path:line:``).
      LoraError: a file that holds no examples.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such data file")
    text = decode_utf8(file.read_bytes(), file)  # a byte-order mark is dropped, as in TSV files
    examples = []
    # Lines end at "\n" alone: JSON strings may hold U+2028 and other characters str.splitlines() breaks at.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as err:
            raise DataFileError(file, number, f"not JSON ({err.msg} at column {err.colno}); give {_FORMS}") from None
        except ValueError as err:  # a key twice
            raise DataFileError(file, number, str(err)) from None
        examples.append(_example(record, file, number))
    if not examples:
        raise LoraError(f"{file}: no examples; give {_FORMS}")
    return examples


def encode_completions(
    examples: Sequence[Completion],
    tokenizer: Tokenizer,
    max_length: int,
    eos_id: int | None,
    pad_id: int,
    file: Path,
) -> Completions:
    """Encode the text ``prompt + completion`` (and EOS), cut to ``max_length`` tokens from its end.

    The text is tokenized whole, with the tokenizer's special tokens (a BOS where it adds one), so the tokens are
    those the model sees at inference; the loss starts at the first token that differs from the prompt's own
    tokenization (a token that straddles the boundary holds completion text, so it counts). EOS is appended
    unless the tokenizer ends the text with it already.

    Raises:
      DataFileError: an example that leaves no completion token to predict within ``max_length``.
    """
    bare = bare_copy(tokenizer)
    prompts = [e.ids for e in bare.encode_batch([x.prompt for x in examples], add_special_tokens=True)]
    texts = [e.ids for e in bare.encode_batch([x.prompt + x.completion for x in examples], add_special_tokens=True)]
    input_ids, prompt_lengths, cut = [], [], 0
    for example, prompt, text in zip(examples, prompts, texts, strict=True):
        start = next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
        whole = text if eos_id is None or text[-1:] == [eos_id] else [*text, eos_id]
        ids, cut = whole[:max_length], cut + (len(whole) > max_length)
        # The first token is never predicted: a text needs two tokens, a completion one after its prompt.
        if len(ids) <= max(start, 1):
            raise DataFileError(
                file,
                example.line,
                f"the prompt takes {start} of --max-length {max_length} tokens, leaving no completion token "
                "to predict; raise --max-length or shorten the prompt",
            )
        input_ids.append(np.asarray(ids, dtype=np.int32))
        prompt_lengths.append(start)
    return Completions(tuple(input_ids), np.asarray(prompt_lengths, dtype=np.int32), pad_id, cut)
