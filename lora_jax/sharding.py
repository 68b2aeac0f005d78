"""Shardings for a LoRA model: the base's from regex rules, the adapters' from the base's.

The base tree is partitioned by rules, ``(regex, value)`` pairs matched against
``/``-joined param paths; the first rule whose regex matches the whole path
decides. A value is a ``PartitionSpec``, ``None`` (replicated) or a
:data:`SpecFn` that looks at the leaf's shape and the mesh (FSDP picks the
largest axis the mesh axis divides).

Adapters follow their kernel: ``A [*stack, *in, r]`` keeps ``W``'s stack and
input shardings, ``B [*stack, r, *out]`` keeps its stack and output shardings,
and the rank axis is replicated, so ``A @ B`` comes out laid out like ``W``
and neither ``combine`` nor ``merge`` moves a kernel between devices.
Optimizer state that mirrors the trainable tree takes the same shardings.

    mesh = lora_jax.sharding.make_mesh((2, 4), ("data", "model"))
    base_specs = partition_specs(params, fsdp_tp_rules("data", "model"), mesh)
    sh = train_shardings(mesh, params, base_specs, spec, tx)
    step = jax.jit(step, in_shardings=(sh.params, sh.lora, sh.opt_state, sh.batch),
                   out_shardings=(sh.lora, sh.opt_state, sh.replicated))
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lora_jax.adapters import A_KEY, B_KEY
from lora_jax.errors import LoraError
from lora_jax.merge import merge
from lora_jax.paths import PathTuple, flatten, nested_set, path_str
from lora_jax.plan import Target, abstract_leaf, plan
from lora_jax.spec import LoraSpec

AxisSizes = Mapping[str, int]
SpecFn = Callable[[str, tuple[int, ...], AxisSizes | None], PartitionSpec | None]
"""``(path, shape, mesh axis sizes or None) -> PartitionSpec``: a shape-aware rule value."""
RuleValue = PartitionSpec | SpecFn | None
Rules = Sequence[tuple[str, RuleValue]]


class ShardingError(LoraError):
    """A partition rule does not fit a param: unknown mesh axis, indivisible dimension, too many entries."""


def make_mesh(shape: Sequence[int], names: Sequence[str], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """``jax.make_mesh`` with ``Auto`` axes.

    Recent JAX makes ``Explicit`` axes by default, which puts shardings in the
    types and asks every ambiguous op to be annotated; these shardings are meant
    as GSPMD layouts that ``jit`` propagates on its own.
    """
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def axis_sizes(mesh: Mesh | Any) -> dict[str, int]:
    """Mesh axis name -> size, for a ``Mesh`` or ``AbstractMesh``."""
    return dict(mesh.shape)


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def check_spec(name: str, shape: tuple[int, ...], pspec: PartitionSpec, sizes: AxisSizes | None) -> PartitionSpec:
    """Check ``pspec`` against a leaf and the mesh; return it with one entry per dimension.

    Raises:
      ShardingError: more entries than dimensions, a mesh axis used twice, and
        with ``sizes``: an axis the mesh lacks or a dimension it does not divide.
    """
    if not isinstance(pspec, PartitionSpec):
        raise ShardingError(f"{name}: partition rule gave {pspec!r}, expected a jax.sharding.PartitionSpec")
    entries = list(pspec)
    if len(entries) > len(shape):
        raise ShardingError(f"{name}: {pspec} has {len(entries)} entries for a leaf of shape {shape}")
    seen: set[str] = set()
    for dim, entry in enumerate(entries):
        axes = _entry_axes(entry)
        for axis in axes:
            if axis in seen:
                raise ShardingError(f"{name}: {pspec} uses mesh axis {axis!r} twice")
            seen.add(axis)
            if sizes is not None and axis not in sizes:
                raise ShardingError(
                    f"{name}: {pspec} names mesh axis {axis!r}, but the mesh has axes {tuple(sizes)}; "
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


_NO_MATCH = object()


def _resolve(value: RuleValue, name: str, shape: tuple[int, ...], sizes: AxisSizes | None) -> PartitionSpec:
    if value is None:
        return PartitionSpec()
    if isinstance(value, PartitionSpec):
        return value
    out = value(name, shape, sizes)
    return PartitionSpec() if out is None else out


def partition_specs(
    params: Any,
    rules: Rules,
    mesh: Mesh | Any | None = None,
    *,
    default: RuleValue = None,
    strict: bool = False,
) -> Any:
    """A ``PartitionSpec`` for each leaf of ``params``, by the first matching rule.

    Args:
      params: the base tree (arrays or ``jax.ShapeDtypeStruct``).
      rules: ``(regex, value)`` pairs; the regex must match the whole
        ``/``-joined path (``re.fullmatch``). A value is a ``PartitionSpec``,
        ``None`` for replicated, or a :data:`SpecFn`.
      mesh: a ``Mesh`` or ``AbstractMesh``; with it each spec is checked (axis
        names, divisibility). Shape-aware rules such as :func:`fsdp` need it.
      default: the value for leaves no rule matches.
      strict: raise on leaves no rule matches instead of using ``default``.

    Returns:
      A tree like ``params`` of ``PartitionSpec``, each with one entry per
      dimension of its leaf.

    Raises:
      ShardingError: naming the path, for a rule that does not fit its leaf.
    """
    compiled = [(re.compile(pattern), value) for pattern, value in rules]
    sizes = None if mesh is None else axis_sizes(mesh)
    flat, treedef = flatten(params)
    specs = []
    for path, leaf in flat:
        name = path_str(path)
        shape = tuple(abstract_leaf(leaf).shape)
        value = next((v for regex, v in compiled if regex.fullmatch(name)), _NO_MATCH)
        if value is _NO_MATCH:
            if strict:
                raise ShardingError(f"{name}: no partition rule matches this path (strict=True)")
            value = default
        specs.append(check_spec(name, shape, _resolve(value, name, shape, sizes), sizes))
    return jax.tree_util.tree_unflatten(treedef, specs)


def check_specs(params: Any, specs: Any, mesh: Mesh | Any) -> None:
    """Check a tree of ``PartitionSpec`` against ``params`` and ``mesh``; raises :class:`ShardingError`."""
    by_path = _specs_by_path(specs)
    sizes = axis_sizes(mesh)
    for path, leaf in flatten(params)[0]:
        name = path_str(path)
        check_spec(name, tuple(abstract_leaf(leaf).shape), _lookup(by_path, path), sizes)


# Rule values ---------------------------------------------------------------


def shard_dim(dim: int, axis: str | tuple[str, ...]) -> SpecFn:
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


def column_parallel(axis: str = "model", out_ndim: int = 1) -> SpecFn:
    """Megatron column parallel: shard the first of the last ``out_ndim`` axes (kernel or bias).

    ``out_ndim=2`` for ``DenseGeneral`` q/k/v kernels ``[embed, heads, head_dim]``
    shards the heads.
    """
    return shard_dim(-out_ndim, axis)


def row_parallel(axis: str = "model", in_ndim: int = 1, out_ndim: int = 1) -> SpecFn:
    """Megatron row parallel: shard the first input axis of ``[..., *in, *out]``.

    ``in_ndim=2`` for an attention output kernel ``[heads, head_dim, embed]``
    shards the heads.
    """
    return shard_dim(-(in_ndim + out_ndim), axis)


def fsdp(
    axis: str | tuple[str, ...] = "fsdp", base: RuleValue = None, *, skip_leading: int = 0, min_size: int = 0
) -> SpecFn:
    """Shard the largest dimension that ``axis`` divides, on top of ``base``'s spec.

    Args:
      axis: the mesh axis (or axes) that shards the parameters.
      base: a spec or rule value applied first (e.g. :func:`column_parallel`
        for FSDP with tensor parallelism); only its unsharded dimensions are
        candidates.
      skip_leading: dimensions at the front never sharded, such as the layer
        axis of an ``nn.scan`` stack, which the scan slices one layer at a time.
      min_size: leaves with fewer elements stay as ``base`` leaves them.

    Leaves with no dimension that ``axis`` divides stay as ``base`` leaves them.
    """
    axes = _entry_axes(axis)

    def rule(name: str, shape: tuple[int, ...], sizes: AxisSizes | None) -> PartitionSpec:
        if sizes is None:
            raise ShardingError(f"{name}: an fsdp rule needs the mesh; pass mesh= to partition_specs")
        entries = list(_resolve(base, name, shape, sizes))
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


def fsdp_rules(axis: str = "fsdp", *, stacked: str | None = None, min_size: int = 0) -> list[tuple[str, RuleValue]]:
    """Fully sharded data parallel: every leaf sharded over ``axis`` on its largest divisible dimension.

    Args:
      axis: the mesh axis.
      stacked: a regex for scan-stacked leaves (e.g. ``r".*/layers/.*"``) whose
        leading layer axis must stay whole.
      min_size: leaves smaller than this (biases, norms) stay replicated.
    """
    rules: list[tuple[str, RuleValue]] = []
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
) -> list[tuple[str, RuleValue]]:
    """Megatron tensor parallelism for ``Dense``-style kernels ``[..., in, out]``.

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
    stacked: str | None = None,
    min_size: int = 0,
) -> list[tuple[str, RuleValue]]:
    """Tensor parallel over ``tp_axis`` and FSDP over ``fsdp_axis`` on a 2-D mesh.

    Each tensor-parallel rule (``tp``, by default :func:`tensor_parallel_rules`)
    then shards the largest remaining dimension over ``fsdp_axis``; leaves no
    tensor-parallel rule matches are FSDP-sharded alone.
    """
    tp = tensor_parallel_rules(tp_axis) if tp is None else tp
    rules: list[tuple[str, RuleValue]] = []
    for pattern, value in tp:
        if stacked is not None:
            rules.append(
                (rf"(?=(?:{stacked})$)(?:{pattern})", fsdp(fsdp_axis, value, skip_leading=1, min_size=min_size))
            )
        rules.append((pattern, fsdp(fsdp_axis, value, min_size=min_size)))
    return rules + fsdp_rules(fsdp_axis, stacked=stacked, min_size=min_size)


