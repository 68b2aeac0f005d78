"""Non-finite numbers: find them by path, and refuse them where a user would otherwise keep them.

A NaN or Inf in an adapter, or a merged kernel that overflows its dtype, is
never what a user meant to save or serve. :func:`merge` and
:func:`~lora_jax.save_adapter` call :func:`check_finite`; outside ``jax.jit``
it raises at once, and inside it (opt in: ``check_finite=True``) it raises
when the computation runs, through ``jax.debug.callback``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from lora_jax.errors import NonFiniteError
from lora_jax.paths import flatten, path_str
from lora_jax.typing import PyTree


def _floating(leaf: jax.Array) -> bool:
    return bool(jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact))


def is_traced(tree: PyTree) -> bool:
    """Return whether any leaf of ``tree`` is a tracer (the caller runs under ``jax.jit`` or a transform)."""
    return any(isinstance(leaf, Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def nonfinite_paths(tree: PyTree) -> list[str]:
    """Return the ``/``-joined paths of the floating-point leaves of ``tree`` that hold a NaN or an Inf."""
    return [
        path_str(path)
        for path, leaf in flatten(tree)[0]
        if _floating(leaf) and not bool(jnp.all(jnp.isfinite(jnp.asarray(leaf))))
    ]


def _message(paths: list[str], what: str, fix: str) -> str:
    more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
    return f"{what} {paths[0]}{more} holds NaN or Inf: {fix}"


def check_finite(tree: PyTree, what: str, fix: str, *, traced: bool = False) -> None:
    """Raise :class:`~lora_jax.errors.NonFiniteError` naming the first leaf of ``tree`` that holds NaN or Inf.

    Args:
      tree: any pytree; integer leaves are skipped.
      what: how the message names a leaf, e.g. ``"adapter leaf"``.
      fix: what the message tells the user to do.
      traced: ``tree`` holds tracers: check when the computation runs
        (``jax.debug.callback``) instead of now.
    """
    if not traced:
        paths = nonfinite_paths(tree)
        if paths:
            raise NonFiniteError(_message(paths, what, fix))
        return
    flat = [(path_str(path), leaf) for path, leaf in flatten(tree)[0] if _floating(leaf)]
    if not flat:
        return
    names = [name for name, _ in flat]
    flags = jnp.stack([jnp.all(jnp.isfinite(leaf)) for _, leaf in flat])

    def raise_on_host(finite: np.ndarray) -> None:
        bad = [name for name, ok in zip(names, np.asarray(finite)) if not ok]
        if bad:
            raise NonFiniteError(_message(bad, what, fix))

    jax.debug.callback(raise_on_host, flags)
