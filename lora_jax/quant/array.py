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
from typing import Any

import jax
import numpy as np


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
    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Return the array ``[*shape]`` this leaf stands for, in ``dtype`` (default its own ``dtype``)."""

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

    The one place where a quantized base leaf becomes an array: ``combine``, ``merge``, the factored
    path and ``init`` pass each base leaf through it, inside the caller's ``jit``.
    """
    return _dequantize(leaf, None if dtype is None else np.dtype(dtype)) if isinstance(leaf, QuantizedArray) else leaf


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(leaf: QuantizedArray, dtype: np.dtype | None) -> jax.Array:
    # Compiled once per format, shape and dtype; inside a caller's jit it is inlined.
    return leaf.dequantize(dtype)
