"""Sentence pooling for the BERT classifier: ``[CLS]`` or the mean over real tokens."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from lora_jax.models.common.config import ConfigError
from lora_jax.typing import PathLike

POOLINGS = ("cls", "mean")


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Return the mean of ``hidden [B, T, D]`` over tokens where ``attention_mask [B, T]`` is 1: ``[B, D]``."""
    mask = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def sentence_pooling(path: PathLike) -> str:
    """Return the pooling a sentence-transformers checkpoint was trained with (``1_Pooling/config.json``).

    ``"mean"`` or ``"cls"``; ``"cls"`` for a plain Hugging Face directory.

    Raises:
      ConfigError: the pooling config names a mode the classifier does not have (max, sqrt-length).
    """
    file = Path(path) / "1_Pooling" / "config.json"
    if not file.exists():
        return "cls"
    modes = [key for key, on in json.loads(file.read_text()).items() if key.startswith("pooling_mode_") and on]
    by_mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in by_mode:
        raise ConfigError(f"{file}: pooling modes {modes} are not one of {sorted(by_mode)}")
    return by_mode[modes[0]]
