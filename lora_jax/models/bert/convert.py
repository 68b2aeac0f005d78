"""BERT checkpoint names -> param paths."""

from __future__ import annotations

from typing import Any

from lora_jax.models.bert.config import BertConfig
from lora_jax.models.bert.modeling import BertForSequenceClassification
from lora_jax.models.common.convert import KeyMap, embed_keys, linear_keys, norm_keys, prefixed
from lora_jax.paths import unrolled_key

PREFIX = "bert."


def encoder_keys(config: BertConfig, pooler: bool = True) -> KeyMap:
    """Return the names in a ``BertModel`` checkpoint; without a pooler its tensors are known and unused."""
    keys: KeyMap = {}
    for kind in ("word", "position", "token_type"):
        keys |= embed_keys(f"embeddings.{kind}_embeddings", ("embeddings", f"{kind}_embeddings"))
    keys |= norm_keys("embeddings.LayerNorm", ("embeddings", "layer_norm"))
    for i in range(config.num_hidden_layers):
        hf, fx = f"encoder.layer.{i}", ("encoder", unrolled_key(i))
        for proj in ("query", "key", "value"):
            keys |= linear_keys(f"{hf}.attention.self.{proj}", (*fx, "attention", proj), 1)
        keys |= linear_keys(f"{hf}.attention.output.dense", (*fx, "attention", "out"), 2)
        keys |= norm_keys(f"{hf}.attention.output.LayerNorm", (*fx, "attention_norm"))
        keys |= linear_keys(f"{hf}.intermediate.dense", (*fx, "mlp", "intermediate"), 1)
        keys |= linear_keys(f"{hf}.output.dense", (*fx, "mlp", "output"), 1)
        keys |= norm_keys(f"{hf}.output.LayerNorm", (*fx, "mlp_norm"))
    pooler_keys = linear_keys("pooler.dense", ("pooler",), 1)
    return keys | (pooler_keys if pooler else dict.fromkeys(pooler_keys, ()))


def classifier_keys(config: BertConfig, pooler: bool = True) -> KeyMap:
    """Return the names in a ``BertForSequenceClassification`` checkpoint: the encoder under ``bert.``, the head."""
    return prefixed(encoder_keys(config, pooler), PREFIX, ("bert",)) | linear_keys("classifier", ("classifier",), 1)


def key_map(model: Any) -> KeyMap:
    """Return the key map of a ``BertModel`` or ``BertForSequenceClassification``."""
    if isinstance(model, BertForSequenceClassification):
        return classifier_keys(model.config, pooler=model.pooling == "cls")
    return encoder_keys(model.config, pooler=model.add_pooler)
