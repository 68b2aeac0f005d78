"""What the family configs share: their error type and the reading of a ``config.json`` dict.

Each family's config is a frozen dataclass (so it can sit in a Flax module and in a ``jax.jit``
static argument) with a ``from_hf(values)`` classmethod that keeps the fields the JAX modules use
and rejects options they do not implement, rather than silently differing; :func:`to_hf` writes
the fields back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_jax.errors import LoraError


class ConfigError(LoraError):
    """A ``config.json`` the models cannot honour: unknown architecture or unsupported option."""


def to_hf(config: Any) -> dict[str, Any]:
    """Return a family config as ``config.json`` entries: its ``model_type`` and fields, the inverse of ``from_hf``.

    A field whose ``config.json`` key differs is renamed by the class's ``HF_RENAMES`` (field -> key).
    """
    renames = getattr(type(config), "HF_RENAMES", {})
    values = {renames.get(f.name, f.name): getattr(config, f.name) for f in dataclasses.fields(config)}
    return {"model_type": type(config).model_type, **values}


def pick_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Return the entries of ``values`` that name fields of dataclass ``cls``, None values left out."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None}
