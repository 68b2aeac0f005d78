"""GPT-2: learned positions, pre-LayerNorm blocks, LM head tied to the token embedding.

Param paths (unrolled; ``scan_layers=True`` gives ``decoder/layers/...`` with a
leading layer axis)::

    token_embeddings/embedding                        [V, D]
    position_embeddings/embedding                     [P, D]
    decoder/layer_{i}/attention_norm/{scale,bias}     [D]
    decoder/layer_{i}/attention/{query,key,value}/kernel  [D, H, Dh]
    decoder/layer_{i}/attention/out/kernel            [H, Dh, D]
    decoder/layer_{i}/mlp_norm/{scale,bias}           [D]
    decoder/layer_{i}/mlp/fc/kernel                   [D, F]
    decoder/layer_{i}/mlp/proj/kernel                 [F, D]
    final_norm/{scale,bias}                           [D]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.config import GPT2Config
from lora_jax.models.decoder import DecoderOutput, positions_and_mask
from lora_jax.models.layers import Attention, BlockStack, Cache, Dtype, activation, layer_norm


class GPT2MLP(nn.Module):
    config: GPT2Config
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.Dense(self.config.intermediate_size, **kw, name="fc")(x)
        h = nn.Dense(self.config.n_embd, **kw, name="proj")(activation(self.config.activation_function)(h))
        return nn.Dropout(self.config.resid_pdrop)(h, deterministic=self.deterministic)


class GPT2Block(nn.Module):
    config: GPT2Config
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, cache: Cache | None, mask: jax.Array, positions: jax.Array, cache_index: Any
    ) -> tuple[jax.Array, Cache | None]:
        """``x [B, T, D]``, cache leaves ``[B, S, H, Dh]`` -> ``([B, T, D], cache)``."""
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = layer_norm(cfg.layer_norm_epsilon, **kw, name="attention_norm")(x)
        h, cache = Attention(
            cfg.n_head,
            cfg.n_head,
            cfg.head_dim,
            dropout_rate=cfg.attn_pdrop,
            deterministic=self.deterministic,
            **kw,
            name="attention",
        )(h, mask, positions, cache, cache_index)
        x = x + nn.Dropout(cfg.resid_pdrop)(h, deterministic=self.deterministic)
        h = layer_norm(cfg.layer_norm_epsilon, **kw, name="mlp_norm")(x)
        return x + GPT2MLP(cfg, self.deterministic, **kw, name="mlp")(h), cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its tied LM head; returns :class:`DecoderOutput` with float32 logits."""

    config: GPT2Config
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        deterministic: bool = True,
        position_ids: jax.Array | None = None,
    ) -> DecoderOutput:
        """Next-token logits.

        Args:
          input_ids: ``[B, T]``.
          attention_mask: ``[B, T]`` (or ``[B, S]`` with a cache), 1 for real tokens.
          cache: from :func:`lora_jax.models.init_cache`; the new keys go to
            slots ``cache_index .. cache_index + T - 1``.
          cache_index: position of ``input_ids[:, 0]``.
          deterministic: False turns dropout on (needs a ``"dropout"`` RNG).
          position_ids: ``[B, T]`` positions (default: the cache slots,
            ``cache_index .. cache_index + T - 1``).

        Returns:
          logits ``[B, T, V]`` and the updated cache (None without one).
        """
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = nn.initializers.normal(cfg.initializer_range)
        tokens = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, **kw, name="token_embeddings")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, **kw, name="position_embeddings")
        positions, mask = positions_and_mask(input_ids.shape[1], cache, cache_index, attention_mask, position_ids)
        x = tokens(input_ids) + wpe(positions)
        x = nn.Dropout(cfg.embd_pdrop)(x, deterministic=deterministic)
        decoder = BlockStack(GPT2Block, cfg, cfg.n_layer, self.scan_layers, deterministic, **kw, name="decoder")
        x, cache = decoder(x, mask, positions, cache, cache_index)
        x = layer_norm(cfg.layer_norm_epsilon, **kw, name="final_norm")(x)
        return DecoderOutput(tokens.attend(x).astype(jnp.float32), cache)
