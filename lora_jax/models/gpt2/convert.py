"""GPT-2 checkpoint names -> param paths."""

from __future__ import annotations

from typing import Any

from lora_jax.models.common.convert import KeyMap, Tensor, embed_keys, linear_keys, norm_keys, prefixed
from lora_jax.paths import PathTuple, unrolled_key

PREFIX = "transformer."


def decoder_keys(n_layer: int, fused_qkv: bool = False) -> KeyMap:
    """Return the names in a ``GPT2Model`` checkpoint (no ``transformer.`` prefix).

    Args:
      n_layer: the number of blocks.
      fused_qkv: ``c_attn`` fills one ``attention/qkv`` kernel ``[D, 3, H, Dh]`` as it is, instead of
        being split into ``attention/query``, ``key`` and ``value``.
    """
    keys: KeyMap = {}
    keys |= embed_keys("wte", ("token_embeddings",))
    keys |= embed_keys("wpe", ("position_embeddings",))
    for i in range(n_layer):
        hf, fx = f"h.{i}", ("decoder", unrolled_key(i))
        keys |= norm_keys(f"{hf}.ln_1", (*fx, "attention_norm"))
        attn = (*fx, "attention")
        # c_attn fuses query, key and value along its output axis.
        if fused_qkv:
            keys |= linear_keys(f"{hf}.attn.c_attn", (*attn, "qkv"), 1, transpose=False)
        else:
            keys |= split_qkv(hf, attn)
        keys |= linear_keys(f"{hf}.attn.c_proj", (*attn, "out"), 2, transpose=False)
        keys |= norm_keys(f"{hf}.ln_2", (*fx, "mlp_norm"))
        keys |= linear_keys(f"{hf}.mlp.c_fc", (*fx, "mlp", "fc"), 1, transpose=False)
        keys |= linear_keys(f"{hf}.mlp.c_proj", (*fx, "mlp", "proj"), 1, transpose=False)
    keys |= norm_keys("ln_f", ("final_norm",))
    return keys


def split_qkv(hf: str, attn: PathTuple) -> KeyMap:
    """Return ``c_attn``'s entries of block ``hf`` split into ``attn``'s query, key and value (thirds of its output)."""
    projections = ("query", "key", "value")
    return {
        f"{hf}.attn.c_attn.weight": tuple(
            Tensor((*attn, proj, "kernel"), in_ndim=1, part=(j, 3)) for j, proj in enumerate(projections)
        ),
        f"{hf}.attn.c_attn.bias": tuple(
            Tensor((*attn, proj, "bias"), in_ndim=0, part=(j, 3)) for j, proj in enumerate(projections)
        ),
    }


def key_map(model: Any) -> KeyMap:
    """Return the names in a ``GPT2LMHeadModel`` checkpoint; its ``lm_head`` is the tied token embedding."""
    config = model.config
    return prefixed(decoder_keys(config.n_layer, config.fused_qkv), PREFIX) | {"lm_head.weight": ()}
