"""Partition a base tree over a device mesh by path rules: values, checks and the FSDP / tensor-parallel tables.

A rule is a pair ``(pattern, value)``. The pattern is what a :class:`lora_jax.Rule`
takes, matched by the same :func:`lora_jax.paths.matches`: a regex that must
match the whole ``/``-joined path, or a predicate ``(path, ShapeDtypeStruct) ->
bool``. The first matching rule decides. A value is a ``PartitionSpec`` (a
"partition"), ``None`` (replicated) or a :data:`PartitionFn` that looks at the
leaf's shape and the mesh (FSDP picks the largest axis the mesh axis divides).

    mesh = make_mesh((2, 4), ("data", "model"))
    base_partitions = partitions(params, fsdp_tp_rules("data", "model"), mesh)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

from lora_jax.errors import LoraError
from lora_jax.paths import PathTuple, Pattern, check_pattern, flatten, matches, path_str
from lora_jax.plan import abstract_leaf
from lora_jax.quant.array import is_quantized
from lora_jax.typing import PyTree

AxisSizes = Mapping[str, int]
PartitionFn = Callable[[str, tuple[int, ...], AxisSizes | None], PartitionSpec | None]
"""``(path, shape, mesh axis sizes or None) -> PartitionSpec``: a shape-aware rule value."""
RuleValue = PartitionSpec | PartitionFn | None
PartitionRule = tuple[Pattern, RuleValue]
Rules = Sequence[PartitionRule]


class ShardingError(LoraError):
    """A partition rule does not fit a param: unknown mesh axis, indivisible dimension, too many entries."""


def make_mesh(shape: Sequence[int], names: Sequence[str], devices: Sequence[Any] | None = None) -> Mesh:
    """Build a mesh like ``jax.make_mesh``, with ``Auto`` axes.

    Recent JAX makes ``Explicit`` axes by default, which puts shardings in the
    types and asks every ambiguous op to be annotated; these partitions are
    meant as GSPMD layouts that ``jit`` propagates on its own.
    """
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def axis_sizes(mesh: Mesh | Any) -> dict[str, int]:
    """Return mesh axis name -> size, for a ``Mesh`` or ``AbstractMesh``."""
    return dict(mesh.shape)


def entry_axes(entry: Any) -> tuple[str, ...]:
    """Return the mesh axes of one partition entry (``None``, a name, or a tuple of names)."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def check_partition(
    name: str, shape: tuple[int, ...], partition: PartitionSpec, sizes: AxisSizes | None
) -> PartitionSpec:
    """Check ``partition`` against a leaf and the mesh; return it with one entry per dimension.

    Raises:
      ShardingError: more entries than dimensions, a mesh axis used twice, and
        with ``sizes``: an axis the mesh lacks or a dimension it does not divide.
    """
    if not isinstance(partition, PartitionSpec):
        raise ShardingError(f"{name}: partition rule gave {partition!r}, expected a jax.sharding.PartitionSpec")
    entries = list(partition)
    if len(entries) > len(shape):
        raise ShardingError(f"{name}: {partition} has {len(entries)} entries for a leaf of shape {shape}")
    seen: set[str] = set()
    for dim, entry in enumerate(entries):
        axes = entry_axes(entry)
        for axis in axes:
            if axis in seen:
                raise ShardingError(f"{name}: {partition} uses mesh axis {axis!r} twice")
            seen.add(axis)
            if sizes is not None and axis not in sizes:
                raise ShardingError(
                    f"{name}: {partition} names mesh axis {axis!r}, but the mesh has axes {tuple(sizes)}; "
                    "rename the axis in the rules or build the mesh with it"
                )
        if sizes is not None and axes:
            ways = int(np.prod([sizes[a] for a in axes]))
            if shape[dim] % ways:
                raise ShardingError(
                    f"{name}: dimension {dim} of shape {shape} has size {shape[dim]}, which mesh axis "
                    f"{'×'.join(repr(a) for a in axes)} of size {ways} does not divide; "
                    "shard another dimension or use a mesh axis that divides it"
                )
    return PartitionSpec(*entries, *([None] * (len(shape) - len(entries))))


