"""GPT-2: the causal LM and its registry entry."""

from __future__ import annotations

from lora_jax.models.common.layers import ATTENTION_LINEARS, FUSED_QKV_LINEAR
from lora_jax.models.gpt2.config import GPT2Config
from lora_jax.models.gpt2.convert import key_map
from lora_jax.models.gpt2.modeling import GPT2LMHeadModel
from lora_jax.models.registry import Architecture, Build, KVCache, Linear

GPT2 = Architecture(
    model_type="gpt2",
    config=GPT2Config,
    # GPT2Model's weights are the LM's: the head is tied to the token embedding.
    builds=(
        Build("GPT2LMHeadModel", GPT2LMHeadModel, options=("fused_qkv",)),
        Build("GPT2Model", GPT2LMHeadModel, options=("fused_qkv",)),
    ),
    key_map=key_map,
    stack="decoder",
    linears=(
        *ATTENTION_LINEARS,
        FUSED_QKV_LINEAR,
        Linear("fc", "mlp/fc", parallel="column"),
        Linear("proj", "mlp/proj", parallel="row"),
    ),
    prefix="transformer.",
    ignored=(r"h\.\d+\.attn\.(bias|masked_bias)",),
    cache=KVCache(layers="n_layer", kv_heads="n_head", head_dim="head_dim", max_positions="n_positions"),
)

__all__ = ["GPT2", "GPT2Config", "GPT2LMHeadModel"]
