"""Two provided objectives, each a loss and an evaluation for :func:`lora_jax.training.fit`.

An objective is given the model as ``apply_fn(params, batch, rng | None) -> logits``:
it reads the model's inputs from ``batch`` and runs with dropout when ``rng``
is a key and without when it is ``None``. The objective adds the batch keys
its loss reads:

- :func:`classification`: ``labels [B]`` and ``weights [B]``; weighted
  cross-entropy; accuracy, F1 and MCC of the argmax predictions.
- :func:`causal_lm`: ``input_ids [B, T]`` and ``loss_mask [B, T]``; next-token
  cross-entropy over the tokens the mask marks (an answer, not its prompt or
  padding); perplexity. With ``chunk`` it takes ``apply_fn -> (hidden, head_kernel)``
  and never forms the ``[B, T, V]`` logits (:func:`chunked_next_token_nll`).

``Objective.loss(params, batch, rng) -> scalar`` is what :func:`lora_jax.training.train_step`
takes; ``Objective.evaluate(params, batches) -> {name: value}`` scores a plain
(merged) param tree on an iterable of batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from lora_jax.errors import LoraError
from lora_jax.training.metrics import METRICS, compute_metrics
from lora_jax.training.step import LossFn
from lora_jax.typing import PyTree

Batch = Mapping[str, np.ndarray | jax.Array]
ApplyFn = Callable[[PyTree, Batch, jax.Array | None], jax.Array]
"""``(params, batch, rng | None) -> logits``: the model, reading its inputs from the batch."""
LmApplyFn = Callable[[PyTree, Batch, jax.Array | None], jax.Array | tuple[jax.Array, jax.Array]]
""":func:`causal_lm`'s model: ``-> logits [B, T, V]``, or with ``chunk`` ``-> (hidden [B, T, D], head [D, V])``."""
Evaluate = Callable[[PyTree, Iterable[Batch]], dict[str, float]]
"""``(params, batches) -> {metric: value}`` on a plain (merged) param tree."""


class Objective(NamedTuple):
    """A loss to train on and an evaluation to report."""

    loss: LossFn
    evaluate: Evaluate


# Classification ----------------------------------------------------------------


def classification_loss(logits: jax.Array, labels: ArrayLike, weights: ArrayLike) -> jax.Array:
    """Return the weighted mean cross-entropy of ``logits [B, C]`` for ``labels [B]`` with ``weights [B]``."""
    with jax.named_scope("loss"):
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def classification(apply_fn: ApplyFn, metrics: Sequence[str] = ("accuracy",)) -> Objective:
    """Build the classification task: weighted cross-entropy, metrics of the argmax predictions.

    Batch keys, besides the model inputs ``apply_fn`` reads:
      labels: ``[B] int``, the class of each row.
      weights: ``[B] float``, 1 for a real row and 0 for a filler row that
        pads the last evaluation batch (see :func:`lora_jax.data.batches`).

    Args:
      apply_fn: ``(params, batch, rng | None) -> logits [B, C]``.
      metrics: names from :data:`lora_jax.training.metrics.METRICS`
        (``accuracy``, ``f1``, ``matthews_corrcoef``), each weighted by ``weights``.

    Returns:
      ``Objective(loss, evaluate)``; ``evaluate`` returns ``{metric: value}``.

    Raises:
      LoraError: a metric name that is not in ``METRICS``.
    """
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise LoraError(f"unknown metric {unknown[0]!r}; use names from {sorted(METRICS)}")
    metrics = tuple(metrics)

    def loss(params: PyTree, batch: Batch, rng: jax.Array | None) -> jax.Array:
        return classification_loss(apply_fn(params, batch, rng), batch["labels"], batch["weights"])

    predict = jax.jit(lambda params, batch: jnp.argmax(apply_fn(params, batch, None), axis=-1))

    def evaluate(params: PyTree, batches: Iterable[Batch]) -> dict[str, float]:
        preds, labels, weights = [], [], []
        for batch in batches:
            preds.append(np.asarray(predict(params, batch)))
            labels.append(np.asarray(batch["labels"]))
            weights.append(np.asarray(batch["weights"]))
        return dict(compute_metrics(metrics, np.concatenate(preds), np.concatenate(labels), np.concatenate(weights)))

    return Objective(loss, evaluate)


