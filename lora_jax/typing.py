"""Type aliases used across lora_jax."""

from __future__ import annotations

import os
from typing import Any, TypeAlias

PyTree: TypeAlias = Any
"""A JAX pytree: nested dicts, lists, tuples or registered nodes with arrays (or ``ShapeDtypeStruct``) at the leaves."""

PathLike: TypeAlias = str | os.PathLike[str]
"""A file-system path."""
