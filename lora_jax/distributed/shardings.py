"""Shardings of a LoRA training step, derived from the base's partitions.

Adapters follow their kernel: ``A [*stack, *in, r]`` keeps ``W``'s stack and
input entries, ``B [*stack, r, *out]`` keeps its stack and output entries, and
the rank axis is replicated, so ``A @ B`` comes out laid out like ``W`` and
neither ``combine`` nor ``merge`` moves a kernel between devices. Optimizer
state is partitioned with optax's own :func:`optax.tree_utils.tree_map_params`:
the copies of the parameter tree that the optimizer keeps (Adam's ``mu`` and
``nu``) take the adapters' partitions, and everything else (counts, factored
statistics of another shape) is replicated.

    base_partitions = partitions(params, fsdp_tp_rules("data", "model"), mesh)
    sh = train_shardings(params, spec, base_partitions, mesh, tx)
    step = jit_step(train_step(loss_fn, spec, tx), sh)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.distributed.partition import ShardingError, lookup, partitions_by_path
from lora_jax.merge import merge
from lora_jax.paths import PathTuple, nested_set
from lora_jax.plan import Target, abstract_leaf, plan
from lora_jax.spec import LoraSpec
from lora_jax.typing import PyTree
from lora_jax.variants import variant_of


def _padded(partition: PartitionSpec, ndim: int, name: str) -> list[Any]:
    entries = list(partition)
    if len(entries) > ndim:
        raise ShardingError(f"{name}: {partition} has {len(entries)} entries for a {ndim}-dim leaf")
    return entries + [None] * (ndim - len(entries))


def target_partitions(target: Target, base: PartitionSpec) -> dict[PathTuple, PartitionSpec]:
    """Return the adapter-tree leaves of one target with their partitions, given the kernel's.

    The target's variant decides: ``A [*stack, *in, r]`` takes ``W``'s stack
    and input entries, ``B [*stack, r, *out]`` its stack and output entries,
    the rank axis replicated; a fully trainable leaf keeps ``base``.
    """
    entries = _padded(base, len(target.shape), target.name)
    return variant_of(target).partitions(target, PartitionSpec(*entries))


def lora_partitions(params: PyTree, spec: LoraSpec, base_partitions: PyTree) -> dict:
    """Return a ``PartitionSpec`` for each leaf of the adapter tree, derived from the base's.

    Args:
      params: the base tree (arrays or ``jax.ShapeDtypeStruct``), as given to
        :func:`lora_jax.init`.
      spec: the LoRA spec.
      base_partitions: a tree like ``params`` of ``PartitionSpec``.

    Returns:
      A nested dict shaped like ``lora_jax.init(key, params, spec)``: at each
      adapted kernel ``{"a": partition of A [*stack, *in, r], "b": partition of
      B [*stack, r, *out]}``, at each fully trainable leaf its base partition.

    Raises:
      ShardingError: ``base_partitions`` lacks a target's path, or gives it
        more entries than it has dimensions.
    """
    by_path = partitions_by_path(base_partitions)
    out: dict = {}
    for target in plan(params, spec):
        for path, partition in target_partitions(target, lookup(by_path, target.path)).items():
            nested_set(out, path, partition)
    return out


def abstract_lora(params: PyTree, spec: LoraSpec) -> dict:
    """Return the ``jax.ShapeDtypeStruct`` of each adapter-tree leaf, without allocating it."""
    out: dict = {}
    for target in plan(params, spec):
        for path, leaf in variant_of(target).leaves(target).items():
            nested_set(out, path, leaf)
    return out


def state_partitions(tree: PyTree, partitions: PyTree, tx: optax.GradientTransformation) -> PyTree:
    """Return a ``PartitionSpec`` for each leaf of ``tx``'s state for ``tree``.

    optax says which parts of the state are copies of the parameter tree
    (:func:`optax.tree_utils.tree_map_params`); their leaves take the
    partition of the param they mirror when they have its shape (Adam's
    ``mu``, ``nu``), and are replicated otherwise (Adafactor's factored
    row and column statistics). Every other leaf (step counts, scalars) is
    replicated.

    Args:
      tree: what the optimizer updates (the adapter tree, or ``{"base",
        "lora"}`` for :func:`lora_jax.adapter_only`), arrays or abstract.
      partitions: a tree like ``tree`` of ``PartitionSpec``.
      tx: the optimizer; its state is traced with ``jax.eval_shape``.

    Returns:
      A tree like ``tx.init(tree)`` of ``PartitionSpec`` (``optax.MaskedNode``
      where the state has one).
    """
    abstract = jax.tree_util.tree_map(abstract_leaf, tree)
    state = jax.eval_shape(tx.init, abstract)

    def mirror(leaf: Any, partition: PartitionSpec, param: jax.ShapeDtypeStruct) -> Any:
        if isinstance(leaf, optax.MaskedNode):
            return leaf
        return partition if tuple(leaf.shape) == tuple(param.shape) else PartitionSpec()

    return optax.tree_utils.tree_map_params(
        tx,
        mirror,
        state,
        partitions,
        abstract,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )


def named(mesh: Mesh, partitions: PyTree) -> PyTree:
    """Return ``NamedSharding(mesh, partition)`` for each ``PartitionSpec`` of a tree."""
    return jax.tree_util.tree_map(lambda p: NamedSharding(mesh, p), partitions)


@dataclasses.dataclass(frozen=True)
class TrainShardings:
    """``NamedSharding`` trees for the arguments and results of a train step.

    ``params``, ``lora`` and ``opt_state`` mirror their trees; ``batch``
    shards the leading dimension of every batch leaf over the data axes;
    ``replicated`` is for the RNG key and scalars such as the loss.
    """

    params: PyTree
    lora: PyTree
    opt_state: PyTree
    batch: NamedSharding
    replicated: NamedSharding

    @property
    def step_inputs(self) -> tuple[Any, ...]:
        """Shardings of ``(params, lora, opt_state, batch, rng)``."""
        return (self.params, self.lora, self.opt_state, self.batch, self.replicated)

    @property
    def step_outputs(self) -> tuple[Any, ...]:
        """Shardings of ``(lora, opt_state, loss)``."""
        return (self.lora, self.opt_state, self.replicated)


def train_shardings(
    params: PyTree,
    spec: LoraSpec,
    base_partitions: PyTree,
    mesh: Mesh,
    tx: optax.GradientTransformation | None = None,
    *,
    data_axes: str | tuple[str, ...] | None = None,
    combined: bool = False,
) -> TrainShardings:
    """Return shardings for base, adapters, optimizer state and batch on ``mesh``.

    Args:
      params: the base tree (arrays or abstract).
      spec: the LoRA spec.
      base_partitions: a tree like ``params`` of ``PartitionSpec`` (see
        :func:`lora_jax.distributed.partitions`).
      mesh: the device mesh.
      tx: the optimizer; its state is traced with ``jax.eval_shape``, nothing
        is allocated. ``None`` leaves ``opt_state`` as ``None``.
      data_axes: mesh axes the batch's leading dimension is split over;
        by default the mesh's first axis.
      combined: ``tx`` updates ``{"base": params, "lora": lora}`` (as with
        :func:`lora_jax.adapter_only`) rather than the adapter tree alone.
    """
    lora_parts = lora_partitions(params, spec, base_partitions)
    opt_state = None
    if tx is not None:
        lora = abstract_lora(params, spec)
        if combined:
            tree = {"base": jax.tree_util.tree_map(abstract_leaf, params), "lora": lora}
            parts = {"base": base_partitions, "lora": lora_parts}
        else:
            tree, parts = lora, lora_parts
        opt_state = named(mesh, state_partitions(tree, parts, tx))
    data_axes = mesh.axis_names[0] if data_axes is None else data_axes
    return TrainShardings(
        params=named(mesh, base_partitions),
        lora=named(mesh, lora_parts),
        opt_state=opt_state,
        batch=NamedSharding(mesh, PartitionSpec(data_axes)),
        replicated=NamedSharding(mesh, PartitionSpec()),
    )


# Merge ------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _jitted_merge(donate: bool, treedef: Any, shardings: tuple[Any, ...]) -> Callable[..., Any]:
    out = jax.tree_util.tree_unflatten(treedef, list(shardings))
    return jax.jit(merge, static_argnums=2, donate_argnums=(0,) if donate else (), out_shardings=out)


def sharded_merge(params: PyTree, lora: PyTree, spec: LoraSpec, *, donate: bool = False) -> PyTree:
    """Merge like :func:`lora_jax.merge`, keeping each base leaf's sharding.

    Adapters partitioned by :func:`lora_partitions` give each device the slice
    of ``A @ B`` it adds to its own slice of ``W``, so no weight is gathered.

    Args:
      params: the base tree of ``jax.Array``, sharded as it will be served.
      lora: the adapter tree (any sharding; :func:`lora_partitions`' avoids copies).
      spec: the LoRA spec.
      donate: reuse the base buffers for the result; ``params`` is unusable after.

    Returns:
      The merged tree, each leaf with the sharding of its ``params`` leaf.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shardings = tuple(leaf.sharding for leaf in leaves)
    return _jitted_merge(donate, treedef, shardings)(params, lora, spec)
