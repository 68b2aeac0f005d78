"""Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.

Param paths (unrolled; ``scan_layers=True`` gives ``decoder/layers/...`` with a
leading layer axis)::

    token_embeddings/embedding                        [V, D]
    decoder/layer_{i}/attention_norm/scale            [D]
    decoder/layer_{i}/attention/query/kernel          [D, H, Dh]
    decoder/layer_{i}/attention/{key,value}/kernel    [D, K, Dh]
    decoder/layer_{i}/attention/out/kernel            [H, Dh, D]
    decoder/layer_{i}/mlp_norm/scale                  [D]
    decoder/layer_{i}/mlp/{gate,up}/kernel            [D, F]
    decoder/layer_{i}/mlp/down/kernel                 [F, D]
    final_norm/scale                                  [D]
    lm_head/kernel                                    [D, V]   (absent when tied)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.config import LlamaConfig
from lora_jax.models.decoder import DecoderOutput, positions_and_mask
from lora_jax.models.layers import Attention, BlockStack, Cache, Dtype, RMSNorm


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """SwiGLU, ``[B, T, D] -> [B, T, D]``."""
        cfg = self.config
        kw = {"use_bias": cfg.mlp_bias, "dtype": self.dtype, "param_dtype": self.param_dtype}
        gate = nn.Dense(cfg.intermediate_size, **kw, name="gate")(x)
        up = nn.Dense(cfg.intermediate_size, **kw, name="up")(x)
        return nn.Dense(cfg.hidden_size, **kw, name="down")(jax.nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    config: LlamaConfig
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, cache: Cache | None, mask: jax.Array, positions: jax.Array, cache_index: Any
    ) -> tuple[jax.Array, Cache | None]:
        """``x [B, T, D]``, cache leaves ``[B, S, K, Dh]`` -> ``([B, T, D], cache)``."""
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = RMSNorm(cfg.rms_norm_eps, **kw, name="attention_norm")(x)
        h, cache = Attention(
            cfg.num_attention_heads,
            cfg.kv_heads,
            cfg.head_dim,
            use_bias=cfg.attention_bias,
            rope_theta=cfg.rope_theta,
            **kw,
            name="attention",
        )(h, mask, positions, cache, cache_index)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, **kw, name="mlp_norm")(x)
        return x + LlamaMLP(cfg, **kw, name="mlp")(h), cache


class LlamaForCausalLM(nn.Module):
    """Llama with its LM head; returns :class:`DecoderOutput` with float32 logits."""

    config: LlamaConfig
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
        """Arguments as :meth:`lora_jax.models.GPT2LMHeadModel.__call__`; logits ``[B, T, V]``."""
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = nn.initializers.normal(cfg.initializer_range)
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, **kw, name="token_embeddings")
        positions, mask = positions_and_mask(input_ids.shape[1], cache, cache_index, attention_mask, position_ids)
        layers = cfg.num_hidden_layers
        decoder = BlockStack(LlamaBlock, cfg, layers, self.scan_layers, deterministic, **kw, name="decoder")
        x, cache = decoder(tokens(input_ids), mask, positions, cache, cache_index)
        x = RMSNorm(cfg.rms_norm_eps, **kw, name="final_norm")(x)
        if cfg.tie_word_embeddings:
            logits = tokens.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=init, **kw, name="lm_head")(x)
        return DecoderOutput(logits.astype(jnp.float32), cache)
