"""Variants: the kinds of trainable leaf a rule can make, and all that depends on the kind.

A rule's ``mode`` names its variant. The core asks the variant and never
branches on the kind itself: which adapter-tree leaves a target owns, how they
start, how they change the base leaf (``combine``, ``merge``, ``unmerge``),
what the factored path carries in the kernel's place, how they are
partitioned, and what a saved file must agree on. A new kind of adapter (a
magnitude vector, a quantized base) is one more :class:`Variant` here.

Four variants exist:

- ``"lora"`` (:class:`LowRank`): ``A [*stack, *in, r]`` and ``B [*stack, r, *out]``
  under the kernel's path, ``W = W0 + s * A @ B``.
- ``"lora"`` with ``Rule.slices`` (:class:`SlicedLowRank`): a fused kernel (GPT-2's ``c_attn``)
  whose adapted output slices each get their own rank-``r`` factors, the others none:
  ``A [*stack, *in, n_adapted * r]``, ``B [*stack, n_adapted * r, *slice_out]``.
- ``"dora"`` (:class:`Dora`): LoRA's factors and a magnitude ``m [*stack, *out]``,
  ``W = m * (W0 + s * A @ B) / ||W0 + s * A @ B||``.
- ``"train"`` (:class:`Full`): a trainable copy of the leaf at its own path,
  which replaces the base value (PEFT's ``modules_to_save``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lora_jax.errors import LoraError
from lora_jax.paths import PathTuple
from lora_jax.plan import Target

A_KEY = "a"
B_KEY = "b"
M_KEY = "m"


class Variant(abc.ABC):
    """What one kind of trainable leaf is. Methods take the :class:`~lora_jax.plan.Target` they serve."""

    mode: ClassVar[str]
    replaces_leaf: ClassVar[bool] = False
    """The variant's value replaces the base leaf rather than adapting it (``describe`` counts it apart)."""

    @abc.abstractmethod
    def leaves(self, target: Target) -> dict[PathTuple, jax.ShapeDtypeStruct]:
        """Return the adapter-tree leaves ``target`` owns, by path, with their shapes and dtypes."""

    @abc.abstractmethod
    def init(self, key: jax.Array, target: Target, base: Any) -> dict[PathTuple, jax.Array]:
        """Return fresh values of :meth:`leaves` for the base leaf ``base``; ``key`` is this path's own."""

    @abc.abstractmethod
    def value(self, target: Target, leaves: Mapping[PathTuple, Any]) -> Any:
        """Gather ``target``'s value from the adapter tree's leaves by path."""

    @abc.abstractmethod
    def apply(self, target: Target, base: Any, value: Any, sign: float) -> jax.Array:
        """Return the base leaf with the adapter added (``sign`` 1) or taken away (``sign`` -1), in its dtype."""

    @abc.abstractmethod
    def factored(self, target: Target, base: Any, value: Any, rng: jax.Array | None) -> Any:
        """Return what the factored path evaluates in place of the base leaf."""

    @abc.abstractmethod
    def partitions(self, target: Target, base: PartitionSpec) -> dict[PathTuple, PartitionSpec]:
        """Return a partition for each of :meth:`leaves`, given the base leaf's (one entry per axis)."""

    @abc.abstractmethod
    def signature(self, target: Target) -> dict[str, Any]:
        """Return the settings a saved value must have been made with: ``{"rank", "scale"}``."""

    @abc.abstractmethod
    def summary(self, target: Target) -> tuple[str, str, str]:
        """Return ``(axes, rank, alpha)`` as ``describe`` shows them."""

    def size(self, target: Target) -> int:
        """Return the number of trainable scalars ``target`` owns."""
        return sum(math.prod(leaf.shape) for leaf in self.leaves(target).values())


