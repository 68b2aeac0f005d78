"""Model configurations read from Hugging Face ``config.json`` dictionaries.

Each config is a frozen dataclass, so it can sit in a Flax module and in a
``jax.jit`` static argument. ``from_hf`` keeps the fields the JAX models use
and rejects options they do not implement, rather than silently differing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from lora_jax.errors import LoraError


class ConfigError(LoraError):
    """A ``config.json`` the models cannot honour: unknown architecture or unsupported option."""


def _pick(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None}


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
        kind = values.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConfigError(f"BERT position_embedding_type {kind!r} is not supported; only 'absolute'")
        act = values.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "relu"):
            raise ConfigError(f"BERT hidden_act {act!r} is not supported; use 'gelu', 'gelu_new' or 'relu'")
        picked = _pick(cls, values)
        if "id2label" in values and "num_labels" not in values:
            picked["num_labels"] = len(values["id2label"])
        return cls(**picked)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 decoder (Hugging Face ``GPT2LMHeadModel``)."""

    model_type: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, values: dict[str, Any]) -> GPT2Config:
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if values.get(flag):
                raise ConfigError(f"GPT-2 option {flag}=True is not supported")
        if values.get("scale_attn_weights", True) is not True:
            raise ConfigError("GPT-2 option scale_attn_weights=False is not supported")
        act = values.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu", "relu"):
            raise ConfigError(f"GPT-2 activation_function {act!r} is not supported")
        return cls(**_pick(cls, values))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama decoder (Hugging Face ``LlamaForCausalLM``)."""

    model_type: ClassVar[str] = "llama"
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
        return cls(**_pick(cls, values))


ModelConfig = BertConfig | GPT2Config | LlamaConfig
