"""Llama checkpoint names -> param paths."""

from __future__ import annotations

from typing import Any

from lora_jax.models.common.convert import KeyMap, embed_keys, linear_keys, norm_keys, prefixed
from lora_jax.models.llama.config import LlamaConfig
from lora_jax.paths import unrolled_key

PREFIX = "model."


def decoder_keys(config: LlamaConfig) -> KeyMap:
    """Return the names in a ``LlamaModel`` checkpoint (no ``model.`` prefix)."""
    keys: KeyMap = {}
    keys |= embed_keys("embed_tokens", ("token_embeddings",))
    for i in range(config.num_hidden_layers):
        hf, fx = f"layers.{i}", ("decoder", unrolled_key(i))
        attn = (*fx, "attention")
        for proj, name in (("q", "query"), ("k", "key"), ("v", "value")):
            keys |= linear_keys(f"{hf}.self_attn.{proj}_proj", (*attn, name), 1, bias=config.attention_bias)
        keys |= linear_keys(f"{hf}.self_attn.o_proj", (*attn, "out"), 2, bias=config.attention_bias)
        for proj in ("gate", "up", "down"):
            keys |= linear_keys(f"{hf}.mlp.{proj}_proj", (*fx, "mlp", proj), 1, bias=config.mlp_bias)
        keys |= norm_keys(f"{hf}.input_layernorm", (*fx, "attention_norm"), bias=False)
        keys |= norm_keys(f"{hf}.post_attention_layernorm", (*fx, "mlp_norm"), bias=False)
    keys |= norm_keys("norm", ("final_norm",), bias=False)
    return keys


def key_map(model: Any) -> KeyMap:
    """Return the names in a ``LlamaForCausalLM`` checkpoint; a tied ``lm_head`` is known and unused."""
    config = model.config
    head = linear_keys("lm_head", ("lm_head",), 1, bias=False)
    return prefixed(decoder_keys(config), PREFIX) | (dict.fromkeys(head, ()) if config.tie_word_embeddings else head)
