"""Seeded shuffling and padding to a few fixed lengths, so a jitted step compiles a bounded number of times."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from lora_jax.data.encoding import Encoded

DEFAULT_BUCKETS = (32, 64, 128)
Batch = dict[str, np.ndarray]


def order(n: int, seed: int | None, epoch: int = 0, limit: int | None = None) -> np.ndarray:
    """Example order: a permutation fixed by ``(seed, epoch)``, or file order when ``seed`` is None;
    then the first ``limit`` of it."""
    idx = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
    return idx if limit is None else idx[:limit]


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ValueError(
        f"a sequence of {length} tokens exceeds the largest bucket {max(buckets)}; tokenize with a smaller max_length"
    )


def buckets_up_to(max_length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """Return the buckets below ``max_length`` and ``max_length`` itself: the lengths of texts tokenized to it."""
    return (*sorted(b for b in buckets if b < max_length), max_length)


def pad_batch(encoded: Encoded, rows: np.ndarray, batch_size: int, buckets: Sequence[int]) -> Batch:
    """Pads the examples ``rows`` into one batch of ``batch_size`` rows; filler rows have weight 0."""
    length = bucket_length(max((len(encoded.input_ids[i]) for i in rows), default=1), buckets)
    input_ids = np.full((batch_size, length), encoded.pad_id, dtype=np.int32)
    token_type_ids = np.zeros((batch_size, length), dtype=np.int32)
    attention_mask = np.zeros((batch_size, length), dtype=np.int32)
    labels = np.zeros((batch_size,), dtype=np.int32)
    weights = np.zeros((batch_size,), dtype=np.float32)
    for slot, i in enumerate(rows):
        n = len(encoded.input_ids[i])
        input_ids[slot, :n] = encoded.input_ids[i]
        token_type_ids[slot, :n] = encoded.token_type_ids[i]
        attention_mask[slot, :n] = 1
        labels[slot] = encoded.labels[i]
        weights[slot] = 1.0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": labels,
        "weights": weights,
    }


def batches(
    encoded: Encoded,
    batch_size: int,
    seed: int | None = None,
    epoch: int = 0,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    drop_remainder: bool = True,
    limit: int | None = None,
) -> Iterator[Batch]:
    """Yields batches of ``batch_size`` rows, each padded to the smallest bucket that fits it.

    Training: pass a ``seed`` (and the ``epoch``) and ``drop_remainder=True``.
    Evaluation: ``seed=None`` and ``drop_remainder=False``; the last batch is filled with
    weight-0 rows so that every example is counted exactly once.
    Every batch has ``input_ids``, ``attention_mask``, ``token_type_ids`` ``[B, L] int32``,
    ``labels [B] int32`` and ``weights [B] float32``, with ``L`` one of ``buckets``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    idx = order(len(encoded), seed, epoch, limit)
    stop = len(idx) - len(idx) % batch_size if drop_remainder else len(idx)
    for start in range(0, stop, batch_size):
        yield pad_batch(encoded, idx[start : start + batch_size], batch_size, buckets)


def num_batches(n: int, batch_size: int, drop_remainder: bool = True, limit: int | None = None) -> int:
    """How many batches :func:`batches` yields for ``n`` examples."""
    n = n if limit is None else min(n, limit)
    return n // batch_size if drop_remainder else -(-n // batch_size)