class LowRank(Variant):
    """``W = W0 + s * A @ B`` with ``A [*stack, *in, r]`` random and ``B [*stack, r, *out]`` zero."""

    mode = "lora"

    def leaves(self, target: Target) -> dict[PathTuple, jax.ShapeDtypeStruct]:
        dtype = jnp.dtype(target.rule.dtype)
        return {
            (*target.path, A_KEY): jax.ShapeDtypeStruct(target.a_shape, dtype),
            (*target.path, B_KEY): jax.ShapeDtypeStruct(target.b_shape, dtype),
        }

    def init(self, key: jax.Array, target: Target, base: Any) -> dict[PathTuple, jax.Array]:
        rule, layout = target.rule, target.layout
        assert layout is not None
        shape, dtype = target.a_shape, jnp.dtype(rule.dtype)
        if rule.init == "gaussian":
            std = rule.init_std if rule.init_std is not None else 1.0 / rule.rank
            a = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        else:
            # PEFT and loralib: kaiming_uniform_(a=sqrt(5)) on [r, fan_in] gives bound 1/sqrt(fan_in).
            bound = 1.0 / math.sqrt(layout.in_size)
            a = jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
        return {(*target.path, A_KEY): a, (*target.path, B_KEY): jnp.zeros(target.b_shape, dtype)}

    def value(self, target: Target, leaves: Mapping[PathTuple, Any]) -> tuple[Any, ...]:
        return leaves[(*target.path, A_KEY)], leaves[(*target.path, B_KEY)]

    def apply(self, target: Target, base: Any, value: Any, sign: float) -> jax.Array:
        assert target.layout is not None
        base = jnp.asarray(base)
        a, b = value
        update = (sign * target.rule.scale) * target.layout.delta(a, b)
        return (base.astype(jnp.float32) + update).astype(base.dtype)

    def factored(self, target: Target, base: Any, value: Any, rng: jax.Array | None) -> Any:
        from lora_jax.factored.kernel import low_rank_kernel  # the interpreter imports the adapters, which import this

        a, b = value
        return low_rank_kernel(target, base, a, b, rng)

    def partitions(self, target: Target, base: PartitionSpec) -> dict[PathTuple, PartitionSpec]:
        # A keeps W's stack and input entries, B its stack and output entries; the rank axis is
        # replicated, so A @ B comes out laid out like W.
        layout = target.layout
        assert layout is not None
        entries = list(base)
        stack = [entries[a] for a in layout.stack]
        return {
            (*target.path, A_KEY): PartitionSpec(*stack, *(entries[a] for a in layout.inputs), None),
            (*target.path, B_KEY): PartitionSpec(*stack, None, *(entries[a] for a in layout.outputs)),
        }

    def signature(self, target: Target) -> dict[str, Any]:
        layout = target.layout
        assert layout is not None
        # The axes too: a square kernel read with its input and output axes swapped has the same factor shapes.
        axes = f"stack{layout.stack} in{layout.inputs} out{layout.outputs}"
        return {"rank": target.rule.rank, "scale": target.rule.scale, "axes": axes}

    def summary(self, target: Target) -> tuple[str, str, str]:
        layout = target.layout
        assert layout is not None
        axes = f"stack{layout.stack} in{layout.inputs} out{layout.outputs}"
        axes += " (inferred)" if layout.inferred else ""
        return axes, str(target.rule.rank), f"{target.rule.alpha:g}"


class SlicedLowRank(LowRank):
    """Separate rank-``r`` adapters on some output slices of a fused kernel (loralib's ``MergedLinear``).

    A fused kernel ``W [*stack, *in, *out]`` holds ``n`` equal slices side by side along one output axis
    (GPT-2's ``c_attn``: q, k and v). Each adapted slice ``j`` has its own ``A_j [*stack, *in, r]`` and
    ``B_j [*stack, r, *slice_out]``, stored stacked along the rank axis in the order of the rule's ``slices``:
    ``A [*stack, *in, n_adapted * r]``, ``B [*stack, n_adapted * r, *slice_out]``. :meth:`value` places each
    ``B_j`` at its slice of a zero ``[*stack, n_adapted * r, *out]``, so ``A @ B`` is ``A_j @ B_j`` on slice
    ``j``, exactly what a separate LoRA on that projection gives, and zero on every other slice: no parameter
    reaches those columns, so neither ``combine``, ``merge``, the factored path nor any gradient step can
    change them. Everything else (init, apply, the factored value) is :class:`LowRank`'s on those factors.
    """

    def value(self, target: Target, leaves: Mapping[PathTuple, Any]) -> tuple[Any, ...]:
        a, b = super().value(target, leaves)
        return a, self.expand(target, b)

    @staticmethod
    def expand(target: Target, b: Any) -> jax.Array:
        """Return ``B [*stack, n_adapted * r, *slice_out]`` laid out as ``[*stack, n_adapted * r, *out]``.

        Rank block ``j`` sits at the slice of ``target.slices.adapted[j]``; every other entry is zero.
        """
        slices, layout = target.slices, target.layout
        assert slices is not None and layout is not None
        b = jnp.asarray(b)
        rank, stack = target.rule.rank, len(layout.stack)
        axis = stack + 1 + slices.out_position(layout)  # the slice axis of B
        blocks = []
        for j, position in enumerate(slices.adapted):
            block = jax.lax.slice_in_dim(b, j * rank, (j + 1) * rank, axis=stack)
            pad = [(0, 0)] * b.ndim
            pad[axis] = (position * slices.size, (len(slices.names) - position - 1) * slices.size)
            blocks.append(jnp.pad(block, pad))
        return jnp.concatenate(blocks, axis=stack)

    @staticmethod
    def contract(target: Target, b: np.ndarray) -> tuple[np.ndarray, tuple[int, ...] | None]:
        """Return :meth:`expand`'s inverse: ``B [*stack, n_adapted * r, *out]`` to ``[*stack, n_adapted * r,
        *slice_out]``, with the index of the first entry off the slice blocks that is not zero (None if none is).

        A ``B`` with such an entry is no set of slice adapters: it reaches a slice that is not its block's.
        """
        slices, layout = target.slices, target.layout
        assert slices is not None and layout is not None
        rank, stack = target.rule.rank, len(layout.stack)
        axis = stack + 1 + slices.out_position(layout)
        blocks, rest = [], np.array(b, copy=True)
        for j, position in enumerate(slices.adapted):
            index = [slice(None)] * b.ndim
            index[stack] = slice(j * rank, (j + 1) * rank)
            index[axis] = slice(position * slices.size, (position + 1) * slices.size)
            blocks.append(b[tuple(index)])
            rest[tuple(index)] = 0
        stray = np.argwhere(rest != 0)
        return np.concatenate(blocks, axis=stack), (tuple(int(i) for i in stray[0]) if len(stray) else None)

    def partitions(self, target: Target, base: PartitionSpec) -> dict[PathTuple, PartitionSpec]:
        # As LowRank's, but B's slice axis holds one slice, not the kernel's whole axis: it is replicated.
        out = super().partitions(target, base)
        slices, layout = target.slices, target.layout
        assert slices is not None and layout is not None
        b_path = (*target.path, B_KEY)
        entries = list(out[b_path])
        entries[len(layout.stack) + 1 + slices.out_position(layout)] = None
        return {**out, b_path: PartitionSpec(*entries)}

    def signature(self, target: Target) -> dict[str, Any]:
        slices = target.slices
        assert slices is not None
        adapted = [slices.names[i] for i in slices.adapted]
        return {**super().signature(target), "slices": list(slices.names), "adapt": adapted, "slice_axis": slices.axis}

    def summary(self, target: Target) -> tuple[str, str, str]:
        axes, rank, alpha = super().summary(target)
        slices = target.slices
        assert slices is not None
        adapted = ",".join(slices.names[i] for i in slices.adapted)
        return f"{axes} slices {'|'.join(slices.names)} of axis {slices.axis}", f"{rank} on {adapted}", alpha


