"""The two layer layouts: a stack of blocks, unrolled (``layer_{i}``) or scanned (``layers``), and the
tree transforms between them. The naming rule itself lives in :mod:`lora_jax.paths`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.common.config import ConfigError
from lora_jax.models.common.layers import Cache, Dtype
from lora_jax.paths import STACKED, layer_index, unrolled_key
from lora_jax.typing import PyTree


class BlockStack(nn.Module):
    """``num_layers`` copies of ``block``, unrolled (``layer_0``, ...) or under ``nn.scan`` (``layers``).

    ``block(config, deterministic=, dtype=, param_dtype=)`` must map
    ``(hidden, cache, mask, positions, cache_index) -> (hidden, cache)``.
    Scanned params carry a leading layer axis; both layouts compute the same.
    ``remat`` names a ``jax.checkpoint_policies`` policy: each block is rematerialized under it, keeping
    only what the policy saves between the forward and backward passes (see :data:`REMAT_POLICIES`).
    """

    block: type[nn.Module]
    config: Any
    num_layers: int
    scan: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str | None = None

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        mask: jax.Array,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, Cache | None]:
        """``hidden [B, T, D]``, cache leaves ``[layers, B, S, K, Dh]`` -> same shapes."""
        kwargs = {"deterministic": self.deterministic, "dtype": self.dtype, "param_dtype": self.param_dtype}
        block = self.block
        if self.remat is not None:
            block = nn.remat(block, policy=remat_policy(self.remat), prevent_cse=not self.scan)
        if self.scan:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),  # pyright: ignore[reportArgumentType]  (flax annotates one int)
                length=self.num_layers,
            )
            return scanned(self.config, **kwargs, name=STACKED)(hidden, cache, mask, positions, cache_index)
        updated = []
        for i in range(self.num_layers):
            layer_cache = None if cache is None else jax.tree_util.tree_map(lambda c: c[i], cache)
            layer = block(self.config, **kwargs, name=unrolled_key(i))
            hidden, layer_cache = layer(hidden, layer_cache, mask, positions, cache_index)
            updated.append(layer_cache)
        if cache is not None:
            cache = jax.tree_util.tree_map(lambda *c: jnp.stack(c), *updated)
        return hidden, cache


REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)
"""The policies ``remat=`` takes: from least memory (recompute every block's forward) to none saved."""


def remat_policy(name: str) -> Any:
    """Return the ``jax.checkpoint_policies`` policy called ``name``; refuse any other name."""
    if name not in REMAT_POLICIES:
        raise ConfigError(f"remat={name!r} is not a policy; use one of {', '.join(REMAT_POLICIES)} (or None)")
    return getattr(jax.checkpoint_policies, name)


def _layer_indices(node: Mapping) -> list[int] | None:
    found = [layer_index(str(k)) for k in node]
    if not node or any(i is None for i in found):
        return None
    indices = sorted(i for i in found if i is not None)
    if indices != list(range(len(indices))):
        raise ValueError(f"layers must be numbered layer_0 .. layer_{len(indices) - 1}, got {sorted(node)}")
    return indices


def stack_layers(params: PyTree) -> PyTree:
    """Stack unrolled layers into the scanned layout.

    Every dict whose keys are all ``layer_0 .. layer_{n-1}`` becomes ``{"layers": ...}`` with each
    leaf stacked on a new leading axis ``[n, *shape]``. A pure function on nested mappings; returns plain dicts.
    """
    if not isinstance(params, Mapping):
        return params
    indices = _layer_indices(params)
    if indices is not None:
        layers = [stack_layers(params[unrolled_key(i)]) for i in indices]
        return {STACKED: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}
    return {k: stack_layers(v) for k, v in params.items()}


def unstack_layers(params: PyTree) -> PyTree:
    """Unstack scanned layers: ``{"layers": leaves [n, ...]}`` becomes ``layer_0 .. layer_{n-1}``.

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