def model_rules(
    fsdp_axis: str | None = "data",
    tp_axis: str | None = "model",
    *,
    stacked: str = r".*/layers/.*",
    min_size: int = 0,
) -> list[tuple[str, RuleValue]]:
    """Rules for the bundled BERT, GPT-2 and Llama models (:mod:`lora_jax.models`), unrolled or scanned.

    Tensor parallel over ``tp_axis``: ``attention/{query,key,value}`` kernels
    ``[D, H, Dh]`` and biases split the heads, ``attention/out`` ``[H, Dh, D]``
    splits its input heads, ``mlp/{intermediate,fc,gate,up}`` split their
    outputs and ``mlp/{output,proj,down}`` their inputs. ``tp_axis`` must
    divide the key/value heads (Llama's grouped heads included). Then FSDP
    over ``fsdp_axis`` everywhere, never on the layer axis of ``stacked``
    params. Either axis may be ``None`` to leave that kind out.
    """
    tp: list[tuple[str, RuleValue]] = []
    if tp_axis is not None:
        tp = [
            (r"(.*/)?attention/(query|key|value)/(kernel|bias)", column_parallel(tp_axis, out_ndim=2)),
            (r"(.*/)?attention/out/kernel", row_parallel(tp_axis, in_ndim=2)),
            (r"(.*/)?mlp/(intermediate|fc|gate|up)/(kernel|bias)", column_parallel(tp_axis)),
            (r"(.*/)?mlp/(output|proj|down)/kernel", row_parallel(tp_axis)),
        ]
    if fsdp_axis is None:
        return tp
    return fsdp_tp_rules(fsdp_axis, tp=tp, stacked=stacked, min_size=min_size)


