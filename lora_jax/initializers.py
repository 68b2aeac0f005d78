"""``init``: fresh adapters for a base tree, with ``B = 0`` so training starts at the base."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters import A_KEY, B_KEY
from lora_jax.paths import flatten, nested_set, path_hash
from lora_jax.plan import Target, plan
from lora_jax.spec import LoraSpec


def path_key(key: jax.Array, name: str) -> jax.Array:
    """A key for one path: the same whatever else the tree holds or its order."""
    return jax.random.fold_in(key, path_hash(name))


def init_a(key: jax.Array, target: Target) -> jax.Array:
    """``A [*stack, *in, r]`` drawn per the rule's ``init``."""
    rule, layout = target.rule, target.layout
    assert layout is not None
    shape, dtype = target.a_shape, jnp.dtype(rule.dtype)
    if rule.init == "gaussian":
        std = rule.init_std if rule.init_std is not None else 1.0 / rule.rank
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    # PEFT and loralib: kaiming_uniform_(a=sqrt(5)) on [r, fan_in] gives bound 1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(layout.in_size)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def init(key: jax.Array, params: Any, spec: LoraSpec) -> dict:
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
    targets = plan(params, spec)
    values = dict(flatten(params)[0])
    lora: dict = {}
    for target in targets:
        if target.layout is None:
            nested_set(lora, target.path, jnp.array(values[target.path]))
            continue
        nested_set(lora, (*target.path, A_KEY), init_a(path_key(key, target.name), target))
        nested_set(lora, (*target.path, B_KEY), jnp.zeros(target.b_shape, jnp.dtype(target.rule.dtype)))
    return lora
