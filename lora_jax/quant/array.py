"""``QuantizedArray``: one kernel stored in fewer bits, a pytree node that stands for one array.

A quantized leaf holds its packed codes and scales as children (arrays, so ``jit``, ``device_put``
and tree maps see them) and the logical ``shape`` and ``dtype`` of the array it stands for as static
data. The rest of lora_jax names it by its path as one leaf (:func:`lora_jax.paths.flatten`), plans
and describes it by its logical shape and dtype, and turns it into an array in one place:
:func:`as_array`, where ``combine``, ``factored`` and ``init`` read the base.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from lora_jax.quant.errors import QuantError
from lora_jax.scheduling import recomputation_saves_memory


class QuantizedArray(abc.ABC):
    """A quantized kernel: packed children plus the static ``shape`` and ``dtype`` of the array it stands for.

    Subclasses are frozen dataclasses registered as pytrees (:class:`~lora_jax.quant.nf4.Nf4Array`,
    :class:`~lora_jax.quant.int8.Int8Array`).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    fmt: Any
    """Its format (:class:`~lora_jax.quant.nf4.Nf4` or :class:`~lora_jax.quant.int8.Int8`); ``fmt.name`` names it."""

    @abc.abstractmethod
    def dequantize(self, dtype: Any = None, anchor: jax.Array | None = None) -> jax.Array:
        """Return the array ``[*shape]`` this leaf stands for, in ``dtype`` (default its own ``dtype``).

        ``anchor``, a float32 scalar that is 0 (see :mod:`lora_jax.quant.product`), enters the first operation
        that reads the codes, so no part of the dequantization can run before the anchor exists. A NaN anchor
        makes the whole result NaN.
        """

    def layers(self) -> QuantizedArray | None:
        """Return this stack ``[L, *rest]`` as one leaf of shape ``rest`` whose children have a leading ``L`` axis.

        ``jax.lax.scan`` over it gives each step a leaf that dequantizes to one layer ``[*rest]``, so a scanned
        stack is dequantized a layer at a time. None where a layer's codes or scales do not split apart (the
        default).
        """
        return None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def is_quantized(leaf: Any) -> bool:
    """Return whether ``leaf`` is a :class:`QuantizedArray`."""
    return isinstance(leaf, QuantizedArray)


def as_array(leaf: Any, dtype: Any = None) -> Any:
    """Return a quantized leaf dequantized (in ``dtype``, default its own), any other leaf as it is.

    Where ``combine``, ``merge``, the factored path and ``init`` read a base leaf, inside the caller's ``jit``
    (a product with a quantized kernel on the factored path dequantizes by itself:
    :func:`lora_jax.quant.product.quantized_dot`).
    """
    return _dequantize(leaf, None if dtype is None else np.dtype(dtype)) if isinstance(leaf, QuantizedArray) else leaf


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _dequantize(leaf: QuantizedArray, dtype: np.dtype | None) -> jax.Array:
    # One `custom_jvp_call` equation in a caller's trace, which is how recompute_dequantized finds it (a `jit`
    # equation would be looked into, its last step saved); the compiled body runs once per format and shape.
    return _dequantize_compiled(leaf, dtype)


@_dequantize.defjvp
def _dequantize_jvp(dtype: np.dtype | None, primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> Any:
    return jax.jvp(lambda leaf: _dequantize_compiled(leaf, dtype), primals, tangents)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_compiled(leaf: QuantizedArray, dtype: np.dtype | None) -> jax.Array:
    return leaf.dequantize(dtype)


def recompute_dequantized(primitive: Any, *_: Any, **params: Any) -> bool:
    """A ``jax.checkpoint`` policy: save every value for the backward pass but the dequantized kernels.

    Under it, the backward pass dequantizes each kernel again from its codes (which it keeps) instead of
    keeping a whole-precision copy of the base alive from the forward pass, which would erase the saving of a
    quantized base.
    """
    if primitive.name != "custom_jvp_call":
        return True
    info = params["call_jaxpr"].jaxpr.debug_info
    return info is None or info.func_name != _dequantize.__name__


def check_recompute(value: Any, where: str) -> None:
    """Refuse a ``recompute_dequantized`` argument that is not True, False or None.

    Raises:
      QuantError: naming ``where`` (the function it was given to) and the value.
    """
    if value is not None and not isinstance(value, bool):
        raise QuantError(f"{where}: recompute_dequantized={value!r}; give True, False or None (decide by the backend)")


def keep_codes(fn: Callable[..., Any], base_leaves: Iterable[Any], recompute: bool | None) -> Callable[..., Any]:
    """Return ``fn`` under ``jax.checkpoint`` with :func:`recompute_dequantized` where that keeps codes, else ``fn``.

    It does so when ``base_leaves`` hold a quantized leaf and ``recompute`` is True, or None and
    :func:`lora_jax.scheduling.recomputation_saves_memory` says the backend runs the recomputation late.
    """
    wanted = recomputation_saves_memory() if recompute is None else recompute
    return jax.checkpoint(fn, policy=recompute_dequantized) if wanted and any(map(is_quantized, base_leaves)) else fn
