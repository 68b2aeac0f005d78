"""GPT-2: learned positions, pre-LayerNorm blocks, LM head tied to the token embedding.

Param paths (unrolled; ``scan_layers=True`` gives ``decoder/layers/...`` with a
leading layer axis)::

    token_embeddings/embedding                        [V, D]
    position_embeddings/embedding                     [P, D]
    decoder/layer_{i}/attention_norm/{scale,bias}     [D]
    decoder/layer_{i}/attention/{query,key,value}/kernel  [D, H, Dh]
    decoder/layer_{i}/attention/qkv/kernel            [D, 3, H, Dh]   (config.fused_qkv: c_attn as it is)
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

from lora_jax.models.common.decoder import CausalLM, DecoderBlock
from lora_jax.models.common.layers import Attention, Dtype, activation, layer_norm
from lora_jax.models.gpt2.config import GPT2Config


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.Dense(self.config.intermediate_size, **kw, name="fc")(x)
        return nn.Dense(self.config.n_embd, **kw, name="proj")(activation(self.config.activation_function)(h))


class GPT2Block(DecoderBlock):
    """LayerNorm, multi-head attention with biases, a two-layer MLP, residual dropout."""

    config: GPT2Config

    @staticmethod
    def norm(config: GPT2Config, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
        return layer_norm(config.layer_norm_epsilon, dtype, param_dtype, name)

    def attention(self) -> nn.Module:
        cfg = self.config
        return Attention(
            cfg.n_head,
            cfg.n_head,
            cfg.head_dim,
            dropout_rate=cfg.attn_pdrop,
            deterministic=self.deterministic,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            fused_qkv=cfg.fused_qkv,
            name="attention",
        )

    def mlp(self) -> nn.Module:
        return GPT2MLP(self.config, self.dtype, self.param_dtype, name="mlp")

    def residual_dropout(self) -> float:
        return self.config.resid_pdrop


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its tied LM head; arguments and output as :meth:`CausalLM.__call__`."""

    config: GPT2Config
    block = GPT2Block

    def embed(self, input_ids: jax.Array, positions: jax.Array, deterministic: bool) -> tuple[jax.Array, nn.Embed]:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = nn.initializers.normal(cfg.initializer_range)
        tokens = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, **kw, name="token_embeddings")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, **kw, name="position_embeddings")
        x = tokens(input_ids) + wpe(positions)
        return nn.Dropout(cfg.embd_pdrop)(x, deterministic=deterministic), tokens

    def head(self, x: jax.Array, tokens: nn.Embed) -> jax.Array:
        return tokens.attend(x)

    def head_kernel(self, params: Any) -> jax.Array:
        return params["token_embeddings"]["embedding"].T  # tied: [V, D] -> [D, V]
