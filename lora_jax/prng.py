"""Threefry-2x32 keys that draw the same bits as JAX's default keys, lowered as straight-line code.

On CPU, JAX lowers Threefry as a five-step ``while`` loop (to keep compile
times down on large programs). Each dropout mask then becomes five passes over
a mask-sized buffer, and each key derivation (``fold_in``, ``split``) a tiny
loop whose fixed cost dominates: on a MiniLM training step with dropout this
is about a seventh of the step. :data:`THREEFRY_UNROLLED` is the same
algorithm (the same key layout, ``uint32 [2]``; the same counters; the same
bits for the same key, under ``jax_threefry_partitionable``, JAX's default)
written as twenty unrolled rounds, which XLA fuses into one elementwise pass.
Keys of this kind mix with any JAX random function; their data is
interchangeable with default keys'.

    key = jax.random.wrap_key_data(jax.random.key_data(jax.random.key(0)), impl=THREEFRY_UNROLLED)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import define_prng_impl

from lora_jax.errors import LoraError

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_UINT = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return the Threefry-2x32 hash (20 rounds) of the counter pairs ``(x0, x1)`` under ``key``.

    Args:
      key: ``uint32 [2]``.
      x0: ``uint32 [*shape]``, the first words of the counters.
      x1: ``uint32 [*shape]``, the second words.

    Returns:
      Two ``uint32 [*shape]``: the words of each hashed pair, as ``jax.extend.random.threefry_2x32`` gives them.
    """
    k0, k1 = key[0], key[1]
    schedule = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + schedule[0], x1 + schedule[1]
    for group in range(5):
        for rotation in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, rotation) ^ x0
        x0 = x0 + schedule[(group + 1) % 3]
        x1 = x1 + schedule[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def _counters(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Return the counters JAX's partitionable Threefry uses for ``shape``: the flat index, high word first."""
    size = math.prod(shape)
    if size >= 2**32:
        raise LoraError(f"THREEFRY_UNROLLED draws at most 2**32 - 1 values at once; asked for shape {shape}")
    low = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return jnp.zeros(shape, jnp.uint32), low


def _seed(seed: jax.Array) -> jax.Array:
    seed = jnp.asarray(seed)
    if seed.dtype.itemsize < 8:
        return jnp.stack([jnp.zeros((), jnp.uint32), seed.astype(jnp.uint32)])
    high = jax.lax.shift_right_logical(seed, jnp.asarray(32, seed.dtype)).astype(jnp.uint32)
    return jnp.stack([high, (seed & jnp.asarray(0xFFFFFFFF, seed.dtype)).astype(jnp.uint32)])


def _split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    bits0, bits1 = threefry2x32(key, *_counters(shape))
    return jnp.stack([bits0, bits1], axis=-1)


def _fold_in(key: jax.Array, data: Any) -> jax.Array:
    out0, out1 = threefry2x32(key, jnp.zeros((1,), jnp.uint32), jnp.asarray(data, jnp.uint32).reshape(1))
    return jnp.concatenate([out0, out1])


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    bits0, bits1 = threefry2x32(key, *_counters(shape))
    if bit_width == 64:
        return (bits0.astype(jnp.uint64) << np.uint64(32)) | bits1.astype(jnp.uint64)
    return (bits0 ^ bits1).astype(_UINT[bit_width])


THREEFRY_UNROLLED = define_prng_impl(
    key_shape=(2,),
    seed=_seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name="threefry2x32_unrolled",
    tag="tfu",
)
"""Pass as ``impl=`` to ``jax.random.key`` / ``wrap_key_data``: JAX's Threefry bits, computed in one fused pass."""


def unrolled(key: jax.Array) -> jax.Array:
    """Return ``key`` as a :data:`THREEFRY_UNROLLED` key when it is a Threefry key (typed or raw ``uint32 [2]``).

    The bits it draws are the same; other kinds of key (``rbg``, user-defined) come back unchanged.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return key
        key = jax.random.key_data(key)
    elif key.shape[-1:] != (2,) or key.dtype != jnp.uint32:
        return key
    return jax.random.wrap_key_data(key, impl=THREEFRY_UNROLLED)