MODEL_RULES = model_rules()
"""FSDP over ``data`` and tensor parallel over ``model`` for :mod:`lora_jax.models`."""


# Adapters and optimizer state -----------------------------------------------


def _specs_by_path(specs: Any) -> dict[PathTuple, PartitionSpec]:
    return dict(flatten(specs)[0])


def _lookup(by_path: Mapping[PathTuple, PartitionSpec], path: PathTuple) -> PartitionSpec:
    if path not in by_path:
        raise ShardingError(f"{path_str(path)}: the base specs tree has no PartitionSpec for this param")
    return by_path[path]


def _padded(pspec: PartitionSpec, ndim: int, name: str) -> list[Any]:
    entries = list(pspec)
    if len(entries) > ndim:
        raise ShardingError(f"{name}: {pspec} has {len(entries)} entries for a {ndim}-dim leaf")
    return entries + [None] * (ndim - len(entries))


def target_specs(target: Target, base: PartitionSpec) -> dict[PathTuple, PartitionSpec]:
    """The adapter-tree leaves of one target with their specs, given the kernel's spec.

    ``A [*stack, *in, r]`` takes ``W``'s stack and input entries, ``B [*stack,
    r, *out]`` its stack and output entries; the rank axis is replicated. A
    fully trainable leaf keeps ``base``.
    """
    entries = _padded(base, len(target.shape), target.name)
    if target.layout is None:
        return {target.path: PartitionSpec(*entries)}
    layout = target.layout
    stack = [entries[a] for a in layout.stack]
    a_spec = PartitionSpec(*stack, *(entries[a] for a in layout.inputs), None)
    b_spec = PartitionSpec(*stack, None, *(entries[a] for a in layout.outputs))
    return {(*target.path, A_KEY): a_spec, (*target.path, B_KEY): b_spec}


