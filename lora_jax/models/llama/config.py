"""The Llama config, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from lora_jax.models.common.config import ConfigError, pick_fields


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama decoder (Hugging Face ``LlamaForCausalLM``)."""

    model_type: ClassVar[str] = "llama"
    HF_RENAMES: ClassVar[dict[str, str]] = {"head_dim_override": "head_dim"}  # for to_hf
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim_override: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @classmethod
    def from_hf(cls, values: dict[str, Any]) -> LlamaConfig:
        """Read a ``config.json`` dict.

        Raises:
          ConfigError: a rotary scaling or activation the module does not implement.
        """
        values = dict(values)
        # transformers 5 moved rope settings under "rope_parameters".
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"Llama rope type {rope_type!r} is not supported; only the default rotary embedding")
        if "rope_theta" in rope:
            values.setdefault("rope_theta", rope["rope_theta"])
        if values.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"Llama hidden_act {values['hidden_act']!r} is not supported; only 'silu'")
        if values.get("head_dim") is not None:
            values["head_dim_override"] = values["head_dim"]
        for key in ("eos_token_id", "bos_token_id"):
            if isinstance(values.get(key), list):
                values[key] = values[key][0]
        return cls(**pick_fields(cls, values))
