"""Llama: the causal LM and its registry entry."""

from __future__ import annotations

from lora_jax.models.common.layers import ATTENTION_LINEARS
from lora_jax.models.llama.config import LlamaConfig
from lora_jax.models.llama.convert import key_map
from lora_jax.models.llama.modeling import LlamaForCausalLM
from lora_jax.models.registry import Architecture, Build, KVCache, Linear

LLAMA = Architecture(
    model_type="llama",
    config=LlamaConfig,
    builds=(Build("LlamaForCausalLM", LlamaForCausalLM),),
    key_map=key_map,
    stack="decoder",
    linears=(
        *ATTENTION_LINEARS,
        Linear("gate", "mlp/gate", parallel="column"),
        Linear("up", "mlp/up", parallel="column"),
        Linear("down", "mlp/down", parallel="row"),
    ),
    prefix="model.",
    ignored=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    # Rotary positions set no hard cap on the cache length.
    cache=KVCache(layers="num_hidden_layers", kv_heads="kv_heads", head_dim="head_dim"),
)

__all__ = ["LLAMA", "LlamaConfig", "LlamaForCausalLM"]