def _partition_of(value: RuleValue, name: str, shape: tuple[int, ...], sizes: AxisSizes | None) -> PartitionSpec:
    """Return the partition a rule value gives the leaf at ``name`` (``None`` means replicated)."""
    if value is None:
        return PartitionSpec()
    if isinstance(value, PartitionSpec):
        return value
    out = value(name, shape, sizes)
    return PartitionSpec() if out is None else out


def partitions(
    params: PyTree,
    rules: Rules,
    mesh: Mesh | Any | None = None,
    *,
    default: RuleValue = None,
    strict: bool = False,
) -> PyTree:
    """Return a ``PartitionSpec`` for each leaf of ``params``, by the first matching rule.

    Args:
      params: the base tree (arrays or ``jax.ShapeDtypeStruct``).
      rules: ``(pattern, value)`` pairs; a pattern is a regex matched against
        the whole ``/``-joined path or a predicate ``(path, leaf) -> bool``
        (as in :class:`lora_jax.Rule`). A value is a ``PartitionSpec``,
        ``None`` for replicated, or a :data:`PartitionFn`.
      mesh: a ``Mesh`` or ``AbstractMesh``; with it each partition is checked
        (axis names, divisibility). Shape-aware values such as :func:`fsdp` need it.
      default: the value for leaves no rule matches.
      strict: raise on leaves no rule matches instead of using ``default``.

    Returns:
      A tree like ``params`` of ``PartitionSpec``, each with one entry per
      dimension of its leaf.

    Raises:
      ShardingError: naming the path, for a rule that does not fit its leaf.
    """
    rules = list(rules)
    for pattern, _ in rules:
        check_pattern(pattern, f"partition rule {pattern!r}")
    sizes = None if mesh is None else axis_sizes(mesh)
    flat, treedef = flatten(params)
    out = []
    for path, leaf in flat:
        name = path_str(path)
        abstract = abstract_leaf(leaf)
        shape = tuple(abstract.shape)
        found = [v for pattern, v in rules if matches(pattern, name, abstract)][:1]
        if not found and strict:
            raise ShardingError(f"{name}: no partition rule matches this path (strict=True)")
        value = found[0] if found else default
        partition = check_partition(name, shape, _partition_of(value, name, shape, sizes), sizes)
        out.append(_check_quantized(name, leaf, partition))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_quantized(name: str, leaf: Any, partition: PartitionSpec) -> PartitionSpec:
    """Return ``partition``, or for a quantized leaf ``PartitionSpec()`` (replicated, whatever its arrays' ranks).

    A partition that shards a quantized leaf is refused: its arrays are packed blocks, not its logical shape.
    """
    if is_quantized(leaf) and any(entry is not None for entry in partition):
        raise ShardingError(
            f"{name}: a quantized leaf ({type(leaf).__name__}) can only be replicated, but its rule gave {partition}; "
            "its codes and scales are packed in blocks along the flattened kernel, so a partition of the logical "
            "shape does not describe them. Replicate it (a rule value of None) or shard the unquantized base"
        )
    return PartitionSpec() if is_quantized(leaf) else partition


def partitions_by_path(tree: PyTree) -> dict[PathTuple, PartitionSpec]:
    """Return the partitions of a tree of ``PartitionSpec`` by path."""
    return dict(flatten(tree)[0])


def lookup(by_path: Mapping[PathTuple, PartitionSpec], path: PathTuple) -> PartitionSpec:
    """Return the partition at ``path``; raise :class:`ShardingError` naming it when there is none."""
    if path not in by_path:
        raise ShardingError(f"{path_str(path)}: the base partitions tree has no PartitionSpec for this param")
    return by_path[path]


