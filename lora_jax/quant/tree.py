"""``quantize`` / ``dequantize`` / ``nbytes``: the quantized base as a transform of the param tree.

    rules = [(r".*/(attention/(query|key|value|out)|mlp/\\w+)/kernel", "nf4")]
    qparams = quantize(params, rules)        # those kernels as Nf4Array, every other leaf untouched
    lora = lora_jax.init(key, qparams, spec) # plan, describe, combine, factored, merge accept it
    nbytes(qparams) / nbytes(params)         # about 0.13 on those kernels

A rule is ``(pattern, format)``: the pattern a regex matched against the whole ``/``-joined path or a
predicate ``(path, leaf) -> bool`` (:func:`lora_jax.paths.matches`, as spec and partition rules); the
format ``"nf4"``, ``"int8"``, or an :class:`~lora_jax.quant.nf4.Nf4` / :class:`~lora_jax.quant.int8.Int8`
with its options. The first matching rule wins.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.paths import Pattern, check_pattern, flatten, matches, path_str
from lora_jax.plan import _closest, abstract_leaf
from lora_jax.quant.array import QuantizedArray, as_array
from lora_jax.quant.errors import QuantError
from lora_jax.quant.int8 import Int8
from lora_jax.quant.nf4 import Nf4
from lora_jax.typing import PyTree

Format = Nf4 | Int8
FORMATS: dict[str, Format] = {"nf4": Nf4(), "int8": Int8()}
"""The formats by name, with their default options."""
QuantRules = Sequence[tuple[Pattern, "str | Format"]]
"""``(pattern, format)`` pairs; the first whose pattern matches a leaf's path quantizes it."""


def as_format(fmt: str | Format) -> Format:
    """Return the format named ``fmt`` (``"nf4"``, ``"int8"``), or ``fmt`` itself when it is one.

    Raises:
      QuantError: an unknown name or something that is not a format.
    """
    if isinstance(fmt, Nf4 | Int8):
        return fmt
    if isinstance(fmt, str) and fmt in FORMATS:
        return FORMATS[fmt]
    raise QuantError(f"unknown quantization format {fmt!r}; use one of {sorted(FORMATS)} or an Nf4(...) / Int8(...)")


def check_rules(rules: QuantRules) -> list[tuple[Pattern, Format]]:
    """Return ``rules`` with their formats looked up, after checking each pair.

    Raises:
      QuantError: a rule that is not a ``(pattern, format)`` pair, an invalid regex, an unknown format.
    """
    if isinstance(rules, str) or (isinstance(rules, tuple) and len(rules) == 2 and isinstance(rules[1], str | Format)):
        raise QuantError(f"quantize rules: got {rules!r}; pass a list of (pattern, format) pairs")
    out = []
    for rule in rules:
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise QuantError(f"quantize rule {rule!r} is not a (pattern, format) pair, e.g. ('.*/kernel', 'nf4')")
        pattern, fmt = rule
        try:
            check_pattern(pattern, f"quantize rule {pattern!r}")
        except (TypeError, ValueError) as err:
            raise QuantError(str(err)) from None
        out.append((pattern, as_format(fmt)))
    return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize_array(x: jax.Array, fmt: Format, dtype: Any = None) -> QuantizedArray:
    """Return ``x`` in ``fmt``, dequantizing to ``dtype`` (default ``x``'s); compiled once per shape and format."""
    return fmt.quantize(x, dtype)


def matching(rules: list[tuple[Pattern, Format]], name: str, leaf: Any) -> list[int]:
    """Return the indices of the checked ``rules`` whose pattern matches the leaf at ``name``; the first one wins."""
    abstract = abstract_leaf(leaf)
    return [i for i, (pattern, _) in enumerate(rules) if matches(pattern, name, abstract)]


