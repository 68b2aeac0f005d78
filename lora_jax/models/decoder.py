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
    length: int,
    cache: Cache | None,
    cache_index: jax.Array | int,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Query positions ``[B|1, T]`` and the causal mask ``[B|1, 1, T, S]``.

    Without a cache the keys are the ``T`` new tokens; with one they are the
    ``S`` cache slots, of which those after the query's slot are hidden.
    ``attention_mask`` (``[B, T]`` or ``[B, S]``, 1 for real tokens) hides
    padding; ``position_ids`` (``[B, T]``) override the slot numbers as
    positions, e.g. to count from a row's first real token under left padding.
    """
    slots = jnp.arange(length) + cache_index
    keys = length if cache is None else cache["key"].shape[2]
    positions = slots[None] if position_ids is None else position_ids
    return positions, causal_mask(slots, keys, attention_mask)