def check_partitions(params: PyTree, partitions: PyTree, mesh: Mesh | Any) -> None:
    """Check a tree of ``PartitionSpec`` against ``params`` and ``mesh``; raise :class:`ShardingError`."""
    by_path = partitions_by_path(partitions)
    sizes = axis_sizes(mesh)
    for path, leaf in flatten(params)[0]:
        name = path_str(path)
        _check_quantized(
            name, leaf, check_partition(name, tuple(abstract_leaf(leaf).shape), lookup(by_path, path), sizes)
        )


# Rule values ---------------------------------------------------------------


def shard_dim(dim: int, axis: str | tuple[str, ...]) -> PartitionFn:
    """Shard dimension ``dim`` (negative counts from the end) over mesh ``axis``; the rest replicated.

    Counting from the end lets one rule serve both ``[in, out]`` kernels and
    ``[layers, in, out]`` scan stacks.
    """

    def rule(name: str, shape: tuple[int, ...], sizes: AxisSizes | None) -> PartitionSpec:
        if not -len(shape) <= dim < len(shape):
            raise ShardingError(f"{name}: cannot shard dimension {dim} of a leaf of shape {shape}")
        entries: list[Any] = [None] * len(shape)
        entries[dim % len(shape)] = axis
        return PartitionSpec(*entries)

    return rule


def column_parallel(axis: str = "model", out_ndim: int = 1) -> PartitionFn:
    """Shard the first of the last ``out_ndim`` axes (Megatron column parallel; kernel or bias).

    ``out_ndim=2`` for ``DenseGeneral`` q/k/v kernels ``[embed, heads, head_dim]``
    shards the heads.
    """
    return shard_dim(-out_ndim, axis)


def row_parallel(axis: str = "model", in_ndim: int = 1, out_ndim: int = 1) -> PartitionFn:
    """Shard the first input axis of ``[..., *in, *out]`` (Megatron row parallel).

    ``in_ndim=2`` for an attention output kernel ``[heads, head_dim, embed]``
    shards the heads.
    """
    return shard_dim(-(in_ndim + out_ndim), axis)


def fsdp(
    axis: str | tuple[str, ...] = "fsdp", base: RuleValue = None, *, skip_leading: int = 0, min_size: int = 0
) -> PartitionFn:
    """Shard the largest dimension that ``axis`` divides, on top of ``base``'s partition.

    Args:
      axis: the mesh axis (or axes) that shards the parameters.
      base: a partition or rule value applied first (e.g. :func:`column_parallel`
        for FSDP with tensor parallelism); only its unsharded dimensions are
        candidates.
      skip_leading: dimensions at the front never sharded, such as the layer
        axis of an ``nn.scan`` stack, which the scan slices one layer at a time.
      min_size: leaves with fewer elements stay as ``base`` leaves them.

    Leaves with no dimension that ``axis`` divides stay as ``base`` leaves them.
    """
    axes = entry_axes(axis)

    def rule(name: str, shape: tuple[int, ...], sizes: AxisSizes | None) -> PartitionSpec:
        if sizes is None:
            raise ShardingError(f"{name}: an fsdp rule needs the mesh; pass mesh= to partitions")
        entries = list(_partition_of(base, name, shape, sizes))
        entries += [None] * (len(shape) - len(entries))
        missing = [a for a in axes if a not in sizes]
        if missing:
            raise ShardingError(
                f"{name}: fsdp rule names mesh axis {missing[0]!r}, but the mesh has axes {tuple(sizes)}"
            )
        if int(np.prod(shape)) < min_size:
            return PartitionSpec(*entries)
        ways = int(np.prod([sizes[a] for a in axes]))
        candidates = [d for d in range(skip_leading, len(shape)) if entries[d] is None and shape[d] % ways == 0]
        if not candidates:
            return PartitionSpec(*entries)
        best = max(candidates, key=lambda d: (shape[d], -d))
        entries[best] = axis
        return PartitionSpec(*entries)

    return rule