class Dora(LowRank):
    """DoRA (Liu et al. 2024): ``W = m * (W0 + s A @ B) / ||W0 + s A @ B||``, one norm per output column.

    The magnitude ``m [*stack, *out]`` starts at ``||W0||``, so training starts at the base. The norm is
    taken over the input axes and treated as a constant under differentiation (the paper's and PEFT's
    choice), in ``combine``, ``merge`` and the factored path alike.
    """

    mode = "dora"

    def leaves(self, target: Target) -> dict[PathTuple, jax.ShapeDtypeStruct]:
        layout = target.layout
        assert layout is not None
        magnitude = jax.ShapeDtypeStruct((*layout.stack_shape, *layout.out_shape), jnp.dtype(target.rule.dtype))
        return {**super().leaves(target), (*target.path, M_KEY): magnitude}

    def init(self, key: jax.Array, target: Target, base: Any) -> dict[PathTuple, jax.Array]:
        fresh = super().init(key, target, base)
        norm = self._column_norm(target, jnp.asarray(base, jnp.float32))
        return {**fresh, (*target.path, M_KEY): norm.astype(jnp.dtype(target.rule.dtype))}

    def value(self, target: Target, leaves: Mapping[PathTuple, Any]) -> tuple[Any, Any, Any]:
        return (*super().value(target, leaves), leaves[(*target.path, M_KEY)])

    def apply(self, target: Target, base: Any, value: Any, sign: float) -> jax.Array:
        if sign < 0:
            raise LoraError(
                f"{target.name}: a DoRA merge cannot be undone (the merged kernel no longer holds the "
                "norm it was divided by); keep the base tree and merge again instead"
            )
        base = jnp.asarray(base)
        a, b, m = value
        weight = self._weight(target, base, a, b)
        return (weight * self._laid_out(target, self._gain(target, weight, m))).astype(base.dtype)

    def factored(self, target: Target, base: Any, value: Any, rng: jax.Array | None) -> Any:
        from lora_jax.factored.kernel import low_rank_kernel  # the interpreter imports the adapters, which import this

        a, b, _ = value
        # The norm needs W0 + s A @ B once per step (as in PEFT); the matmuls stay factored.
        return low_rank_kernel(target, base, a, b, rng, self.gain(target, base, value))

    def gain(self, target: Target, base: Any, value: Any) -> jax.Array:
        """Return ``m / ||W0 + s A @ B||`` ``[*stack, *out]``: the factor on each output column of ``W0 + s A @ B``.

        Args:
          target: the kernel's plan entry.
          base: ``W0``, laid out as ``target.shape``.
          value: ``(A, B, m)`` as :meth:`value` gathers it.
        """
        a, b, m = value
        return self._gain(target, self._weight(target, jnp.asarray(base), a, b), m)

    @staticmethod
    def _weight(target: Target, base: jax.Array, a: Any, b: Any) -> jax.Array:
        """Return ``W0 + s A @ B`` in float32, laid out as ``target.shape``."""
        assert target.layout is not None
        return base.astype(jnp.float32) + target.rule.scale * target.layout.delta(a, b)

    def partitions(self, target: Target, base: PartitionSpec) -> dict[PathTuple, PartitionSpec]:
        layout = target.layout
        assert layout is not None
        entries = list(base)
        magnitude = PartitionSpec(*(entries[a] for a in layout.stack), *(entries[a] for a in layout.outputs))
        return {**super().partitions(target, base), (*target.path, M_KEY): magnitude}

    def summary(self, target: Target) -> tuple[str, str, str]:
        axes, rank, alpha = super().summary(target)
        return axes, f"{rank} (DoRA)", alpha

    @staticmethod
    def _column_norm(target: Target, weight: jax.Array) -> jax.Array:
        """Return ``||weight||`` over the input axes, ``[*stack, *out]`` in the layout's role order."""
        layout = target.layout
        assert layout is not None
        ordered = jnp.transpose(weight, (*layout.stack, *layout.inputs, *layout.outputs))
        n_stack, n_in = len(layout.stack), len(layout.inputs)
        return jnp.sqrt(jnp.sum(ordered * ordered, axis=tuple(range(n_stack, n_stack + n_in))))

    def _gain(self, target: Target, weight: jax.Array, m: jax.Array) -> jax.Array:
        """Return ``m / ||weight||`` ``[*stack, *out]``, the norm held constant under differentiation."""
        norm = jax.lax.stop_gradient(self._column_norm(target, weight))
        return m.astype(jnp.float32) / norm

    @staticmethod
    def _laid_out(target: Target, gain: jax.Array) -> jax.Array:
        """Broadcast ``gain [*stack, *out]`` against the kernel in its own axis order."""
        layout = target.layout
        assert layout is not None
        ndim = len(target.shape)
        shape = [1] * ndim
        for axis in (*layout.stack, *layout.outputs):
            shape[axis] = target.shape[axis]
        # gain's axes are (stack..., outputs...) in role order; move them to the kernel's own order.
        kernel_axes = (*layout.stack, *layout.outputs)
        order = sorted(range(len(kernel_axes)), key=lambda i: kernel_axes[i])
        return jnp.transpose(gain, order).reshape(shape)


