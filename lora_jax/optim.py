"""Optimizer helpers: update only the trainable part of a combined tree.

The combined style keeps one tree ``{"base": params, "lora": lora}`` and lets
the optimizer see all of it. :func:`adapter_only` routes the ``lora`` subtree
to the real optimizer and everything else to ``optax.set_to_zero()``, which
holds no state, so frozen leaves get zero updates and no moments.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

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
