"""GPT-2 checkpoint names -> param paths."""

from __future__ import annotations

from typing import Any

from lora_jax.models.common.convert import KeyMap, Tensor, embed_keys, linear_keys, norm_keys, prefixed
from lora_jax.paths import unrolled_key

PREFIX = "transformer."


def decoder_keys(n_layer: int) -> KeyMap:
    """Return the names in a ``GPT2Model`` checkpoint (no ``transformer.`` prefix)."""
    keys: KeyMap = {}
    keys |= embed_keys("wte", ("token_embeddings",))
    keys |= embed_keys("wpe", ("position_embeddings",))
    for i in range(n_layer):
        hf, fx = f"h.{i}", ("decoder", unrolled_key(i))
        keys |= norm_keys(f"{hf}.ln_1", (*fx, "attention_norm"))
        attn = (*fx, "attention")
        # c_attn fuses query, key and value along its output axis.
        keys[f"{hf}.attn.c_attn.weight"] = tuple(
            Tensor((*attn, proj, "kernel"), in_ndim=1, part=(j, 3)) for j, proj in enumerate(("query", "key", "value"))
        )
        keys[f"{hf}.attn.c_attn.bias"] = tuple(
            Tensor((*attn, proj, "bias"), in_ndim=0, part=(j, 3)) for j, proj in enumerate(("query", "key", "value"))
        )
        keys |= linear_keys(f"{hf}.attn.c_proj", (*attn, "out"), 2, transpose=False)
        keys |= norm_keys(f"{hf}.ln_2", (*fx, "mlp_norm"))
        keys |= linear_keys(f"{hf}.mlp.c_fc", (*fx, "mlp", "fc"), 1, transpose=False)
        keys |= linear_keys(f"{hf}.mlp.c_proj", (*fx, "mlp", "proj"), 1, transpose=False)
    keys |= norm_keys("ln_f", ("final_norm",))
    return keys


def key_map(model: Any) -> KeyMap:
    """Return the names in a ``GPT2LMHeadModel`` checkpoint; its ``lm_head`` is the tied token embedding."""
    return prefixed(decoder_keys(model.config.n_layer), PREFIX) | {"lm_head.weight": ()}
