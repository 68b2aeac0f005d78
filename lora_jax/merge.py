"""``merge`` / ``unmerge``: plain trees for serving at the base model's speed."""

from __future__ import annotations

from typing import Any

from lora_jax.combine import add_updates
from lora_jax.spec import LoraSpec


def merge(params: Any, lora: Any, spec: LoraSpec) -> Any:
    """Fold adapters into the base: a plain tree the unmodified ``apply`` accepts.

    The update ``s * A @ B`` is accumulated in float32 and cast once to the
    kernel's dtype, so a bfloat16 base loses only the final rounding. Fully
    trainable leaves take their trained values. Jittable (``spec`` static).

    Args:
      params: the base tree.
      lora: the adapter tree.
      spec: the spec ``lora`` was made with.

    Returns:
      A tree with ``params``' structure, shapes and dtypes.
    """
    return add_updates(params, lora, spec, sign=1.0)


def unmerge(merged: Any, lora: Any, spec: LoraSpec) -> Any:
    """Subtract the adapters from a merged tree: the base again, within rounding.

    In float32 ``unmerge(merge(p, l, s), l, s)`` equals ``p`` to float32
    rounding. Fully trainable leaves keep their trained values: the base
    values they replaced are not recoverable from the merged tree.
    """
    return add_updates(merged, lora, spec, sign=-1.0)
