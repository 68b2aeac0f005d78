"""Classification metrics on numpy predictions and labels, with optional per-example weights.

:mod:`lora_jax.data` re-exports them; they live here because evaluation needs them and not the data layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

ArrayLike = np.ndarray | Sequence[int]


def _prepare(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None) -> tuple[np.ndarray, ...]:
    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    weights = np.ones(labels.shape, np.float64) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if not preds.shape == labels.shape == weights.shape:
        raise ValueError(f"shapes differ: preds {preds.shape}, labels {labels.shape}, weights {weights.shape}")
    return preds, labels, weights


def confusion_matrix(
    preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None, num_classes: int | None = None
) -> np.ndarray:
    """``C[t, p]``: total weight of examples with label ``t`` predicted as ``p``."""
    preds, labels, weights = _prepare(preds, labels, weights)
    k = num_classes or int(max(preds.max(initial=0), labels.max(initial=0))) + 1
    matrix = np.zeros((k, k), np.float64)
    np.add.at(matrix, (labels.astype(np.int64), preds.astype(np.int64)), weights)
    return matrix


def accuracy(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Weighted fraction of correct predictions (0 when the total weight is 0)."""
    preds, labels, weights = _prepare(preds, labels, weights)
    total = weights.sum()
    return float((weights * (preds == labels)).sum() / total) if total > 0 else 0.0


def f1(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: ``2 TP / (2 TP + FP + FN)`` (0 when there are no positives at all)."""
    preds, labels, weights = _prepare(preds, labels, weights)
    tp = (weights * ((preds == positive) & (labels == positive))).sum()
    fp = (weights * ((preds == positive) & (labels != positive))).sum()
    fn = (weights * ((preds != positive) & (labels == positive))).sum()
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else 0.0


def macro_f1(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Mean over classes of each class's F1 against the rest; the classes are those in ``labels`` or ``preds``."""
    preds, labels, weights = _prepare(preds, labels, weights)
    present = weights > 0
    classes = np.union1d(labels[present], preds[present])
    if classes.size == 0:
        return 0.0
    return float(np.mean([f1(preds, labels, weights, positive=int(c)) for c in classes]))


def matthews_corrcoef(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Matthews correlation coefficient (multiclass form; the usual binary one for two classes).

    Returns 0 when it is undefined, e.g. when every prediction is the same class.
    """
    matrix = confusion_matrix(preds, labels, weights)
    total = matrix.sum()
    correct = np.trace(matrix)
    true_counts, pred_counts = matrix.sum(axis=1), matrix.sum(axis=0)
    cov = correct * total - pred_counts @ true_counts
    denom = np.sqrt(total**2 - pred_counts @ pred_counts) * np.sqrt(total**2 - true_counts @ true_counts)
    return float(cov / denom) if denom > 0 else 0.0


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews_corrcoef": matthews_corrcoef,
}


def compute_metrics(
    names: Sequence[str], preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None
) -> Mapping[str, float]:
    """Every named metric (e.g. ``Task.metrics``) on the same predictions."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise KeyError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    return {name: METRICS[name](preds, labels, weights) for name in names}