# Rule tables ---------------------------------------------------------------

COLUMN_MODULES = (
    r"query|key|value|q_proj|k_proj|v_proj|qkv|c_attn|up_proj|gate_proj|wi|wi_0|wi_1|fc1|c_fc|intermediate/dense"
)
ROW_MODULES = r"out|out_proj|o_proj|down_proj|wo|fc2|c_proj|output/dense"


def _module_pattern(modules: str, leaf: str) -> str:
    return rf"(.*/)?({modules})/{leaf}"


def both(first: Pattern, second: Pattern) -> Pattern:
    """Return a pattern that matches where both match: a regex when both are regexes, else a predicate."""
    if isinstance(first, str) and isinstance(second, str):
        return rf"(?=(?:{first})$)(?:{second})"

    def predicate(name: str, leaf: jax.ShapeDtypeStruct) -> bool:
        return matches(first, name, leaf) and matches(second, name, leaf)

    return predicate


def fsdp_rules(axis: str = "fsdp", *, stacked: Pattern | None = None, min_size: int = 0) -> list[PartitionRule]:
    """Return rules for fully sharded data parallel: every leaf sharded over ``axis`` on its largest divisible dim.

    Args:
      axis: the mesh axis.
      stacked: a pattern for scan-stacked leaves (e.g. ``r".*/layers/.*"``)
        whose leading layer axis must stay whole.
      min_size: leaves smaller than this (biases, norms) stay replicated.
    """
    rules: list[PartitionRule] = []
    if stacked is not None:
        rules.append((stacked, fsdp(axis, skip_leading=1, min_size=min_size)))
    rules.append((r".*", fsdp(axis, min_size=min_size)))
    return rules


def tensor_parallel_rules(
    axis: str = "model",
    *,
    column: str = COLUMN_MODULES,
    row: str = ROW_MODULES,
    out_ndim: int = 1,
    in_ndim: int = 1,
) -> list[PartitionRule]:
    """Return Megatron tensor-parallel rules for ``Dense``-style kernels ``[..., in, out]``.

    Column-parallel modules (``column``, an alternation of module names or
    path pieces) shard the output axis of kernel and bias; row-parallel
    modules shard the input axis of the kernel and keep the bias replicated,
    so each layer pair needs one all-reduce. Everything else is replicated.
    For ``DenseGeneral`` attention kernels write a table with
    :func:`column_parallel` / :func:`row_parallel` and ``out_ndim``/``in_ndim`` 2.
    """
    return [
        (_module_pattern(column, "kernel"), column_parallel(axis, out_ndim)),
        (_module_pattern(column, "bias"), column_parallel(axis, out_ndim)),
        (_module_pattern(row, "kernel"), row_parallel(axis, in_ndim, 1)),
    ]


def fsdp_tp_rules(
    fsdp_axis: str = "data",
    tp_axis: str = "model",
    *,
    tp: Rules | None = None,
    stacked: Pattern | None = None,
    min_size: int = 0,
) -> list[PartitionRule]:
    """Return rules for tensor parallel over ``tp_axis`` and FSDP over ``fsdp_axis`` on a 2-D mesh.

    Each tensor-parallel rule (``tp``, by default :func:`tensor_parallel_rules`)
    then shards the largest remaining dimension over ``fsdp_axis``; leaves no
    tensor-parallel rule matches are FSDP-sharded alone.
    """
    tp = tensor_parallel_rules(tp_axis) if tp is None else tp
    rules: list[PartitionRule] = []
    for pattern, value in tp:
        if stacked is not None:
            rules.append((both(stacked, pattern), fsdp(fsdp_axis, value, skip_leading=1, min_size=min_size)))
        rules.append((pattern, fsdp(fsdp_axis, value, min_size=min_size)))
    return rules + fsdp_rules(fsdp_axis, stacked=stacked, min_size=min_size)