def adapter_specs(params: Any, base_specs: Any, spec: LoraSpec) -> dict:
    """A ``PartitionSpec`` for each leaf of the adapter tree, derived from the base's.

    Args:
      params: the base tree (arrays or ``jax.ShapeDtypeStruct``), as given to
        :func:`lora_jax.init`.
      base_specs: a tree like ``params`` of ``PartitionSpec``.
      spec: the LoRA spec.

    Returns:
      A nested dict shaped like ``lora_jax.init(key, params, spec)``: at each
      adapted kernel ``{"a": spec of A [*stack, *in, r], "b": spec of B
      [*stack, r, *out]}``, at each fully trainable leaf its base spec.
    """
    by_path = _specs_by_path(base_specs)
    out: dict = {}
    for target in plan(params, spec):
        for path, pspec in target_specs(target, _lookup(by_path, target.path)).items():
            nested_set(out, path, pspec)
    return out


def abstract_adapters(params: Any, spec: LoraSpec) -> dict:
    """``jax.ShapeDtypeStruct`` of each adapter-tree leaf, without allocating it."""
    out: dict = {}
    for target in plan(params, spec):
        if target.layout is None:
            nested_set(out, target.path, jax.ShapeDtypeStruct(target.shape, target.dtype))
            continue
        dtype = jnp.dtype(target.rule.dtype)
        nested_set(out, (*target.path, A_KEY), jax.ShapeDtypeStruct(target.a_shape, dtype))
        nested_set(out, (*target.path, B_KEY), jax.ShapeDtypeStruct(target.b_shape, dtype))
    return out


def state_specs(state: Any, tree: Any, tree_specs: Any) -> Any:
    """Specs for optimizer state: leaves that mirror ``tree`` take its specs, others are replicated.

    A state leaf mirrors a leaf of ``tree`` when the longest tail of its path
    that is a path of ``tree`` (``mu/encoder/query/kernel/a`` ends in
    ``encoder/query/kernel/a``) names a leaf of the same shape; counts and
    other scalars, and factored statistics of another shape, are replicated.

    Args:
      state: the optimizer state, or its ``jax.eval_shape``.
      tree: what the optimizer updates (adapter tree, or ``{"base", "lora"}``
        for :func:`lora_jax.adapter_only`), arrays or abstract.
      tree_specs: a tree like ``tree`` of ``PartitionSpec``.
    """
    shapes = {path: tuple(abstract_leaf(leaf).shape) for path, leaf in flatten(tree)[0]}
    by_path = _specs_by_path(tree_specs)
    flat, treedef = flatten(state)
    out = []
    for path, leaf in flat:
        shape = tuple(abstract_leaf(leaf).shape)
        found = PartitionSpec()
        for start in range(len(path)):
            tail = path[start:]
            if tail in shapes:
                if shapes[tail] == shape:
                    found = by_path[tail]
                break
        out.append(found)
    return jax.tree_util.tree_unflatten(treedef, out)


