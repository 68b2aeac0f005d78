"""What GPT-2 and Llama share: the output type and the mask/position bookkeeping."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lora_jax.models.layers import Cache, causal_mask


class DecoderOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    cache: Cache | None  # {"key", "value"} each [layers, B, S, K, Dh]


def positions_and_mask(
    length: int, cache: Cache | None, cache_index: jax.Array | int, attention_mask: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Absolute query positions ``[T]`` and the causal mask ``[B|1, 1, T, S]``.

    Without a cache the keys are the ``T`` new tokens; with one they are the
    ``S`` cache slots, of which those after the query are hidden.
    ``attention_mask`` (``[B, T]`` or ``[B, S]``, 1 for real tokens) hides padding.
    """
    positions = jnp.arange(length) + cache_index
    keys = length if cache is None else cache["key"].shape[2]
    return positions, causal_mask(positions, keys, attention_mask)
