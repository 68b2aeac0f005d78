"""Match a spec against a base tree: which leaf gets what, and its kernel layout.

``plan(params, spec)`` is the one place where rules meet leaves. Everything
else (init, combine, merge, describe, sharding, checkpoints) works from its
:class:`Target` list, so all of them agree on paths, axes and shapes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import SpecError
from lora_jax.paths import PathTuple, flatten, path_str
from lora_jax.spec import ADAPTED_MODES, Axes, LoraSpec, Rule


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a kernel's axes split into stacked, input and output axes.

    For a kernel ``W`` of shape ``shape``, the adapter is ``A [*stack, *in, r]``
    and ``B [*stack, r, *out]``; the update ``A @ B`` is laid back out in ``W``'s
    own axis order.
    """

    shape: tuple[int, ...]
    stack: Axes
    inputs: Axes
    outputs: Axes
    inferred: bool = False

    def _dims(self, axes: Axes) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in axes)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self._dims(self.stack)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self._dims(self.inputs)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self._dims(self.outputs)

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.stack_shape, *self.in_shape, rank)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.stack_shape, rank, *self.out_shape)

    def delta(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """Return ``A @ B`` in float32, laid out like the kernel.

        Args:
          a: ``[*stack, *in, r]``.
          b: ``[*stack, r, *out]``.

        Returns:
          ``[*shape]`` float32, the unscaled low-rank update.
        """
        rank = a.shape[-1]
        a2 = a.astype(jnp.float32).reshape(*self.stack_shape, self.in_size, rank)
        b2 = b.astype(jnp.float32).reshape(*self.stack_shape, rank, self.out_size)
        # HIGHEST: TPUs otherwise multiply float32 in bfloat16 passes.
        update = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
        update = update.reshape(*self.stack_shape, *self.in_shape, *self.out_shape)
        source_order = self.stack + self.inputs + self.outputs
        return jnp.transpose(update, [source_order.index(axis) for axis in range(len(self.shape))])


@dataclasses.dataclass(frozen=True)
class Slices:
    """Equal slices of one output axis of a fused kernel (GPT-2's ``c_attn``: q, k, v), some of them adapted.

    Attributes:
      names: every slice's name, in order along ``axis``.
      adapted: the positions in ``names`` of the adapted slices, ascending.
      axis: the kernel axis the slices split; one of the layout's output axes.
      size: each slice's extent along ``axis``.
    """

    names: tuple[str, ...]
    adapted: tuple[int, ...]
    axis: int
    size: int

    def out_position(self, layout: KernelLayout) -> int:
        """Return where ``axis`` is among ``layout``'s output axes (the axis of ``B`` past its stack and rank)."""
        return layout.outputs.index(self.axis)

    def out_shape(self, layout: KernelLayout) -> tuple[int, ...]:
        """Return the output shape of one slice: ``layout.out_shape`` with ``size`` at the slice axis."""
        shape = list(layout.out_shape)
        shape[self.out_position(layout)] = self.size
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Target:
    """A leaf of the base tree chosen by a rule."""

    path: PathTuple
    rule: Rule
    rule_index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: KernelLayout | None  # None for fully trainable leaves
    slices: Slices | None = None  # the output slices of a fused kernel (Rule.slices)

    @property
    def name(self) -> str:
        return path_str(self.path)

    @property
    def factor_rank(self) -> int:
        """Return the size of the rank axis of ``A`` and ``B``: ``r``, or ``r`` per adapted slice of a fused kernel."""
        return self.rule.rank * (len(self.slices.adapted) if self.slices is not None else 1)

    @property
    def a_shape(self) -> tuple[int, ...]:
        """Return ``A``'s shape as stored: ``[*stack, *in, r]``; with slices ``[*stack, *in, n_adapted * r]``."""
        assert self.layout is not None
        return self.layout.a_shape(self.factor_rank)

    @property
    def b_shape(self) -> tuple[int, ...]:
        """Return ``B``'s shape as stored: ``[*stack, r, *out]``; with slices ``[*stack, n_adapted*r, *slice_out]``."""
        assert self.layout is not None
        if self.slices is None:
            return self.layout.b_shape(self.rule.rank)
        return (*self.layout.stack_shape, self.factor_rank, *self.slices.out_shape(self.layout))

    @property
    def trainable_size(self) -> int:
        """Trainable scalars this target owns in the adapter tree."""
        from lora_jax.variants import variant_of  # variants are defined on targets

        return variant_of(self).size(self)


def abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
    """Return the shape and dtype of a leaf: an array, a ``ShapeDtypeStruct`` or a Python scalar."""
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return jax.ShapeDtypeStruct(tuple(leaf.shape), np.dtype(leaf.dtype))
    array = np.asarray(leaf)
    return jax.ShapeDtypeStruct(array.shape, array.dtype)


def _normalize(axes: Axes | None, ndim: int, rule: Rule, name: str, what: str) -> Axes | None:
    if axes is None:
        return None
    out = []
    for axis in axes:
        if not -ndim <= axis < ndim:
            raise SpecError(f"{rule.label}: {what} {axes} out of range for the {ndim}-dim kernel at {name}")
        out.append(axis % ndim)
    if len(set(out)) != len(out):
        raise SpecError(f"{rule.label}: {what} {axes} repeats an axis at {name}")
    return tuple(out)


def kernel_layout(rule: Rule, name: str, shape: tuple[int, ...]) -> KernelLayout:
    """Split ``shape``'s axes per ``rule``, inferring what a 2-dim remainder implies."""
    ndim = len(shape)
    stack = _normalize(rule.stack_axes, ndim, rule, name, "stack_axes") or ()
    inputs = _normalize(rule.in_axes, ndim, rule, name, "in_axes")
    outputs = _normalize(rule.out_axes, ndim, rule, name, "out_axes")
    rest = [a for a in range(ndim) if a not in stack]
    inferred = False
    if inputs is None and outputs is None:
        if len(rest) != 2:
            raise SpecError(
                f"{rule.label} matched {name} with shape {shape}: a kernel with more than two axes needs "
                "in_axes or out_axes (and stack_axes for a leading layer axis), "
                "for example Rule(..., in_axes=(0,), out_axes=(1, 2)) for a [embed, heads, head_dim] kernel"
            )
        inputs, outputs = (rest[0],), (rest[1],)
        inferred = ndim > 2
    elif inputs is None:
        assert outputs is not None
        inputs = tuple(a for a in rest if a not in outputs)
    elif outputs is None:
        outputs = tuple(a for a in rest if a not in inputs)
    used = list(stack) + list(inputs) + list(outputs)
    if sorted(used) != list(range(ndim)) or not inputs or not outputs:
        raise SpecError(
            f"{rule.label}: axes stack={stack} in={inputs} out={outputs} must cover each axis of the "
            f"kernel at {name} with shape {shape} exactly once, with at least one input and one output axis"
        )
    return KernelLayout(shape, stack, inputs, outputs, inferred)


def kernel_slices(rule: Rule, name: str, layout: KernelLayout) -> Slices | None:
    """Return the slices ``rule`` names on the kernel at ``name``, checked against its layout; None without any.

    Raises:
      SpecError: ``slice_axis`` is out of range or not an output axis, the axis does not split into equal
        slices, or the rank exceeds a slice's ``min(in, out)`` (each names the path and what to change).
    """
    if rule.slices is None or rule.adapt is None:
        return None
    shape, count = layout.shape, len(rule.slices)
    outputs = layout.outputs
    if rule.slice_axis is None:
        axis = outputs[0]
    else:
        normalized = _normalize((rule.slice_axis,), len(shape), rule, name, "slice_axis")
        assert normalized is not None
        axis = normalized[0]
    if axis not in outputs:
        raise SpecError(
            f"{rule.label}: slice_axis {rule.slice_axis} is kernel axis {axis} of {name} with shape {shape}, "
            f"which is not an output axis (outputs {outputs}); give slice_axis one of {list(outputs)}, the axis "
            f"that holds {'|'.join(rule.slices)} side by side"
        )
    if shape[axis] % count:
        raise SpecError(
            f"{rule.label}: axis {axis} of {name} with shape {shape} has {shape[axis]} entries, which do not split "
            f"into {count} equal slices {'|'.join(rule.slices)}; give the slice_axis that holds them side by side"
        )
    slices = Slices(rule.slices, tuple(rule.slices.index(n) for n in rule.adapt), axis, shape[axis] // count)
    limit = min(layout.in_size, layout.out_size // count)
    if rule.rank > limit:
        raise SpecError(
            f"{rule.label}: rank {rule.rank} exceeds min(in, out) = {limit} for one slice of {name} "
            f"(in {layout.in_shape}, slice out {slices.out_shape(layout)}); use rank <= {limit}"
        )
    return slices


def _closest(pattern: Any, names: list[str]) -> str:
    if not isinstance(pattern, str):
        return ", ".join(names[:5])
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.0)
    return ", ".join(close)


def plan(params: Any, spec: LoraSpec) -> tuple[Target, ...]:
    """Match ``spec`` against ``params``: one :class:`Target` per adapted or trainable leaf.

    Args:
      params: any pytree of arrays (or ``jax.ShapeDtypeStruct``), e.g. Flax
        linen ``params``, an NNX ``State`` or a plain dict.
      spec: the rules.

    Returns:
      Targets in the tree's leaf order.

    Raises:
      SpecError: a rule matches nothing (with the closest paths), a rank
        exceeds ``min(in, out)``, a kernel is not floating point, or axes are
        missing or do not cover the kernel.
    """
    leaves, _ = flatten(params)
    names = [path_str(path) for path, _ in leaves]
    hits = [0] * len(spec.rules)
    claimed = [0] * len(spec.rules)
    targets = []
    for (path, leaf), name in zip(leaves, names):
        abstract = abstract_leaf(leaf)
        winner = None
        for index, rule in enumerate(spec.rules):
            if rule.matches(name, abstract):
                hits[index] += 1
                if winner is None:
                    winner = index
        if winner is None:
            continue
        claimed[winner] += 1
        rule = spec.rules[winner]
        if rule.mode == "freeze":
            continue
        shape, dtype = tuple(abstract.shape), np.dtype(abstract.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise SpecError(f"{rule.label} matched {name} of dtype {dtype}: only floating-point leaves can train")
        layout, slices = None, None
        if rule.mode in ADAPTED_MODES:
            if len(shape) < 2:
                raise SpecError(f"{rule.label} matched {name} with shape {shape}: LoRA needs a kernel of 2+ axes")
            layout = kernel_layout(rule, name, shape)
            limit = min(layout.in_size, layout.out_size)
            if rule.rank > limit:
                raise SpecError(
                    f"{rule.label}: rank {rule.rank} exceeds min(in, out) = {limit} for {name} "
                    f"(in {layout.in_shape}, out {layout.out_shape}); use rank <= {limit}"
                )
            slices = kernel_slices(rule, name, layout)
        targets.append(Target(path, rule, winner, shape, dtype, layout, slices))
    for index, rule in enumerate(spec.rules):
        if hits[index] == 0:
            raise SpecError(f"{rule.label} matches no leaf; closest paths: {_closest(rule.pattern, names)}")
        if claimed[index] == 0:
            raise SpecError(f"{rule.label} matches {hits[index]} leaves, all taken by earlier rules")
    return tuple(targets)
