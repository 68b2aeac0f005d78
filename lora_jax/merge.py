"""``merge`` / ``unmerge``: plain trees for serving at the base model's speed."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.combine import add_updates
from lora_jax.finite import check_finite as _check_finite
from lora_jax.finite import is_traced
from lora_jax.paths import flatten
from lora_jax.plan import abstract_leaf, plan
from lora_jax.quant.array import as_array, is_quantized
from lora_jax.spec import LoraSpec
from lora_jax.typing import PyTree


def merge(
    params: PyTree, lora: PyTree, spec: LoraSpec, *, dtype: Any = None, check_finite: bool | None = None
) -> PyTree:
    """Fold adapters into the base: return a plain tree the unmodified ``apply`` accepts.

    The update ``s * A @ B`` is accumulated in float32 and cast once to the
    kernel's dtype, so a bfloat16 base loses only the final rounding. Fully
    trainable leaves take their trained values. A quantized base
    (:mod:`lora_jax.quant`) comes back dequantized: a plain tree, which
    ``lora_jax.quant.quantize`` can quantize again. Jittable (``spec`` static).

    Args:
      params: the base tree, plain or quantized.
      lora: the adapter tree.
      spec: the spec ``lora`` was made with.
      dtype: the dtype of every floating-point leaf of the result (e.g.
        ``jnp.bfloat16`` or ``jnp.float32``): each kernel is merged in the
        wider of its dtype and ``dtype`` (float32 for a quantized one) and
        rounded once to ``dtype``. None keeps each leaf's own dtype.
      check_finite: refuse adapters that hold NaN or Inf, and merged kernels
        that overflow their dtype (a float16 base). ``None`` (the default)
        checks when called outside ``jax.jit`` and not inside; ``True`` also
        checks inside, when the computation runs; ``False`` never checks.

    Returns:
      A tree with ``params``' structure and shapes, in the base's dtypes or ``dtype``.

    Raises:
      NonFiniteError: naming the adapter leaf or merged kernel.
    """
    traced = is_traced((params, lora))
    check = not traced if check_finite is None else check_finite
    if check:
        fix = "the adapters diverged or were damaged; retrain or load another adapter"
        _check_finite(lora, "adapter leaf", fix, traced=traced)
    if dtype is None:
        merged = add_updates(params, lora, spec, sign=1.0)
    else:  # merged at the wider of the two dtypes (float32 for a quantized kernel), rounded once to dtype
        merged = _cast(add_updates(_widen(params, dtype), lora, spec, sign=1.0), dtype)
    if check:
        kernels = {t.path for t in plan(params, spec) if t.layout is not None}
        adapted = {path: leaf for path, leaf in flatten(merged)[0] if path in kernels}
        fix = "its dtype cannot hold W0 + s*A@B; merge into a float32 copy of the base, or serve unmerged"
        _check_finite(_nested(adapted), "merged kernel", fix, traced=traced)
    return merged


def _widen(params: PyTree, dtype: Any) -> PyTree:
    """Return ``params`` with quantized leaves dequantized to float32, other float leaves promoted with ``dtype``."""
    flat, treedef = flatten(params)
    leaves = []
    for _, leaf in flat:
        if is_quantized(leaf):
            leaves.append(as_array(leaf, jnp.float32))
        elif jnp.issubdtype(abstract_leaf(leaf).dtype, jnp.floating):
            leaves.append(_cast_leaf(leaf, jnp.promote_types(abstract_leaf(leaf).dtype, dtype)))
        else:
            leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _cast(tree: PyTree, dtype: Any) -> PyTree:
    """Return ``tree`` (no quantized leaves) with every floating-point leaf in ``dtype``."""
    flat, treedef = flatten(tree)
    leaves = [_cast_leaf(x, dtype) if jnp.issubdtype(abstract_leaf(x).dtype, jnp.floating) else x for _, x in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _cast_leaf(leaf: Any, dtype: Any) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):  # a fully trainable leaf's placeholder
        return jax.ShapeDtypeStruct(leaf.shape, dtype)
    return jnp.asarray(leaf).astype(dtype)


def _nested(leaves: dict) -> dict:
    # check_finite names leaves by their path in the tree it is given.
    return {"/".join(path): leaf for path, leaf in leaves.items()}


def unmerge(merged: PyTree, lora: PyTree, spec: LoraSpec) -> PyTree:
    """Subtract the adapters from a merged tree: return the base again, within rounding.

    In float32 ``unmerge(merge(p, l, s), l, s)`` equals ``p`` to float32
    rounding. Fully trainable leaves keep their trained values: the base
    values they replaced are not recoverable from the merged tree.
    """
    return add_updates(merged, lora, spec, sign=-1.0)