# Causal language modelling -------------------------------------------------------


def next_token_nll(logits: jax.Array, input_ids: ArrayLike, loss_mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Return the summed negative log-likelihood of the marked tokens and how many there are.

    Position ``t`` of ``logits [B, T, V]`` predicts token ``t + 1`` of
    ``input_ids [B, T]``; that prediction counts where ``loss_mask [B, T]``
    marks token ``t + 1``. The first token of a row is never predicted, so its
    mask entry is ignored.
    """
    with jax.named_scope("loss"):
        targets = jnp.asarray(input_ids)[:, 1:]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
        mask = jnp.asarray(loss_mask)[:, 1:].astype(jnp.float32)
        return jnp.sum(losses * mask), jnp.sum(mask)


def _check_chunk(chunk: object) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise LoraError(f"chunk={chunk!r} must be a positive number of positions, e.g. 32")


def chunked_next_token_nll(
    hidden: jax.Array, head_kernel: jax.Array, input_ids: ArrayLike, loss_mask: ArrayLike, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Return :func:`next_token_nll` of the logits ``hidden @ head_kernel``, ``chunk`` positions of each row at a time.

    The logits ``[B, T, V]`` are never formed whole: a scan over the positions forms ``[B, chunk, V]``
    of them at a time, in ``hidden``'s dtype and then float32 as the model's head does, and the backward
    pass forms each chunk again instead of keeping it. With a vocabulary of 50,257 the whole logits of
    8 x 256 tokens are 392 MiB in float32, and their gradient as much again. Chunks run along the
    positions, never across rows, so a batch sharded over devices stays sharded.

    Args:
      hidden: ``[B, T, D]``, the final hidden states (what the LM head reads).
      head_kernel: ``[D, V]``, the LM head (the token embedding, transposed, when tied).
      input_ids, loss_mask: ``[B, T]``, as for :func:`next_token_nll`.
      chunk: positions of each row whose logits are formed at once.
    """
    _check_chunk(chunk)
    if hidden.ndim != 3 or head_kernel.ndim != 2 or head_kernel.shape[0] != hidden.shape[-1]:
        raise LoraError(
            f"hidden {tuple(hidden.shape)} and head_kernel {tuple(head_kernel.shape)} must be [B, T, D] and [D, V]"
        )
    with jax.named_scope("loss"):
        rows, positions = hidden.shape[0], hidden.shape[1] - 1
        chunk = max(1, min(chunk, positions))  # rows of one token have no position to predict
        chunks = -(-positions // chunk)
        pad = chunks * chunk - positions  # padded positions have mask 0: they add nothing, forward or back

        def by_chunk(a: jax.Array) -> jax.Array:
            """``[B, T - 1, ...]`` -> ``[chunks, B, chunk, ...]``, padded along the positions."""
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            return jnp.swapaxes(a.reshape(rows, chunks, chunk, *a.shape[2:]), 0, 1)

        x = by_chunk(hidden[:, :-1])
        targets = by_chunk(jnp.asarray(input_ids)[:, 1:])
        mask = by_chunk(jnp.asarray(loss_mask)[:, 1:].astype(jnp.float32))
        kernel = head_kernel.astype(hidden.dtype)

        @jax.checkpoint  # keep a chunk's hidden states, not its logits
        def chunk_nll(kernel: jax.Array, x: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
            logits = jnp.dot(x, kernel).astype(jnp.float32)  # [B, chunk, V]
            return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)

        def add_chunk(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
            return total + chunk_nll(kernel, *xs), None

        total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), (x, targets, mask))
        return total, jnp.sum(mask)


def causal_lm_loss(logits: jax.Array, input_ids: ArrayLike, loss_mask: ArrayLike) -> jax.Array:
    """Return the mean next-token cross-entropy over the tokens ``loss_mask`` marks (see :func:`next_token_nll`)."""
    total, count = next_token_nll(logits, input_ids, loss_mask)
    return total / jnp.maximum(count, 1.0)


def completion_mask(prompt_lengths: Sequence[int], lengths: Sequence[int], length: int) -> np.ndarray:
    """Return ``loss_mask [B, length]``: 1 on tokens ``prompt_lengths[i] <= t < lengths[i]`` of row ``i``.

    Use it for prompt-answer pairs laid out ``prompt, answer, padding``: only
    the answer's tokens count in :func:`causal_lm`'s loss.
    """
    positions = np.arange(length)[None, :]
    prompt = np.asarray(prompt_lengths)[:, None]
    end = np.asarray(lengths)[:, None]
    return ((positions >= prompt) & (positions < end)).astype(np.float32)


def causal_lm(apply_fn: LmApplyFn, chunk: int | None = None) -> Objective:
    """Build the causal language modelling task: next-token loss under a prompt mask, perplexity.

    Batch keys, besides any other model inputs ``apply_fn`` reads (e.g.
    ``attention_mask [B, T]``):
      input_ids: ``[B, T] int``, the tokens; the model's input and, shifted
        by one, its targets.
      loss_mask: ``[B, T]``, 1 on the tokens whose prediction counts (an
        answer) and 0 on those that do not (its prompt, padding); see
        :func:`completion_mask`.

    Args:
      apply_fn: ``(params, batch, rng | None) -> logits [B, T, V]``; with ``chunk``,
        ``-> (hidden [B, T, D], head_kernel [D, V])`` instead (see
        :func:`lora_jax.models.causal_lm_apply_fn`).
      chunk: form the logits this many positions of each row at a time (:func:`chunked_next_token_nll`),
        in the loss and in the evaluation; None forms them whole.

    Returns:
      ``Objective(loss, evaluate)``; ``loss`` is the mean cross-entropy over the
      marked tokens of the batch, ``evaluate`` returns ``{"nll": mean over
      every marked token of all batches, "perplexity": exp(nll)}``.
    """
    if chunk is not None:
        _check_chunk(chunk)

    def sums(params: PyTree, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        out = apply_fn(params, batch, rng)
        if chunk is None:
            if isinstance(out, tuple):
                raise LoraError("apply_fn returned a tuple: return logits [B, T, V], or pass chunk= to take one")
            return next_token_nll(out, batch["input_ids"], batch["loss_mask"])
        if not (isinstance(out, tuple) and len(out) == 2):
            raise LoraError(
                f"with chunk={chunk}, apply_fn must return (hidden [B, T, D], head_kernel [D, V]), not "
                f"{type(out).__name__}: build it with lora_jax.models.causal_lm_apply_fn(model, head=False)"
            )
        return chunked_next_token_nll(*out, batch["input_ids"], batch["loss_mask"], chunk)

    def loss(params: PyTree, batch: Batch, rng: jax.Array | None) -> jax.Array:
        total, count = sums(params, batch, rng)
        return total / jnp.maximum(count, 1.0)

    evaluation_sums = jax.jit(lambda params, batch: sums(params, batch, None))

    def evaluate(params: PyTree, batches: Iterable[Batch]) -> dict[str, float]:
        total, count = 0.0, 0.0
        for batch in batches:
            nll, tokens = evaluation_sums(params, batch)
            total, count = total + float(nll), count + float(tokens)
        nll = total / max(count, 1.0)
        return {"nll": nll, "perplexity": math.exp(nll)}

    return Objective(loss, evaluate)
