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

    A field whose ``config.json`` key differs is renamed by the class's ``HF_RENAMES`` (field -> key); a
    layout option of lora_jax's own (:func:`is_layout_field`) is left out.
    """
    renames = getattr(type(config), "HF_RENAMES", {})
    fields = [f for f in dataclasses.fields(config) if not is_layout_field(f)]
    values = {renames.get(f.name, f.name): getattr(config, f.name) for f in fields}
    return {"model_type": type(config).model_type, **values}


LAYOUT = {"hf": False}
"""The metadata of a config field that is lora_jax's layout option (GPT-2's ``fused_qkv``), not a
``config.json`` entry: ``dataclasses.field(default=False, metadata=LAYOUT)``. Set it as a build option."""


def is_layout_field(field: dataclasses.Field) -> bool:
    """Return whether a config field is a layout option (:data:`LAYOUT`), kept out of ``config.json``."""
    return field.metadata.get("hf", True) is False


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
    fields = {f.name: f for f in dataclasses.fields(cls) if not is_layout_field(f)}
    picked = {k: v for k, v in values.items() if k in fields and v is not None}
    for name, value in picked.items():
        annotation = fields[name].type
        if isinstance(annotation, str) and not _fits(value, annotation):
            raise ConfigError(f"field {name!r} is {value!r}, not {annotation}: correct it in config.json")
    return picked
