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


# The JSON values each field annotation accepts (annotations are strings under `from __future__ import annotations`).
_ACCEPTS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _fits(value: Any, annotation: str) -> bool:
    kinds = [_ACCEPTS.get(part.strip()) for part in annotation.split("|") if part.strip() != "None"]
    if any(kind is None for kind in kinds):
        return True  # an annotation this check does not know: left to the config class
    if isinstance(value, bool) and all(kind != (bool,) for kind in kinds):
        return False  # JSON true/false is a Python int subclass; it is no size or rate
    return any(isinstance(value, kind) for kind in kinds if kind is not None)


def pick_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Return the entries of ``values`` that name fields of dataclass ``cls``, None values left out.

    Raises:
      ConfigError: a value whose JSON type does not fit its field (a string where a number is
        needed, a number for a flag), naming the field, the value and the type.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    picked = {k: v for k, v in values.items() if k in fields and v is not None}
    for name, value in picked.items():
        annotation = fields[name].type
        if isinstance(annotation, str) and not _fits(value, annotation):
            raise ConfigError(f"field {name!r} is {value!r}, not {annotation}: correct it in config.json")
    return picked
