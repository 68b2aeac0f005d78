"""The BERT config, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from lora_jax.models.common.config import ConfigError, pick_fields


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT encoder (Hugging Face ``BertModel``)."""

    model_type: ClassVar[str] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2
    classifier_dropout: float | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, values: dict[str, Any]) -> BertConfig:
        """Read a ``config.json`` dict.

        Raises:
          ConfigError: a position embedding type or activation the module does not implement.
        """
        kind = values.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConfigError(f"BERT position_embedding_type {kind!r} is not supported; only 'absolute'")
        act = values.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "relu"):
            raise ConfigError(f"BERT hidden_act {act!r} is not supported; use 'gelu', 'gelu_new' or 'relu'")
        picked = pick_fields(cls, values)
        if "id2label" in values and "num_labels" not in values:
            picked["num_labels"] = len(values["id2label"])
        return cls(**picked)
