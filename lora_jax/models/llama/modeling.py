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

from lora_jax.models.common.decoder import CausalLM, DecoderBlock
from lora_jax.models.common.layers import Attention, Dtype, RMSNorm
from lora_jax.models.llama.config import LlamaConfig


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


class LlamaBlock(DecoderBlock):
    """RMSNorm, grouped-query attention with rotary positions, SwiGLU; no dropout."""

    config: LlamaConfig

    @staticmethod
    def norm(config: LlamaConfig, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
        return RMSNorm(config.rms_norm_eps, dtype, param_dtype, name=name)

    def attention(self) -> nn.Module:
        cfg = self.config
        return Attention(
            cfg.num_attention_heads,
            cfg.kv_heads,
            cfg.head_dim,
            use_bias=cfg.attention_bias,
            rope_theta=cfg.rope_theta,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )

    def mlp(self) -> nn.Module:
        return LlamaMLP(self.config, self.dtype, self.param_dtype, name="mlp")


class LlamaForCausalLM(CausalLM):
    """Llama with its LM head (tied when ``tie_word_embeddings``); arguments and output as :meth:`CausalLM.__call__`."""

    config: LlamaConfig
    block = LlamaBlock

    def embed(self, input_ids: jax.Array, positions: jax.Array, deterministic: bool) -> tuple[jax.Array, nn.Embed]:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, **kw, name="token_embeddings")
        return tokens(input_ids), tokens

    def head(self, x: jax.Array, tokens: nn.Embed) -> jax.Array:
        cfg = self.config
        if cfg.tie_word_embeddings:
            return tokens.attend(x)
        init = nn.initializers.normal(cfg.initializer_range)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        return nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=init, **kw, name="lm_head")(x)

    def head_kernel(self, params: Any) -> jax.Array:
        if self.config.tie_word_embeddings:
            return params["token_embeddings"]["embedding"].T  # [V, D] -> [D, V]
        return params["lm_head"]["kernel"]