def named(mesh: Mesh, specs: Any) -> Any:
    """``NamedSharding(mesh, spec)`` for each ``PartitionSpec`` of a tree."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)


@dataclasses.dataclass(frozen=True)
class TrainShardings:
    """``NamedSharding`` trees for a LoRA training step's arguments and results.

    ``params``, ``lora`` and ``opt_state`` mirror their trees; ``batch``
    shards the leading dimension of every batch leaf over the data axes;
    ``replicated`` is for scalars such as the loss.
    """

    params: Any
    lora: Any
    opt_state: Any
    batch: NamedSharding
    replicated: NamedSharding


def train_shardings(
    mesh: Mesh,
    params: Any,
    base_specs: Any,
    spec: LoraSpec,
    tx: Any | None = None,
    *,
    data_axes: str | tuple[str, ...] | None = None,
    combined: bool = False,
) -> TrainShardings:
    """Shardings for base, adapters, optimizer state and batch on ``mesh``.

    Args:
      mesh: the device mesh.
      params: the base tree (arrays or abstract).
      base_specs: a tree like ``params`` of ``PartitionSpec`` (see
        :func:`partition_specs`).
      spec: the LoRA spec.
      tx: an optax ``GradientTransformation``; its state is traced with
        ``jax.eval_shape``, nothing is allocated. ``None`` leaves
        ``opt_state`` as ``None``.
      data_axes: mesh axes the batch's leading dimension is split over;
        by default the mesh's first axis.
      combined: ``tx`` updates ``{"base": params, "lora": lora}`` (as with
        :func:`lora_jax.adapter_only`) rather than the adapter tree alone.
    """
    lora_specs = adapter_specs(params, base_specs, spec)
    abstract_params = jax.tree_util.tree_map(abstract_leaf, params)
    abstract_lora = abstract_adapters(params, spec)
    opt_state = None
    if tx is not None:
        if combined:
            tree, specs = {"base": abstract_params, "lora": abstract_lora}, {"base": base_specs, "lora": lora_specs}
        else:
            tree, specs = abstract_lora, lora_specs
        opt_state = named(mesh, state_specs(jax.eval_shape(tx.init, tree), tree, specs))
    data_axes = mesh.axis_names[0] if data_axes is None else data_axes
    return TrainShardings(
        params=named(mesh, base_specs),
        lora=named(mesh, lora_specs),
        opt_state=opt_state,
        batch=NamedSharding(mesh, PartitionSpec(data_axes)),
        replicated=NamedSharding(mesh, PartitionSpec()),
    )


# Merge ------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _jitted_merge(donate: bool, treedef: Any, shardings: tuple[Any, ...]) -> Callable[..., Any]:
    out = jax.tree_util.tree_unflatten(treedef, list(shardings))
    return jax.jit(merge, static_argnums=2, donate_argnums=(0,) if donate else (), out_shardings=out)


def sharded_merge(params: Any, lora: Any, spec: LoraSpec, *, donate: bool = False) -> Any:
    """:func:`lora_jax.merge` that keeps each base leaf's sharding.

    Adapters sharded by :func:`adapter_specs` give each device the slice of
    ``A @ B`` it adds to its own slice of ``W``, so no weight is gathered.

    Args:
      params: the base tree of ``jax.Array``, sharded as it will be served.
      lora: the adapter tree (any sharding; :func:`adapter_specs`' avoids copies).
      spec: the LoRA spec.
      donate: reuse the base buffers for the result; ``params`` is unusable after.

    Returns:
      The merged tree, each leaf with the sharding of its ``params`` leaf.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shardings = tuple(leaf.sharding for leaf in leaves)
    return _jitted_merge(donate, treedef, shardings)(params, lora, spec)
