"""The GPT-2 config, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from lora_jax.models.common.config import LAYOUT, ConfigError, pick_fields


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
    fused_qkv: bool = dataclasses.field(default=False, metadata=LAYOUT)
    """Keep ``c_attn``'s query, key and value in one kernel ``attention/qkv/kernel [D, 3, H, Dh]`` (a
    layout option, not a ``config.json`` entry: ``from_pretrained(path, fused_qkv=True)``)."""

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
        """Read a ``config.json`` dict.

        Raises:
          ConfigError: an attention option or activation the module does not implement.
        """
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if values.get(flag):
                raise ConfigError(f"GPT-2 option {flag}=True is not supported")
        if values.get("scale_attn_weights", True) is not True:
            raise ConfigError("GPT-2 option scale_attn_weights=False is not supported")
        act = values.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu", "relu"):
            raise ConfigError(f"GPT-2 activation_function {act!r} is not supported")
        return cls(**pick_fields(cls, values))
