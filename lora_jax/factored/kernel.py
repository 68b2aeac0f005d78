"""The value carried for an adapted kernel on the factored path: ``W0`` beside ``A`` and ``B``."""

from __future__ import annotations

import dataclasses
import string

import jax
import jax.numpy as jnp

from lora_jax.paths import path_hash
from lora_jax.plan import Target

AxisRole = tuple[str, int]
"""An axis of the current kernel value: ``("s", i)`` stack axis i, ``("i", j)`` input j, ``("o", k)`` output k."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankKernel:
    """A kernel ``W = W0 + scale * A @ B`` carried in factored form.

    Attributes:
      base: ``W0`` after the casts and transposes applied so far.
      a: ``A [*stack, *in, r]``.
      b: ``B [*stack, r, *out]``.
      rng: the dropout key of this kernel (already folded with its path), or None outside training.
      roles: for each axis of ``base``, the axis of ``A`` or ``B`` it corresponds to.
      scale: the rule's scaling ``s``.
      dropout: the rule's LoRA dropout rate.
      name: the kernel's path, for warnings.
      output_scale: a factor per output column ``[*stack, *out]`` that multiplies the whole kernel
        (DoRA's ``m / ||W0 + s A B||``), or None.
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    rng: jax.Array | None
    roles: tuple[AxisRole, ...] = dataclasses.field(metadata=dict(static=True))
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True))
    name: str = dataclasses.field(metadata=dict(static=True))
    output_scale: jax.Array | None = None

    @property
    def n_stack(self) -> int:
        """Return the number of stack axes."""
        return sum(1 for role, _ in self.roles if role == "s")

    def subscripts(self, letters: dict[int, str]) -> tuple[str, str]:
        """Return the einsum subscripts of ``A`` and ``B`` given a letter per current axis (``R`` is the rank)."""
        by_role = {role: letters[axis] for axis, role in enumerate(self.roles)}
        stack = "".join(by_role[("s", i)] for i in range(self.n_stack))
        n_in = self.a.ndim - self.n_stack - 1
        n_out = self.b.ndim - self.n_stack - 1
        a_sub = stack + "".join(by_role[("i", j)] for j in range(n_in)) + "R"
        b_sub = stack + "R" + "".join(by_role[("o", k)] for k in range(n_out))
        return a_sub, b_sub

    def output_subscripts(self, letters: dict[int, str]) -> str:
        """Return the einsum subscripts of ``output_scale [*stack, *out]`` given a letter per current axis."""
        by_role = {role: letters[axis] for axis, role in enumerate(self.roles)}
        n_out = self.b.ndim - self.n_stack - 1
        return "".join(by_role[("s", i)] for i in range(self.n_stack)) + "".join(
            by_role[("o", k)] for k in range(n_out)
        )

    def materialize(self) -> jax.Array:
        """Return ``W0 + scale * A @ B`` (times ``output_scale``) in the current layout and dtype, in float32."""
        letters = {axis: string.ascii_lowercase[axis] for axis in range(self.base.ndim)}
        a_sub, b_sub = self.subscripts(letters)
        out = "".join(letters[axis] for axis in range(self.base.ndim))
        delta = jnp.einsum(f"{a_sub},{b_sub}->{out}", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        weight = self.base.astype(jnp.float32) + self.scale * delta
        if self.output_scale is not None:
            g_sub = self.output_subscripts(letters)
            weight = jnp.einsum(f"{out},{g_sub}->{out}", weight, self.output_scale.astype(jnp.float32))
        return weight.astype(self.base.dtype)

    def dropout_input(self, x: jax.Array, use: int) -> jax.Array:
        """Return ``x`` with LoRA dropout (inverted scaling) for the ``use``-th kernel use; ``x`` as is without RNG."""
        if self.rng is None or self.dropout == 0.0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(self.rng, use), 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))


def low_rank_kernel(
    target: Target,
    base: jax.Array,
    a: jax.Array,
    b: jax.Array,
    rng: jax.Array | None,
    output_scale: jax.Array | None = None,
) -> LowRankKernel:
    """Build the factored value of an adapted kernel.

    Args:
      target: the kernel's plan entry; its ``layout`` must not be None (an adapted kernel, not a trainable leaf).
      base: ``W0``, laid out as ``target.shape``.
      a: ``A [*stack, *in, r]``.
      b: ``B [*stack, r, *out]``.
      rng: the step's dropout key, or None; it is folded with the kernel's path so each kernel draws its own mask.
      output_scale: ``[*stack, *out]``, a factor per output column of the whole kernel, or None.

    Returns:
      The :class:`LowRankKernel` with its axis roles taken from the layout and scale and dropout from the rule.
    """
    layout = target.layout
    assert layout is not None
    roles: list[AxisRole] = [("s", 0)] * len(target.shape)
    for group, axes in (("s", layout.stack), ("i", layout.inputs), ("o", layout.outputs)):
        for position, axis in enumerate(axes):
            roles[axis] = (group, position)
    if rng is not None:
        rng = jax.random.fold_in(rng, path_hash(target.name))
    rule = target.rule
    return LowRankKernel(
        jnp.asarray(base), a, b, rng, tuple(roles), rule.scale, rule.dropout, target.name, output_scale
    )
