"""``init``: fresh adapters for a base tree, with ``B = 0`` so training starts at the base."""

from __future__ import annotations

import jax

from lora_jax.paths import flatten, nested_set, path_hash
from lora_jax.plan import plan
from lora_jax.quant.array import as_array
from lora_jax.spec import LoraSpec
from lora_jax.typing import PyTree
from lora_jax.variants import variant_of


def path_key(key: jax.Array, name: str) -> jax.Array:
    """Return a key for one path: the same whatever else the tree holds or its order."""
    return jax.random.fold_in(key, path_hash(name))


def init(key: jax.Array, params: PyTree, spec: LoraSpec) -> dict:
    """Make the adapter tree for ``params`` under ``spec``.

    Each adapted kernel ``W [*shape]`` gets ``A [*stack, *in, r]`` (random, per
    the rule) and ``B [*stack, r, *out]`` (zeros), so ``combine`` returns the
    base exactly. Each fully trainable leaf gets a copy of its base value.

    Args:
      key: a JAX PRNG key; each path's key is folded in from its name, so the
        result depends neither on dict order nor on which other leaves matched.
      params: the base tree (arrays or ``jax.ShapeDtypeStruct``; the latter
        only when no rule is ``mode="train"``).
      spec: the rules.

    Returns:
      A nested dict mirroring the matched paths (see :mod:`lora_jax.adapters`).
    """
    values = dict(flatten(params)[0])
    lora: dict = {}
    for target in plan(params, spec):
        base = as_array(values[target.path])  # a quantized kernel as the array it stands for
        fresh = variant_of(target).init(path_key(key, target.name), target, base)
        for path, value in fresh.items():
            nested_set(lora, path, value)
    return lora
