"""Move param trees between the unrolled (``layer_{i}``) and scanned (``layers``) layouts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.paths import STACKED, layer_index, unrolled_key


def _layer_indices(node: Mapping) -> list[int] | None:
    found = [layer_index(str(k)) for k in node]
    if not node or any(i is None for i in found):
        return None
    indices = sorted(i for i in found if i is not None)
    if indices != list(range(len(indices))):
        raise ValueError(f"layers must be numbered layer_0 .. layer_{len(indices) - 1}, got {sorted(node)}")
    return indices


def stack_layers(params: Any) -> Any:
    """Unrolled -> scanned: every dict whose keys are all ``layer_0 .. layer_{n-1}`` becomes
    ``{"layers": ...}`` with each leaf stacked on a new leading axis ``[n, *shape]``.

    A pure function on nested mappings; returns plain dicts.
    """
    if not isinstance(params, Mapping):
        return params
    indices = _layer_indices(params)
    if indices is not None:
        layers = [stack_layers(params[unrolled_key(i)]) for i in indices]
        return {STACKED: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}
    return {k: stack_layers(v) for k, v in params.items()}


def unstack_layers(params: Any) -> Any:
    """Scanned -> unrolled: ``{"layers": leaves [n, ...]}`` becomes ``layer_0 .. layer_{n-1}``.

    The inverse of :func:`stack_layers`; returns plain dicts.
    """
    if not isinstance(params, Mapping):
        return params
    out = {}
    for key, value in params.items():
        if key == STACKED and isinstance(value, Mapping):
            leaves = jax.tree_util.tree_leaves(value)
            count = leaves[0].shape[0]
            for i in range(count):
                out[unrolled_key(i)] = unstack_layers(jax.tree_util.tree_map(lambda x: x[i], value))
        else:
            out[key] = unstack_layers(value)
    return out
