"""The train step: one optimizer update of the adapters, the one step that ``jit``, ``shard_map`` and ``pmap`` wrap.

``loss_fn(params, batch, rng) -> scalar`` is a function of a plain param tree,
the mean loss over the batch it is given; ``rng`` is a key for the model's own
dropout, or ``None`` for none. The step runs it on base plus adapters, by the
factored path (``x W0 + s dropout(x) A B``, with LoRA dropout when it gets a
key) or through ``combine`` (``W0 + s A @ B`` materialized), differentiates
with respect to the adapters only, and applies the optimizer:

    step = train_step(loss_fn, spec, optax.adamw(1e-3))
    lora, opt_state, loss = step(params, lora, opt_state, batch, rng)   # rng may be None

Under data parallelism (``axis_name``) each device sees an equal slice of the
batch, so the mean of the per-device gradients (``jax.lax.pmean``) is the
gradient of the full batch and every device applies the same update. The
wrappers in :mod:`lora_jax.distributed` run this same step under ``jax.jit``
with shardings, ``jax.shard_map`` and ``jax.pmap``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax

from lora_jax.combine import combine
from lora_jax.factored import factored as factored_apply
from lora_jax.prng import unrolled
from lora_jax.quant.array import check_recompute, is_quantized, keep_codes
from lora_jax.spec import LoraSpec
from lora_jax.typing import PyTree

LossFn = Callable[[PyTree, PyTree, jax.Array | None], jax.Array]
"""``(params, batch, rng | None) -> scalar``: the mean loss of a plain param tree on a batch."""
AxisName = str | tuple[str, ...]


def _to_varying(tree: PyTree, axis: AxisName) -> PyTree:
    # Inside shard_map, the gradient of a value that is the same on every device
    # comes back already summed over the axis; marking it per-device keeps the
    # gradient local, so pmean below gives the mean as in pmap.
    if hasattr(jax.lax, "pcast"):
        return jax.tree_util.tree_map(lambda x: jax.lax.pcast(x, axis, to="varying"), tree)
    pvary = getattr(jax.lax, "pvary")  # noqa: B009 - the name before pcast, in older JAX
    return jax.tree_util.tree_map(lambda x: pvary(x, axis), tree)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """``(params, lora, opt_state, batch, rng) -> (lora, opt_state, loss)``; build it with :func:`train_step`."""

    loss_fn: LossFn
    spec: LoraSpec
    tx: optax.GradientTransformation
    factored: bool = True
    axis_name: AxisName | None = None
    mark_varying: bool = False
    recompute_dequantized: bool | None = None

    def loss(self, params: PyTree, lora: PyTree, batch: PyTree, rng: jax.Array | None) -> jax.Array:
        """Return the loss of base plus adapters on ``batch``, on this step's path.

        With a key, ``rng`` is split into the model's dropout key and LoRA
        dropout's; LoRA dropout needs the factored path and is left out with
        ``factored=False``.
        """
        model_rng, lora_rng = (None, None) if rng is None else tuple(jax.random.split(rng))
        recompute = self.recompute_dequantized
        if self.factored:
            apply = factored_apply(self.loss_fn, self.spec, recompute_dequantized=recompute)
            return apply(params, lora, batch, model_rng, dropout_rng=lora_rng)

        def on_combined(lora: PyTree) -> jax.Array:
            return self.loss_fn(combine(params, lora, self.spec), batch, model_rng)

        # The frozen kernels are dequantized again for the backward pass rather than kept (the factored path
        # keeps codes at each product); an adapted kernel's W0 + s A B is still kept, which that path avoids.
        base_leaves = jax.tree_util.tree_leaves(params, is_leaf=is_quantized)
        return keep_codes(on_combined, base_leaves, recompute)(lora)

    def __call__(
        self, params: PyTree, lora: PyTree, opt_state: PyTree, batch: PyTree, rng: jax.Array | None
    ) -> tuple[PyTree, PyTree, jax.Array]:
        """Take one optimizer step on ``lora``.

        Args:
          params: the frozen base tree. Leaves the spec makes fully trainable
            are never read from it, so they may be ``jax.ShapeDtypeStruct``
            (full fine-tuning then holds one copy).
          lora: the adapter tree (see :func:`lora_jax.init`).
          opt_state: ``tx``'s state for ``lora``.
          batch: whatever ``loss_fn`` reads; under ``axis_name``, this device's slice.
          rng: a key for dropout (model and LoRA), or ``None`` to train without.

        Returns:
          The updated adapters and optimizer state, and the loss before the update.
        """
        axis = self.axis_name
        if rng is not None:
            rng = unrolled(rng)  # the same masks, drawn in one fused pass on CPU
        if rng is not None and axis is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))  # each device its own dropout masks
        trainable = _to_varying(lora, axis) if self.mark_varying and axis is not None else lora
        loss, grads = jax.value_and_grad(lambda tree: self.loss(params, tree, batch, rng))(trainable)
        if axis is not None:
            grads = jax.lax.pmean(grads, axis)
            loss = jax.lax.pmean(loss, axis)
        with jax.named_scope("optimizer"):
            updates, opt_state = self.tx.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state, loss


def train_step(
    loss_fn: LossFn,
    spec: LoraSpec,
    tx: optax.GradientTransformation,
    *,
    factored: bool = True,
    axis_name: AxisName | None = None,
    mark_varying: bool = False,
    recompute_dequantized: bool | None = None,
) -> TrainStep:
    """Build the train step ``(params, lora, opt_state, batch, rng) -> (lora, opt_state, loss)``.

    Args:
      loss_fn: ``(params, batch, rng | None) -> scalar``, a function of a
        plain param tree (the base's structure).
      spec: the LoRA spec ``lora`` was made with.
      tx: the optimizer for the adapter tree.
      factored: run ``loss_fn`` through :func:`lora_jax.factored` (no
        kernel-sized temporaries or gradients; LoRA dropout); ``False`` runs it
        on :func:`lora_jax.combine`'s materialized tree.
      axis_name: inside ``pmap``/``shard_map``, the data axis to average
        gradients and loss over.
      mark_varying: cast ``lora`` to per-device before differentiating;
        needed under ``shard_map`` with ``check_vma=True`` (its default), where
        the gradient of a replicated value would otherwise come back summed.
        The factored path needs ``check_vma=False`` and no marking, which is
        what :func:`lora_jax.distributed.shard_map_step` uses for it.
      recompute_dequantized: on a quantized base, dequantize the kernels again for the backward pass instead of
        keeping them (see :func:`lora_jax.factored`; through ``combine``, the frozen kernels only); None
        decides by :func:`lora_jax.scheduling.recomputation_saves_memory`; anything else is refused
        (``QuantError``).

    Returns:
      The step, unjitted: wrap it in ``jax.jit`` (see
      :func:`lora_jax.distributed.jit_step`), ``shard_map`` or ``pmap``.
    """
    check_recompute(recompute_dequantized, "train_step")
    return TrainStep(loss_fn, spec, tx, factored, axis_name, mark_varying, recompute_dequantized)
