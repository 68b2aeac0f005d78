"""Building blocks shared by the model families: activations, norms, rotary positions, attention, KV cache.

Shapes: ``B`` batch, ``T`` query length, ``S`` key length, ``D`` model width,
``H`` query heads, ``K`` key/value heads, ``Dh`` head width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.registry import Linear

Dtype = Any
Cache = dict[str, jax.Array]


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Return the Hugging Face activation called ``name`` (``gelu`` is the exact erf form)."""
    table: dict[str, Callable[[jax.Array], jax.Array]] = {
        # PyTorch's formula; XLA:CPU runs it (and its gradient) about 4x faster than jax.nn.gelu's erfc form.
        "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype))),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
    }
    return table[name]


class LayerNorm(nn.Module):
    """LayerNorm with the two-pass variance PyTorch uses: statistics in float32, ``scale [D]``, ``bias [D]``."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., D] -> [..., D]``."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(centered * centered, axis=-1, keepdims=True)
        # The per-token factor multiplies first and the scale after: nn.LayerNorm forms their [..., D]
        # product, which XLA:CPU materializes as a broadcast (about 1% of a MiniLM training step).
        normed = centered * jax.lax.rsqrt(variance + self.eps) * scale.astype(jnp.float32)
        return (normed + bias.astype(jnp.float32)).astype(self.dtype)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> LayerNorm:
    """Build a :class:`LayerNorm` (params ``scale [D]``, ``bias [D]``)."""
    return LayerNorm(eps, dtype=dtype, param_dtype=param_dtype, name=name)


class RMSNorm(nn.Module):
    """Root-mean-square norm as in Llama: statistics in float32, ``scale [D]``."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., D] -> [..., D]``."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Llama casts back to the input dtype before the scale multiplies.
        return (scale.astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Apply the rotary position embedding, half-split ("rotate_half") convention.

    Args:
      x: ``[B, T, heads, Dh]``.
      positions: ``[B, T]`` or ``[T]`` integer positions.
      theta: the base of the frequencies.

    Returns:
      ``[B, T, heads, Dh]`` in ``x``'s dtype.
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B?, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = dim // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Return softmax attention probabilities with grouped key/value heads.

    Args:
      q: ``[B, T, H, Dh]``.
      k: ``[B, S, K, Dh]`` with ``H`` a multiple of ``K``; query head ``h`` reads key head ``h // (H/K)``.
      mask: boolean, broadcastable to ``[B, 1, T, S]``; True keeps a key.

    Returns:
      ``[B, H, T, S]`` float32 probabilities.
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    # The scale goes on q ([.., Dh]) rather than the scores ([.., S]); the mask is added as a bias, which
    # fuses into the softmax and has no gradient to select.
    q = q * np.float32(1.0 / np.sqrt(dim)).astype(q.dtype)
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    if kv_heads == heads:
        # Four-axis einsums with no group axis: a unit group axis costs XLA:CPU layout copies around every
        # batched matmul (about 5 ms a layer, forward and backward, on MiniLM at batch 32 x 64).
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    else:
        q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(batch, heads, length, k.shape[1])
    scores = scores + bias
    # softmax written out: its max is a constant under differentiation, as in jax.nn.softmax, and XLA:CPU
    # fuses this form better.
    scores = scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores)
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def attend(probs: jax.Array, v: jax.Array) -> jax.Array:
    """Return ``probs [B, H, T, S]`` applied to ``v [B, S, K, Dh]``: ``[B, T, H, Dh]``."""
    batch, heads, length, source = probs.shape
    kv_heads = v.shape[2]
    if kv_heads == heads:
        return jnp.einsum("bhts,bshd->bthd", probs, v)
    probs = probs.reshape(batch, kv_heads, heads // kv_heads, length, source)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, length, heads, v.shape[-1])


class Attention(nn.Module):
    """Multi-head attention with optional rotary positions, grouped KV heads and a KV cache.

    Params: ``query/kernel [D, H, Dh]``, ``key/kernel`` and ``value/kernel``
    ``[D, K, Dh]``, ``out/kernel [H, Dh, D]`` (biases ``[H, Dh]``/``[D]`` when
    ``use_bias``). With ``fused_qkv`` (``K = H``), one ``qkv/kernel [D, 3, H, Dh]``
    (bias ``[3, H, Dh]``) in place of the three: GPT-2's ``c_attn`` as the checkpoint holds it.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool = True
    rope_theta: float | None = None
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fused_qkv: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, Cache | None]:
        """Attend from ``x`` to itself, or to the cache after writing ``x``'s keys into it.

        Args:
          x: ``[B, T, D]``.
          mask: boolean ``[B, 1, T, S]``; ``S = T`` without a cache, else the cache length.
          positions: ``[B, T]`` or ``[T]``, needed for rotary embeddings.
          cache: ``{"key", "value"}`` each ``[B, S, K, Dh]``, or None.
          cache_index: where ``x``'s first token goes in the cache.

        Returns:
          ``([B, T, D], updated cache or None)``.
        """
        features = x.shape[-1]

        def proj(heads: int | tuple[int, int], name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                (*(heads if isinstance(heads, tuple) else (heads,)), self.head_dim),
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        if self.fused_qkv:
            assert self.num_kv_heads == self.num_heads, "fused_qkv needs as many key/value heads as query heads"
            q, k, v = jnp.unstack(proj((3, self.num_heads), "qkv")(x), axis=2)  # [B, T, 3, H, Dh]
        else:
            q = proj(self.num_heads, "query")(x)
            k = proj(self.num_kv_heads, "key")(x)
            v = proj(self.num_kv_heads, "value")(x)
        if self.rope_theta is not None:
            assert positions is not None, "rotary embeddings need positions"
            q = rotary(q, positions, self.rope_theta)
            k = rotary(k, positions, self.rope_theta)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), start)
            cache = {"key": k, "value": v}
        probs = attention_weights(q, k.astype(q.dtype), mask)
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=self.deterministic)
        out = attend(probs.astype(self.dtype), v.astype(self.dtype))
        out = nn.DenseGeneral(
            features,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)
        return out, cache


ATTENTION_LINEARS = (
    Linear("q", "attention/query", in_axes=1, out_axes=2, parallel="column"),
    Linear("k", "attention/key", in_axes=1, out_axes=2, parallel="column"),
    Linear("v", "attention/value", in_axes=1, out_axes=2, parallel="column"),
    Linear("o", "attention/out", in_axes=2, out_axes=1, parallel="row"),
)
"""The linear maps of an :class:`Attention` named ``attention`` in a block (presets ``q k v o``)."""

FUSED_QKV_LINEAR = Linear(
    "qkv", "attention/qkv", in_axes=1, out_axes=3, parallel="column", slices=("q", "k", "v"), flag="fused_qkv"
)
"""The fused ``qkv`` kernel ``[D, 3, H, Dh]`` of an :class:`Attention` with ``fused_qkv``, in place of q, k and v
when the config's ``fused_qkv`` is set; the presets adapt its slices."""


def causal_mask(query_positions: jax.Array, key_length: int, padding: jax.Array | None = None) -> jax.Array:
    """Return a boolean ``[B|1, 1, T, S]``: key ``s`` visible to query ``t`` iff ``s <= pos[t]`` (and not padding).

    Args:
      query_positions: ``[T]`` absolute positions of the queries.
      key_length: ``S``.
      padding: optional ``[B, S]`` mask, 1 for real tokens.
    """
    mask = jnp.arange(key_length)[None, :] <= query_positions[:, None]
    mask = mask[None, None]
    if padding is not None:
        mask = mask & padding.astype(bool)[:, None, None, :]
    return mask


def init_cache(
    num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype: Dtype = jnp.float32
) -> Cache:
    """Return an empty KV cache: ``{"key", "value"}`` each ``[layers, B, length, K, Dh]``."""
    shape = (num_layers, batch, length, kv_heads, head_dim)
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
