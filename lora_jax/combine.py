"""``combine``: the materialized application ``W = W0 + s * A @ B``, for any model.

``combine`` returns a tree with the base's structure and dtypes, so any
function of a param tree (a linen ``apply``, ``nnx.merge``, a plain function)
runs on it unchanged. Its cost: a kernel-sized temporary per adapted leaf and,
under ``jax.grad``, a kernel-sized gradient that is then projected onto A and B.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax

from lora_jax.adapters import bind
from lora_jax.errors import LoraError
from lora_jax.paths import flatten
from lora_jax.quant.array import as_array
from lora_jax.spec import LoraSpec
from lora_jax.variants import variant_of


def add_updates(params: Any, lora: Any, spec: LoraSpec, sign: float) -> Any:
    """Return ``W0 + sign * s * A @ B`` for each adapted kernel, accumulated in float32.

    Fully trainable leaves take their value from ``lora`` when ``sign > 0`` and
    are left as they are otherwise. Every leaf keeps the base's dtype; quantized
    leaves come back dequantized, in their logical dtype.
    """
    pairs = bind(params, lora, spec)
    flat, treedef = flatten(params)
    leaves = [as_array(leaf) for _, leaf in flat]
    index = {path: i for i, (path, _) in enumerate(flat)}
    for target, value in pairs:
        i = index[target.path]
        leaves[i] = variant_of(target).apply(target, leaves[i], value, sign)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def combine(params: Any, lora: Any, spec: LoraSpec, *, dropout_rng: jax.Array | None = None) -> Any:
    """Return the base params with each adapted kernel replaced by ``W0 + s * A @ B``.

    Use it inside the jitted loss and differentiate with respect to ``lora``;
    the base, closed over, gets no gradient.

    Args:
      params: the frozen base tree; kernels of any shape per the spec's layouts.
      lora: the adapter tree from :func:`lora_jax.init` (A ``[*stack, *in, r]``,
        B ``[*stack, r, *out]``), plus fully trainable leaves.
      spec: the spec ``lora`` was made with.
      dropout_rng: must be ``None``. LoRA dropout acts on the adapter's input
        activations, which a materialized weight cannot express.

    Returns:
      A tree with ``params``' structure, shapes and dtypes.
    """
    if dropout_rng is not None and spec.has_dropout:
        raise LoraError(
            "combine materializes W0 + s*A@B and cannot apply LoRA dropout to the adapter input; "
            "use the factored path (lora_jax.factored) for dropout, or call combine without dropout_rng"
        )
    if spec.has_dropout:
        warnings.warn(
            "the spec sets LoRA dropout, which combine cannot apply (it materializes W0 + s*A@B); "
            "train with the factored path (lora_jax.factored, or training.train_step(factored=True)) to use it",
            stacklevel=2,
        )
    return add_updates(params, lora, spec, sign=1.0)
