"""BERT: the encoder, its sequence classifier, and their registry entry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lora_jax.models.bert.config import BertConfig
from lora_jax.models.bert.convert import key_map
from lora_jax.models.bert.modeling import BertForSequenceClassification, BertModel, BertOutput, classifier_apply_fn
from lora_jax.models.bert.pooling import POOLINGS, mean_pool, sentence_pooling
from lora_jax.models.common.layers import ATTENTION_LINEARS
from lora_jax.models.registry import Architecture, Build, Linear


def _pooler(names: Sequence[str]) -> dict[str, Any]:
    """An encoder checkpoint without pooler tensors builds an encoder without a pooler."""
    return {"add_pooler": any(name.endswith("pooler.dense.weight") for name in names)}


BERT = Architecture(
    model_type="bert",
    config=BertConfig,
    builds=(
        Build("BertModel", BertModel, options=("add_pooler",), detect=_pooler),
        Build("BertForSequenceClassification", BertForSequenceClassification, options=("num_labels", "pooling")),
    ),
    key_map=key_map,
    stack="encoder",
    linears=(
        *ATTENTION_LINEARS,
        Linear("intermediate", "mlp/intermediate", parallel="column"),
        Linear("output", "mlp/output", parallel="row"),
    ),
    prefix="bert.",
    ignored=(r"embeddings\.position_ids", r"cls\..*"),
    head="classifier",
)

__all__ = [
    "BERT",
    "POOLINGS",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "BertOutput",
    "classifier_apply_fn",
    "mean_pool",
    "sentence_pooling",
]
