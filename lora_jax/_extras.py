"""Optional dependencies: ``pip install lora_jax`` brings jax, numpy and optax; the rest come with extras."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or fail saying which extra of lora_jax installs it.

    Args:
      module: the dotted module name, e.g. ``"orbax.checkpoint"``.
      extra: the ``pyproject.toml`` extra that provides it, e.g. ``"train"``.

    Returns:
      The imported module.

    Raises:
      ImportError: ``module`` cannot be imported; the message names ``pip install "lora_jax[extra]"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f'{module} is not installed ({err}); it comes with the {extra!r} extra: pip install "lora_jax[{extra}]"'
        ) from err
