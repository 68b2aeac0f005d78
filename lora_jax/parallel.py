"""Data-parallel LoRA training steps: ``shard_map``, ``pmap``, and multi-process input.

Every step here has the signature ``(params, lora, opt_state, batch) ->
(lora, opt_state, loss)``, with ``loss_fn(params, batch) -> scalar`` the mean
loss over the batch it is given. Under data parallelism each device sees an
equal slice of the batch, so the mean of the per-device gradients
(``jax.lax.pmean``) is the gradient of the full batch and every device applies
the same update to its copy of the adapters.

For FSDP or tensor parallelism use ``jax.jit`` with the shardings of
:func:`lora_jax.sharding.train_shardings` instead: the same :func:`train_step`
runs unchanged, and XLA inserts the collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.combine import combine
from lora_jax.spec import LoraSpec

LossFn = Callable[[Any, Any], jax.Array]
Step = Callable[[Any, Any, Any, Any], tuple[Any, Any, jax.Array]]


def _to_varying(tree: Any, axis: str | tuple[str, ...]) -> Any:
    # Inside shard_map, the gradient of a value that is the same on every device
    # comes back already summed over the axis; marking it per-device keeps the
    # gradient local, so pmean below gives the mean as in pmap.
    if hasattr(jax.lax, "pcast"):
        return jax.tree_util.tree_map(lambda x: jax.lax.pcast(x, axis, to="varying"), tree)
    return jax.tree_util.tree_map(lambda x: jax.lax.pvary(x, axis), tree)


def train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    spec: LoraSpec,
    *,
    axis_name: str | tuple[str, ...] | None = None,
    mark_varying: bool = False,
) -> Step:
    """One optimizer step on the adapters: ``(params, lora, opt_state, batch) -> (lora, opt_state, loss)``.

    Args:
      loss_fn: ``(params, batch) -> scalar``; gets the combined tree
        ``W0 + s A @ B`` in the base's structure.
      tx: the optimizer for the adapter tree.
      spec: the LoRA spec.
      axis_name: inside ``pmap``/``shard_map``, the data axis to average
        gradients and loss over.
      mark_varying: cast ``lora`` to per-device before differentiating;
        needed under ``shard_map`` with its default ``check_vma=True``.
    """

    def step(params: Any, lora: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
        trainable = _to_varying(lora, axis_name) if mark_varying and axis_name is not None else lora
        loss, grads = jax.value_and_grad(lambda adapters: loss_fn(combine(params, adapters, spec), batch))(trainable)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return step


def shard_map_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    spec: LoraSpec,
    mesh: Mesh,
    axis: str | tuple[str, ...] = "data",
    *,
    donate: bool = True,
) -> Step:
    """A jitted data-parallel step: base, adapters and optimizer state replicated, batch split on ``axis``.

    Every leaf of ``batch`` is split along its leading dimension, which
    ``axis`` must divide. With ``donate`` the adapter and optimizer buffers
    passed in are reused for the results.
    """
    local = train_step(loss_fn, tx, spec, axis_name=axis, mark_varying=True)
    rep = PartitionSpec()
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, rep, PartitionSpec(axis)), out_specs=(rep, rep, rep))
    return jax.jit(mapped, donate_argnums=(1, 2) if donate else ())


def pmap_step(loss_fn: LossFn, tx: optax.GradientTransformation, spec: LoraSpec, axis: str = "data") -> Step:
    """The ``jax.pmap`` form, for code built on it: every argument has a leading device axis.

    Use :func:`replicate` for params, adapters and optimizer state and
    :func:`split_batch` for the batch.
    """
    return jax.pmap(train_step(loss_fn, tx, spec, axis_name=axis), axis_name=axis)


def replicate(tree: Any, devices: int) -> Any:
    """Stack ``devices`` copies of each leaf on a new leading axis (for ``pmap``)."""
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (devices, *np.shape(x))), tree)


def split_batch(batch: Any, devices: int) -> Any:
    """``[B, ...] -> [devices, B / devices, ...]`` for each leaf (for ``pmap``)."""

    def split(x: Any) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[0] % devices:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by {devices} devices")
        return x.reshape(devices, x.shape[0] // devices, *x.shape[1:])

    return jax.tree_util.tree_map(split, batch)


# Multi-process input ----------------------------------------------------------


def global_put(tree: Any, shardings: Any) -> Any:
    """Place host values that every process holds in full onto (possibly multi-process) shardings.

    Each process copies only the slices its own devices hold, so this works
    where ``jax.device_put`` of a host array to non-addressable devices does not.
    """

    def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def process_batch(local_batch: Any, sharding: NamedSharding) -> Any:
    """Assemble the global batch from each process's slice of it.

    Args:
      local_batch: this process's rows, ``[B / process_count, ...]`` per leaf,
        process ``i`` holding rows ``i * B / n`` onwards.
      sharding: the batch sharding, leading dimension over the data axes.

    Returns:
      Global arrays ``[B, ...]``.
    """
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def to_host(tree: Any) -> Any:
    """Full numpy values of (possibly multi-process) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
