"""Optimizer helpers: update only the trainable part of a combined tree.

The combined style keeps one tree ``{"base": params, "lora": lora}`` and lets
the optimizer see all of it. :func:`adapter_only` routes the ``lora`` subtree
to the real optimizer and everything else to ``optax.set_to_zero()``, which
holds no state, so frozen leaves get zero updates and no moments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_jax.variants import A_KEY, B_KEY

TRAINABLE = "trainable"
FROZEN = "frozen"


def trainable_labels(tree: Any, trainable_key: str = "lora") -> Any:
    """Label each leaf of ``{"base": ..., trainable_key: ...}``: ``"trainable"`` or ``"frozen"``.

    Raises:
      KeyError: ``tree`` is not a dict with ``trainable_key`` at its top.
    """
    if not isinstance(tree, dict) or trainable_key not in tree:
        raise KeyError(f"expected a dict with a {trainable_key!r} entry, e.g. {{'base': params, 'lora': lora}}")
    return {
        key: jax.tree_util.tree_map(lambda _, k=key: TRAINABLE if k == trainable_key else FROZEN, sub)
        for key, sub in tree.items()
    }


def adapter_only(tx: optax.GradientTransformation, trainable_key: str = "lora") -> optax.GradientTransformation:
    """Wrap ``tx`` so it updates only ``tree[trainable_key]`` of a combined tree.

    Frozen leaves get zero updates and no optimizer state.
    """

    def labels(tree: Any) -> Any:
        # optax.tree_utils.tree_map_params (which partitions optimizer state) calls init
        # with a leafless placeholder for the whole tree; it needs no labels.
        if not isinstance(tree, dict) and not jax.tree_util.tree_leaves(tree):
            return tree
        return trainable_labels(tree, trainable_key)

    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def lora_plus_labels(lora: Any) -> Any:
    """Label each leaf of an adapter tree ``"b"`` (a ``B`` factor) or ``"other"`` (``A``, fully trainable leaves)."""

    def label(node: Any) -> Any:
        if isinstance(node, dict):
            pair = set(node) == {A_KEY, B_KEY}
            return {k: ("b" if pair and k == B_KEY else label(v)) for k, v in node.items()}
        return jax.tree_util.tree_map(lambda _: "other", node)

    return label(lora)


def lora_plus(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    *,
    ratio: float = 16.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """Build LoRA+ (Hayou et al. 2024): ``optimizer`` with ``ratio`` times the learning rate for every ``B``.

    Args:
      optimizer: an optax optimizer factory taking the learning rate first, e.g. ``optax.adamw``.
      learning_rate: the rate of ``A`` and of fully trainable leaves; a number or a schedule.
      ratio: ``lr_B / lr_A`` (the paper's default is 16).
      **kwargs: passed to ``optimizer`` (``weight_decay=...``).

    Returns:
      A transformation of an adapter tree; wrap it in :func:`adapter_only` for a combined tree.
    """
    if not ratio > 0:
        raise ValueError(f"lora_plus ratio must be positive, got {ratio!r}")
    fast = (lambda step: ratio * learning_rate(step)) if callable(learning_rate) else ratio * learning_rate
    return optax.multi_transform(
        {"other": optimizer(learning_rate, **kwargs), "b": optimizer(fast, **kwargs)}, lora_plus_labels
    )