class Full(Variant):
    """A trainable copy of the whole leaf, which replaces the base value."""

    mode = "train"
    replaces_leaf = True

    def leaves(self, target: Target) -> dict[PathTuple, jax.ShapeDtypeStruct]:
        return {target.path: jax.ShapeDtypeStruct(target.shape, target.dtype)}

    def init(self, key: jax.Array, target: Target, base: Any) -> dict[PathTuple, jax.Array]:
        return {target.path: jnp.array(base)}

    def value(self, target: Target, leaves: Mapping[PathTuple, Any]) -> Any:
        return leaves[target.path]

    def apply(self, target: Target, base: Any, value: Any, sign: float) -> Any:
        # Unmerging cannot recover the base value the trained one replaced, so it stays. The base
        # is not read otherwise: it may be a ShapeDtypeStruct (full fine-tuning keeps one copy).
        return jnp.asarray(value).astype(target.dtype) if sign > 0 else base

    def factored(self, target: Target, base: Any, value: Any, rng: jax.Array | None) -> jax.Array:
        return jnp.asarray(value).astype(target.dtype)

    def partitions(self, target: Target, base: PartitionSpec) -> dict[PathTuple, PartitionSpec]:
        return {target.path: base}

    def signature(self, target: Target) -> dict[str, Any]:
        return {"rank": None, "scale": None}

    def summary(self, target: Target) -> tuple[str, str, str]:
        return "-", "full", "-"


VARIANTS: Mapping[str, Variant] = {variant.mode: variant for variant in (LowRank(), Dora(), Full())}
"""Each trainable mode's variant; ``"freeze"`` has none, since it makes no target."""

SLICED = SlicedLowRank()
"""The variant of a ``"lora"`` rule with ``slices`` (a fused kernel adapted slice by slice)."""


def variant_of(target: Target) -> Variant:
    """Return the variant of ``target``'s rule: by its mode, or :data:`SLICED` for a rule with slices."""
    if target.slices is not None:
        return SLICED
    return VARIANTS[target.rule.mode]
