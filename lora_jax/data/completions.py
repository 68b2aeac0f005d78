"""Prompt-completion data for decoders: JSON Lines checked line by line, encoded with a mask on the completion.

Each line of a file is one JSON object, either ``{"prompt": ..., "completion": ...}`` (the loss counts the
completion's tokens only) or ``{"text": ...}`` (every token counts). A line that is not such an object, a key
that is neither, a value that is not a string, an empty completion or text, and a file without examples are
refused naming the file and line: a misspelled key would otherwise train on nothing, or on the wrong tokens.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lora_jax.data.batching import Batch, bucket_length
from lora_jax.data.tsv import DataFileError
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


def _example(record: object, file: Path, line: int) -> Completion:
    if not isinstance(record, dict):
        raise DataFileError(file, line, f"a {type(record).__name__}, not a JSON object; give {_FORMS}")
    keys = sorted(record)
    if keys not in (sorted(PAIR_KEYS), [TEXT_KEY]):
        raise DataFileError(file, line, f"keys {keys}; give {_FORMS}")
    for name in keys:
        if not isinstance(record[name], str):
            raise DataFileError(file, line, f"{name!r} is a {type(record[name]).__name__}, not a string")
    last = keys[0]  # "completion" or "text": what the loss counts
    if not record[last].strip():
        raise DataFileError(file, line, f"the {last} is empty")
    return Completion(record.get("prompt", ""), record[last], line)


_FORMS = '{"prompt": ..., "completion": ...} or {"text": ...} on each line'


def read_completions(file: Path) -> list[Completion]:
    """Return the examples of a JSON Lines file, checked line by line (blank lines are skipped).

    Raises:
      FileNotFoundError: no such file.
      DataFileError: a line that is not JSON or not one of the two forms (``path:line:``).
      LoraError: a file that is not UTF-8 or holds no examples.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such data file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LoraError(f"{file}: not UTF-8 text ({err})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(file, number, f"not JSON ({err.msg} at column {err.colno}); give {_FORMS}") from None
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
    """Encode ``prompt + completion (+ EOS)``, cut to ``max_length`` tokens from the end of the completion.

    The prompt gets the tokenizer's special tokens (a BOS where the tokenizer adds one), the completion none.

    Raises:
      DataFileError: an example that leaves no completion token to predict within ``max_length``.
    """
    bare = Tokenizer.from_str(tokenizer.to_str())
    bare.no_truncation()
    bare.no_padding()
    prompts = [e.ids for e in bare.encode_batch([x.prompt for x in examples], add_special_tokens=True)]
    completions = [e.ids for e in bare.encode_batch([x.completion for x in examples], add_special_tokens=False)]
    input_ids, prompt_lengths, cut = [], [], 0
    for example, prompt, completion in zip(examples, prompts, completions, strict=True):
        whole = [*prompt, *completion, *(() if eos_id is None else (eos_id,))]
        ids, cut = whole[:max_length], cut + (len(whole) > max_length)
        # The first token is never predicted: a text needs two tokens, a completion one after its prompt.
        if len(ids) <= max(len(prompt), 1):
            raise DataFileError(
                file,
                example.line,
                f"the prompt takes {len(prompt)} of --max-length {max_length} tokens, leaving no completion token "
                "to predict; raise --max-length or shorten the prompt",
            )
        input_ids.append(np.asarray(ids, dtype=np.int32))
        prompt_lengths.append(len(prompt))
    return Completions(tuple(input_ids), np.asarray(prompt_lengths, dtype=np.int32), pad_id, cut)
