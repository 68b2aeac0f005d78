"""int8: symmetric absmax quantization with one float32 scale per output channel.

Each channel (an index of the ``channel_axes``, by default the last axis: the output of a Dense
kernel ``[in, out]``) gets ``scale = max |w| / 127`` over the other axes, and each weight the int8
``round(w / scale)`` in ``[-127, 127]``, so dequantization is off by at most half a step,
``scale / 2``. A weight costs 8 bits plus ``32 / (entries per channel)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant.array import QuantizedArray
from lora_jax.quant.errors import QuantError

_TINY = np.finfo(np.float32).tiny  # an all-zero channel divides by this


@dataclasses.dataclass(frozen=True)
class Int8:
    """The int8 format: one scale per index of ``channel_axes``, the absmax over the other axes.

    Give the output axes of the kernel (and a leading stack axis, which then gets a scale per layer):
    ``(-1,)`` for a Dense ``[in, out]``, ``(1, 2)`` for a ``[D, heads, Dh]`` projection, ``(0, 2)`` for a
    scanned ``[layers, in, out]``.
    """

    channel_axes: tuple[int, ...] = (-1,)
    name: ClassVar[str] = "int8"

    def __post_init__(self) -> None:
        axes = self.channel_axes
        if not (isinstance(axes, tuple) and all(isinstance(a, int) for a in axes)):
            raise QuantError(f"Int8(channel_axes={axes!r}): give a tuple of axis indices such as (-1,)")

    def axes(self, ndim: int) -> tuple[int, ...]:
        """Return the channel axes for an array of ``ndim`` axes, non-negative.

        Raises:
          QuantError: an axis out of range or repeated.
        """
        if not all(-ndim <= a < ndim for a in self.channel_axes):
            raise QuantError(f"Int8(channel_axes={self.channel_axes}): out of range for a {ndim}-dim kernel")
        axes = tuple(a % ndim for a in self.channel_axes)
        if len(set(axes)) != len(axes):
            raise QuantError(f"Int8(channel_axes={self.channel_axes}): an axis is repeated")
        return axes

    def quantize(self, x: jax.Array, dtype: Any = None) -> Int8Array:
        """Return ``x`` in int8; ``dtype`` is the dtype it dequantizes to (default ``x``'s). Jittable."""
        x = jnp.asarray(x)
        channels = self.axes(x.ndim)
        reduced = tuple(a for a in range(x.ndim) if a not in channels)
        values = x.astype(jnp.float32)
        scales = jnp.max(jnp.abs(values), axis=reduced, keepdims=True) / 127.0
        codes = jnp.clip(jnp.round(values / jnp.maximum(scales, _TINY)), -127, 127).astype(jnp.int8)
        logical = np.dtype(x.dtype if dtype is None else dtype)
        return Int8Array(codes, scales, tuple(x.shape), logical, self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Array(QuantizedArray):
    """A kernel in int8 with a float32 scale per channel; see :mod:`lora_jax.quant.int8`.

    Attributes:
      codes: ``int8 [*shape]``.
      scales: ``float32``, ``shape`` with 1 on each non-channel axis.
      shape, dtype: the array this stands for.
      fmt: its :class:`Int8` format.
    """

    codes: jax.Array
    scales: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    fmt: Int8 = dataclasses.field(default=Int8(), metadata=dict(static=True))

    def layers(self) -> Int8Array | None:
        if len(self.shape) < 2:
            return None
        # A scale shared by the layers (axis 0 not a channel axis) is repeated for each.
        scales = jnp.broadcast_to(self.scales, (self.shape[0], *self.scales.shape[1:]))
        return Int8Array(self.codes, scales, self.shape[1:], self.dtype, self.fmt)

    def dequantize(self, dtype: Any = None, anchor: jax.Array | None = None) -> jax.Array:
        scales = self.scales if anchor is None else self.scales + anchor
        values = self.codes.astype(jnp.float32) * scales
        return values.astype(self.dtype if dtype is None else dtype)