def quantize_leaf(name: str, leaf: Any, fmt: Format, dtype: Any = None) -> QuantizedArray:
    """Return the leaf at ``name`` in ``fmt``, dequantizing to ``dtype`` (default its own), after checking it.

    Raises:
      QuantError: naming the path: the leaf is not floating point, has fewer than 2 axes, is quantized
        already, or does not have the format's channel axes.
    """
    _check_leaf(name, leaf, fmt)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.eval_shape(lambda x: fmt.quantize(x, dtype), leaf)
    return quantize_array(leaf, fmt, None if dtype is None else np.dtype(dtype))


def _check_leaf(name: str, leaf: Any, fmt: Format) -> None:
    if isinstance(leaf, QuantizedArray):
        raise QuantError(f"{name} is already quantized ({leaf.fmt.name}); dequantize it first or narrow the rule")
    abstract = abstract_leaf(leaf)
    if not jnp.issubdtype(abstract.dtype, jnp.floating):
        raise QuantError(f"{name} has dtype {abstract.dtype}: only floating-point leaves can be quantized")
    if len(abstract.shape) < 2:
        raise QuantError(
            f"{name} has shape {tuple(abstract.shape)}: only kernels (2+ axes) are quantized, not biases or "
            "norm scales; narrow the pattern, e.g. to '.*/kernel'"
        )
    if isinstance(fmt, Int8):
        try:
            fmt.axes(len(abstract.shape))
        except QuantError as err:
            raise QuantError(f"{name} with shape {tuple(abstract.shape)}: {err}") from None


def quantize(params: PyTree, rules: QuantRules) -> PyTree:
    """Return ``params`` with the leaves ``rules`` select stored in NF4 or int8, every other leaf as it is.

    Jittable with ``rules`` static (``jax.jit(quantize, static_argnums=1)``; give the rules as a tuple).

    Args:
      params: any pytree of arrays (or ``jax.ShapeDtypeStruct`` under ``jax.eval_shape``).
      rules: ``(pattern, format)`` pairs; the first matching rule quantizes a leaf. Formats: ``"nf4"``
        (:class:`~lora_jax.quant.nf4.Nf4`, blocks of 64 in row-major order, double-quantized scales; a
        size that is no multiple of 64 is padded), ``"int8"`` (:class:`~lora_jax.quant.int8.Int8`, a
        scale per index of the last axis; give ``Int8(channel_axes=...)`` for other output axes).

    Returns:
      A tree of the same structure whose selected leaves are
      :class:`~lora_jax.quant.array.QuantizedArray` s that dequantize to the leaf's own dtype.

    Raises:
      QuantError: a malformed rule or unknown format; a rule that matches no leaf (with the closest
        paths); a selected leaf that is not floating point, has fewer than 2 axes or is quantized already.
    """
    checked = check_rules(rules)
    flat, treedef = flatten(params)
    hits = [0] * len(checked)
    leaves = []
    for path, leaf in flat:
        found = matching(checked, path_str(path), leaf)
        for i in found:
            hits[i] += 1
        leaves.append(quantize_leaf(path_str(path), leaf, checked[found[0]][1]) if found else leaf)
    names = [path_str(path) for path, _ in flat]
    for (pattern, _), hit in zip(checked, hits):
        if hit == 0:
            raise QuantError(f"quantize rule {pattern!r} matches no leaf; closest paths: {_closest(pattern, names)}")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def dequantize(tree: PyTree, dtype: Any = None) -> PyTree:
    """Return ``tree`` with each quantized leaf back as an array, in ``dtype`` (default its own); jittable.

    Other leaves are returned as they are.
    """
    flat, treedef = flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, [as_array(leaf, dtype) for _, leaf in flat])


def nbytes(tree: PyTree) -> int:
    """Return the bytes the arrays of ``tree`` hold: a quantized leaf counts its codes and scales.

    Works on arrays and ``jax.ShapeDtypeStruct`` alike, e.g. ``nbytes(quantize(params, rules)) / nbytes(params)``.
    """
    abstract = [abstract_leaf(leaf) for leaf in jax.tree_util.tree_leaves(tree)]
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in abstract)
