"""Two provided objectives, each a loss and an evaluation for :func:`lora_jax.training.fit`.

An objective is given the model as ``apply_fn(params, batch, rng | None) -> logits``:
it reads the model's inputs from ``batch`` and runs with dropout when ``rng``
is a key and without when it is ``None``. The objective adds the batch keys
its loss reads:

- :func:`classification`: ``labels [B]`` and ``weights [B]``; weighted
  cross-entropy; accuracy, F1 and MCC of the argmax predictions.
- :func:`causal_lm`: ``input_ids [B, T]`` and ``loss_mask [B, T]``; next-token
  cross-entropy over the tokens the mask marks (an answer, not its prompt or
  padding); perplexity.

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


def causal_lm(apply_fn: ApplyFn) -> Objective:
    """Build the causal language modelling task: next-token loss under a prompt mask, perplexity.

    Batch keys, besides any other model inputs ``apply_fn`` reads (e.g.
    ``attention_mask [B, T]``):
      input_ids: ``[B, T] int``, the tokens; the model's input and, shifted
        by one, its targets.
      loss_mask: ``[B, T]``, 1 on the tokens whose prediction counts (an
        answer) and 0 on those that do not (its prompt, padding); see
        :func:`completion_mask`.

    Args:
      apply_fn: ``(params, batch, rng | None) -> logits [B, T, V]``.

    Returns:
      ``Objective(loss, evaluate)``; ``loss`` is the mean cross-entropy over the
      marked tokens of the batch, ``evaluate`` returns ``{"nll": mean over
      every marked token of all batches, "perplexity": exp(nll)}``.
    """

    def loss(params: PyTree, batch: Batch, rng: jax.Array | None) -> jax.Array:
        return causal_lm_loss(apply_fn(params, batch, rng), batch["input_ids"], batch["loss_mask"])

    sums = jax.jit(
        lambda params, batch: next_token_nll(apply_fn(params, batch, None), batch["input_ids"], batch["loss_mask"])
    )

    def evaluate(params: PyTree, batches: Iterable[Batch]) -> dict[str, float]:
        total, count = 0.0, 0.0
        for batch in batches:
            nll, tokens = sums(params, batch)
            total, count = total + float(nll), count + float(tokens)
        nll = total / max(count, 1.0)
        return {"nll": nll, "perplexity": math.exp(nll)}

    return Objective(loss, evaluate)
