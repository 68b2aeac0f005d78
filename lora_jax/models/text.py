"""Tokenizers from ``tokenizer.json`` and sentence embeddings."""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from lora_jax.errors import LoraError
from lora_jax.models.bert import mean_pool


def load_tokenizer(path: str | Path, max_length: int | None = None) -> Tokenizer:
    """``tokenizer.json`` from a model directory, padding to the longest and truncating to ``max_length``."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises its own bare Exception
        raise LoraError(f"{file}: not a tokenizer the tokenizers library reads ({err}); use the model's own") from None
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=pad_id or 0, pad_token="[PAD]" if pad_id is not None else "<pad>")
    if max_length is not None:
        tokenizer.enable_truncation(max_length)
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """A padded batch: ``input_ids``, ``attention_mask``, ``token_type_ids``, each int32 ``[B, T]``."""
    batch = tokenizer.encode_batch(list(texts))
    return {
        "input_ids": np.array([e.ids for e in batch], np.int32),
        "attention_mask": np.array([e.attention_mask for e in batch], np.int32),
        "token_type_ids": np.array([e.type_ids for e in batch], np.int32),
    }


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x [..., D]`` scaled to unit length along the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnums=0)
def sentence_embeddings(
    model: nn.Module,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
) -> jax.Array:
    """Sentence-transformers embeddings: mean-pooled last hidden states, L2-normalised.

    Args:
      model: a :class:`lora_jax.models.BertModel`.
      params: its params (or ``lora_jax.combine(...)`` of them).
      input_ids, attention_mask, token_type_ids: ``[B, T]``.

    Returns:
      ``[B, D]`` float32 unit vectors.
    """
    out = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    hidden = out.hidden_states  # pyright: ignore[reportAttributeAccessIssue]  (apply returns the module's output)
    return l2_normalize(mean_pool(hidden, attention_mask))


def embed_texts(model: nn.Module, params: dict, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Tokenize ``texts`` and return their sentence embeddings ``[len(texts), D]``."""
    batch = encode(tokenizer, texts)
    out = sentence_embeddings(model, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return np.asarray(out)
