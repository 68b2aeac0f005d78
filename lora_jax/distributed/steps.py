"""Run the one train step over devices: ``jax.jit`` with shardings, ``jax.shard_map``, ``jax.pmap``.

Each wrapper takes a step from :func:`lora_jax.training.train_step` and keeps
its signature ``(params, lora, opt_state, batch, rng) -> (lora, opt_state,
loss)``; none of them builds a step of its own.

- :func:`jit_step`: FSDP, tensor or data parallelism by shardings
  (:func:`lora_jax.distributed.train_shardings`); XLA inserts the collectives.
- :func:`shard_map_step`: data parallel, everything but the batch replicated;
  the step averages gradients itself (``axis_name``).
- :func:`pmap_step`: the same for code bases built on ``pmap``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from lora_jax.distributed.shardings import TrainShardings
from lora_jax.errors import LoraError
from lora_jax.training.step import AxisName, TrainStep

Step = Callable[..., tuple]


def _check_axis(step: TrainStep, axis: AxisName, wrapper: str) -> None:
    if getattr(step, "axis_name", None) != axis:
        raise LoraError(
            f"{wrapper} needs a step that averages over axis {axis!r}; build it with "
            f"lora_jax.training.train_step(loss_fn, spec, tx, axis_name={axis!r})"
        )


def jit_step(step: TrainStep, shardings: TrainShardings, *, donate: bool = True) -> Step:
    """Jit ``step`` with the shardings of :func:`lora_jax.distributed.train_shardings`.

    Args:
      step: a step built without ``axis_name``: the shardings make it parallel.
      shardings: where params, adapters, optimizer state, batch and RNG live.
      donate: reuse the adapter and optimizer buffers passed in for the results.
    """
    return jax.jit(
        step,
        in_shardings=shardings.step_inputs,
        out_shardings=shardings.step_outputs,
        donate_argnums=(1, 2) if donate else (),
    )


def shard_map_step(step: TrainStep, mesh: Mesh, axis: AxisName = "data", *, donate: bool = True) -> Step:
    """Jit ``step`` data parallel: base, adapters, optimizer state and RNG replicated, batch split on ``axis``.

    Every leaf of ``batch`` is split along its leading dimension, which
    ``axis`` must divide. A step built with ``mark_varying=True`` runs with
    ``shard_map``'s replication checks on (``check_vma=True``; the ``combine``
    path only); otherwise they are off, each device's gradient stays its own
    as under ``pmap``, and the factored path works too.

    Args:
      step: built with ``axis_name=axis``.
      mesh: the device mesh.
      axis: the mesh axis (or axes) the batch is split over.
      donate: reuse the adapter and optimizer buffers passed in for the results.

    Raises:
      LoraError: ``step`` does not average over ``axis``.
    """
    _check_axis(step, axis, "shard_map_step")
    rep = PartitionSpec()
    mapped = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(rep, rep, rep, PartitionSpec(axis), rep),
        out_specs=(rep, rep, rep),
        check_vma=step.mark_varying,
    )
    return jax.jit(mapped, donate_argnums=(1, 2) if donate else ())


def pmap_step(step: TrainStep, axis: str = "data") -> Step:
    """Map ``step`` with ``jax.pmap``: every argument has a leading device axis.

    Use :func:`lora_jax.distributed.replicate` for params, adapters, optimizer
    state (and an RNG key) and :func:`lora_jax.distributed.split_batch` for the batch.

    Args:
      step: built with ``axis_name=axis``.
      axis: the name of the mapped axis.

    Raises:
      LoraError: ``step`` does not average over ``axis``.
    """
    _check_axis(step, axis, "pmap_step")
    return jax.pmap(step, axis_name=axis)
