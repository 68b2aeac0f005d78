"""A ``dot_general`` with a quantized kernel that dequantizes where the product runs, in both passes.

A frozen kernel needs no gradient of its own, so the backward pass of ``x W`` needs ``W`` only for
``dx = dy W^T``. :func:`quantized_dot` keeps the kernel's codes for that (never its dequantized copy) and
makes each dequantization wait for the value its product waits for (``x`` forward, ``dy`` backward): the
first operation that reads the codes also reads a scalar computed from that value, 0 for a finite one. A
scheduler can then not run a dequantization early and hold its float copy from there (XLA:CPU's default
scheduler runs whatever waits for nothing first), so a float copy of a kernel lives from its dequantization to
its product only.

A non-finite first element of ``x`` (or ``dy``) makes the anchor NaN, and with it every output of the product:
altered codes never give finite, wrong rows.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from lora_jax.quant.array import QuantizedArray


class Product(NamedTuple):
    """The static part of one ``dot_general``: its parameters, which operand is the kernel, the input's type.

    Attributes:
      params: the equation's parameters (``dimension_numbers``, ``precision``, ``preferred_element_type``, ...),
        as sorted ``(name, value)`` pairs.
      kernel_side: 0 when the kernel is the left operand, 1 when it is the right.
      x_shape, x_dtype: the other operand's shape and dtype.
      kernel_dtype: the dtype the kernel is dequantized to (None: its own).
    """

    params: tuple[tuple[str, Any], ...]
    kernel_side: int
    x_shape: tuple[int, ...]
    x_dtype: np.dtype
    kernel_dtype: np.dtype | None = None

    def apply(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """Return the equation's output for input ``x`` and kernel ``w``."""
        lhs, rhs = (w, x) if self.kernel_side == 0 else (x, w)
        return jax.lax.dot_general_p.bind(lhs, rhs, **dict(self.params))


def _after(leaf: QuantizedArray, value: jax.Array, dtype: np.dtype | None) -> jax.Array:
    """Return ``leaf`` dequantized in ``dtype`` (None: its own), computed after ``value`` exists."""
    return _dequantize_anchored(leaf, _anchor(value), dtype)


@jax.custom_batching.custom_vmap
def _anchor(value: jax.Array) -> jax.Array:
    """Return a float32 scalar that is 0 when ``value``'s first element is finite, NaN otherwise.

    XLA:CPU drops optimization barriers before it schedules, so the order is a data dependence instead; XLA does
    not fold ``0 * x`` for floats. One element is read (a slice, no copy of ``value``).
    """
    first = jax.lax.slice(value, (0,) * value.ndim, (1,) * value.ndim).reshape(())
    return 0.0 * first.astype(jax.numpy.float32)


@_anchor.def_vmap
def _anchor_rows(axis_size: int, in_batched: list[bool], value: jax.Array) -> tuple[jax.Array, bool]:
    # Under vmap (a batch of rows, each with its own adapter) the anchor comes from the first row only, so the
    # kernel is dequantized once for the batch, not once per row.
    (batched,) = in_batched
    return _anchor(value[0] if batched else value), False


@functools.partial(jax.jit, static_argnums=2)
def _dequantize_anchored(leaf: QuantizedArray, anchor: jax.Array, dtype: np.dtype | None) -> jax.Array:
    return leaf.dequantize(dtype, anchor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def quantized_dot(product: Product, x: jax.Array, leaf: QuantizedArray) -> jax.Array:
    """Return ``product`` applied to ``x`` and ``leaf`` dequantized; differentiable in ``x`` only.

    Args:
      product: the ``dot_general`` (see :class:`Product`).
      x: the activation operand, ``[*product.x_shape]``.
      leaf: the frozen quantized kernel.
    """
    return product.apply(x, _after(leaf, x, product.kernel_dtype))


def _forward(product: Product, x: jax.Array, leaf: QuantizedArray) -> tuple[jax.Array, QuantizedArray]:
    return product.apply(x, _after(leaf, x, product.kernel_dtype)), leaf


def _backward(product: Product, leaf: QuantizedArray, dy: jax.Array) -> tuple[jax.Array, None]:
    w = _after(leaf, dy, product.kernel_dtype)
    (dx,) = jax.linear_transpose(lambda x: product.apply(x, w), jax.ShapeDtypeStruct(product.x_shape, product.x_dtype))(
        dy
    )
    return dx, None  # the kernel is frozen: no cotangent for its codes or scales


quantized_dot.defvjp(_forward, _backward)


def product_of(params: dict[str, Any], kernel_side: int, x: jax.Array, kernel_dtype: Any = None) -> Product:
    """Return the :class:`Product` of a ``dot_general`` with ``params`` whose kernel is operand ``kernel_side``,
    dequantized in ``kernel_dtype`` (None: the leaf's own)."""
    shape, dtype = jax.numpy.shape(x), jax.numpy.result_type(x)
    kernel_dtype = None if kernel_dtype is None else np.dtype(kernel_dtype)
    return Product(tuple(sorted(params.items())), kernel_side, tuple(shape), np.dtype(dtype), kernel_dtype)
