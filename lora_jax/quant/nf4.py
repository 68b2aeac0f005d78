"""NF4: 4-bit NormalFloat in blocks of 64, with the block scales double-quantized to 8 bits (QLoRA).

QLoRA (Dettmers et al. 2023) stores each block of 64 weights as 4-bit indices into 16 levels, the
quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (:data:`NF4_LEVELS`), times the block's
absolute maximum. Double quantization stores those float32 absmax values in 8 bits too: their mean
is subtracted, and each block of 256 of them is scaled by its own absolute maximum and rounded to
bitsandbytes' signed 8-bit dynamic code (:func:`absmax_code`). A weight then costs
``4 + 8/64 + 32/(64*256)`` bits, about 4.13.

The layout follows bitsandbytes' ``quantize_4bit(..., quant_type="nf4", compress_statistics=True)``:
the array is read in row-major order; each value goes to the nearest level (ties to the lower one);
two codes share a byte, the first in the high nibble; a last, partial block is padded with zeros
(which leave its absmax as it is).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant.array import QuantizedArray
from lora_jax.quant.errors import QuantError

NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
"""The 16 NF4 levels (QLoRA, appendix E): 8 positive quantiles of N(0, 1) at probabilities from
``1 - (1/30 + 1/32)/2`` to 1/2, 7 negative ones likewise, and zero, divided by the largest."""

_TINY = np.finfo(np.float32).tiny  # an all-zero block divides by this (a normal number: no flush to zero)


@functools.cache
def absmax_code() -> np.ndarray:
    """Return the 256 sorted values of the signed 8-bit dynamic code that holds the centred block absmax values.

    The code of bitsandbytes' blockwise quantization (Dettmers 2016, "8-bit approximations"): for each
    decade ``10^-6 .. 10^0``, ``2^k`` evenly spaced mantissas in ``[0.1, 1]`` (``k`` = 0 .. 6, more in the
    larger decades), with both signs, plus 0 and 1.
    """
    values = [0.0, 1.0]
    for k in range(7):
        edges = np.linspace(0.1, 1.0, 2**k + 1)
        mantissas = (edges[:-1] + edges[1:]) / 2
        values += [*(10.0 ** (k - 6) * mantissas), *(-(10.0 ** (k - 6)) * mantissas)]
    return np.sort(np.array(values, np.float32))


def _nearest(table: np.ndarray, scaled: jax.Array) -> jax.Array:
    """Return the index of the entry of the sorted ``table`` nearest each value (ties to the lower), as uint8."""
    midpoints = (table[:-1] + table[1:]) / np.float32(2)
    # The number of midpoints below a value is its nearest entry; a value on a midpoint goes down.
    return jnp.sum(scaled[..., None] > midpoints, axis=-1, dtype=jnp.uint8)


def _blockwise(values: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Split ``values [n]`` into zero-padded blocks: return them scaled into [-1, 1] and their absmax.

    Returns:
      ``scaled [blocks, block]`` and ``absmax [blocks]``; an all-zero block scales to zeros.
    """
    blocks = -(-values.shape[0] // block)
    grid = jnp.pad(values, (0, blocks * block - values.shape[0])).reshape(blocks, block)
    absmax = jnp.max(jnp.abs(grid), axis=1)
    scaled = jnp.clip(grid * (1.0 / jnp.maximum(absmax, _TINY))[:, None], -1.0, 1.0)
    return scaled, absmax


@dataclasses.dataclass(frozen=True)
class Nf4:
    """NF4: 4-bit codes in blocks of ``block_size``, their absmax in 8 bits in blocks of ``absmax_block_size``.

    Raises:
      QuantError: a block size that is not a positive even number (two codes share a byte).
    """

    block_size: int = 64
    absmax_block_size: int = 256
    name: ClassVar[str] = "nf4"

    def __post_init__(self) -> None:
        if not (isinstance(self.block_size, int) and self.block_size > 0 and self.block_size % 2 == 0):
            raise QuantError(f"Nf4(block_size={self.block_size!r}): use a positive even block size such as 64")
        if not (isinstance(self.absmax_block_size, int) and self.absmax_block_size > 0):
            raise QuantError(f"Nf4(absmax_block_size={self.absmax_block_size!r}): use a positive size such as 256")

    def quantize(self, x: jax.Array, dtype: Any = None) -> Nf4Array:
        """Return ``x`` in NF4; ``dtype`` is the dtype it dequantizes to (default ``x``'s). Jittable.

        Args:
          x: a floating-point array of any shape, read in row-major order.
          dtype: the logical dtype of the result.
        """
        x = jnp.asarray(x)
        scaled, absmax = _blockwise(jnp.ravel(x).astype(jnp.float32), self.block_size)
        codes = _nearest(NF4_LEVELS, scaled.reshape(-1))
        packed = (codes[0::2] << 4) | codes[1::2]
        offset = jnp.mean(absmax)
        scaled_absmax, absmax_scales = _blockwise(absmax - offset, self.absmax_block_size)
        absmax_codes = _nearest(absmax_code(), scaled_absmax.reshape(-1)[: absmax.shape[0]])
        logical = np.dtype(x.dtype if dtype is None else dtype)
        return Nf4Array(packed, absmax_codes, absmax_scales, offset, tuple(x.shape), logical, self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Nf4Array(QuantizedArray):
    """A kernel in NF4 with double-quantized block scales; see :mod:`lora_jax.quant.nf4`.

    Attributes:
      codes: ``uint8 [blocks * block_size / 2]``, two 4-bit level indices a byte, the first in the high nibble.
      absmax_codes: ``uint8 [blocks]``, each block's absmax minus ``offset``, as indices into :func:`absmax_code`.
      absmax_scales: ``float32 [ceil(blocks / absmax_block_size)]``, the scale of each block of absmax codes.
      offset: ``float32 []``, the mean block absmax.
      shape, dtype: the array this stands for.
      fmt: its :class:`Nf4` format (block sizes).
    """

    codes: jax.Array
    absmax_codes: jax.Array
    absmax_scales: jax.Array
    offset: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    fmt: Nf4 = dataclasses.field(default=Nf4(), metadata=dict(static=True))

    def absmax(self, anchor: jax.Array | None = None) -> jax.Array:
        """Return the block absmax values ``float32 [blocks]`` after double quantization."""
        blocks = self.absmax_codes.shape[0]
        scales = jnp.repeat(self.absmax_scales, self.fmt.absmax_block_size)[:blocks]
        return _table(absmax_code(), anchor)[_anchored(self.absmax_codes, anchor)] * scales + self.offset

    def layers(self) -> Nf4Array | None:
        # A layer must hold whole blocks of codes and whole blocks of absmax codes; the offset is shared.
        n_layers = self.shape[0] if self.shape else 0
        per_layer = self.size // n_layers if n_layers else 0
        blocks = per_layer // self.fmt.block_size
        if not per_layer or per_layer % self.fmt.block_size or blocks % self.fmt.absmax_block_size:
            return None
        return Nf4Array(
            self.codes.reshape(n_layers, per_layer // 2),
            self.absmax_codes.reshape(n_layers, blocks),
            self.absmax_scales.reshape(n_layers, blocks // self.fmt.absmax_block_size),
            jnp.broadcast_to(self.offset, (n_layers,)),
            self.shape[1:],
            self.dtype,
            self.fmt,
        )

    def dequantize(self, dtype: Any = None, anchor: jax.Array | None = None) -> jax.Array:
        packed = _anchored(self.codes, anchor)
        codes = jnp.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1, self.fmt.block_size)
        values = _table(NF4_LEVELS, anchor)[codes] * self.absmax(anchor)[:, None]
        return values.reshape(-1)[: self.size].reshape(self.shape).astype(self.dtype if dtype is None else dtype)


def _table(values: np.ndarray, anchor: jax.Array | None) -> jax.Array:
    """Return the lookup table ``values``, plus ``anchor`` when given (a NaN anchor makes every entry NaN)."""
    return jnp.asarray(values) if anchor is None else jnp.asarray(values) + anchor


def _anchored(codes: jax.Array, anchor: jax.Array | None) -> jax.Array:
    """Return ``codes``, read only once ``anchor`` exists (unchanged unless the anchor is NaN; see ``_table``)."""
    return codes if anchor is None else codes | (anchor != 0).astype(codes.dtype)
