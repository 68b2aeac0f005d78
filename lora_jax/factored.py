"""The factored path: ``x W0 + s * dropout(x) A B``, never forming ``W0 + A @ B``.

``factored(fn, spec)`` turns a function of a param tree into one of
``(params, lora, *args)``. It traces ``fn`` to a jaxpr with the public
``jax.make_jaxpr`` and evaluates it again, equation by equation, carrying each
adapted kernel as a :class:`LowRankKernel` (``W0``, ``A``, ``B``) instead of an
array. Where a kernel meets an operation that has a low-rank form
(``dot_general`` for Dense/DenseGeneral/Einsum, ``conv_general_dilated`` for
Conv, ``gather`` for Embed) the low-rank branch is computed beside the frozen
one; ``jit`` calls are inlined, and ``scan`` (``nn.scan``), ``cond``/``switch``
and ``checkpoint`` (``nn.remat``) are re-issued through ``jax.lax`` and
``jax.checkpoint`` with the rewrite inside. Anything else that touches an
adapted kernel gets the materialized ``W0 + s * A @ B`` (as ``combine`` would
give) and a warning naming the path, so results stay right.

Because ``W0`` only ever enters as a closed-over constant, ``jax.grad`` with
respect to ``lora`` computes no kernel-sized gradient.
"""

from __future__ import annotations

import dataclasses
import string
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from lora_jax.adapters import resolve
from lora_jax.paths import flatten, path_hash
from lora_jax.plan import Target, abstract_leaf
from lora_jax.spec import LoraSpec

# An axis of the current kernel value: ("s", i) stack position i, ("i", j) input j, ("o", k) output k.
AxisRole = tuple[str, int]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankKernel:
    """A kernel ``W = W0 + scale * A @ B`` carried in factored form.

    ``base`` is ``W0`` after the casts and transposes applied so far; ``roles``
    says, for each of its axes, which axis of ``A [*stack, *in, r]`` or
    ``B [*stack, r, *out]`` it corresponds to.
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    rng: jax.Array | None
    roles: tuple[AxisRole, ...] = dataclasses.field(metadata=dict(static=True))
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True))
    name: str = dataclasses.field(metadata=dict(static=True))

    @property
    def n_stack(self) -> int:
        return sum(1 for role, _ in self.roles if role == "s")

    def subscripts(self, letters: dict[int, str]) -> tuple[str, str]:
        """Einsum subscripts of ``A`` and ``B`` given a letter per current axis (``R`` is the rank)."""
        by_role = {role: letters[axis] for axis, role in enumerate(self.roles)}
        stack = "".join(by_role[("s", i)] for i in range(self.n_stack))
        n_in = self.a.ndim - self.n_stack - 1
        n_out = self.b.ndim - self.n_stack - 1
        a_sub = stack + "".join(by_role[("i", j)] for j in range(n_in)) + "R"
        b_sub = stack + "R" + "".join(by_role[("o", k)] for k in range(n_out))
        return a_sub, b_sub

    def materialize(self) -> jax.Array:
        """``W0 + scale * A @ B`` in the current layout and dtype, accumulated in float32."""
        letters = {axis: string.ascii_lowercase[axis] for axis in range(self.base.ndim)}
        a_sub, b_sub = self.subscripts(letters)
        out = "".join(letters[axis] for axis in range(self.base.ndim))
        delta = jnp.einsum(f"{a_sub},{b_sub}->{out}", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return (self.base.astype(jnp.float32) + self.scale * delta).astype(self.base.dtype)

    def dropout_input(self, x: jax.Array, use: int) -> jax.Array:
        """LoRA dropout on the adapter's input (inverted scaling), only when an RNG is given."""
        if self.rng is None or self.dropout == 0.0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(self.rng, use), 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))


def _fallback(kernel: LowRankKernel, why: str) -> jax.Array:
    warnings.warn(
        f"lora_jax.factored: {kernel.name}: {why}; using the materialized W0 + s*A@B (as combine) there",
        stacklevel=2,
    )
    return kernel.materialize()


def _value(env: dict, var: Any) -> Any:
    if isinstance(var, jcore.Literal):
        return var.val
    return env[var]


def _run_plain(eqn: Any, values: list[Any], debug_info: Any) -> list[Any]:
    """Evaluate one equation as it stands, as a one-equation jaxpr."""
    invars, inputs, seen = [], [], set()
    for var, value in zip(eqn.invars, values):
        if not isinstance(var, jcore.Literal) and var not in seen:
            seen.add(var)
            invars.append(var)
            inputs.append(value)
    info = debug_info._replace(arg_names=None, result_paths=None) if debug_info is not None else None
    jaxpr = jcore.Jaxpr([], invars, eqn.outvars, [eqn], effects=eqn.effects, debug_info=info)
    return list(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, []))(*inputs))


class _Evaluator:
    """Evaluates a jaxpr with some inputs in factored form; counts kernel uses for dropout keys."""

    def __init__(self, debug_info: Any) -> None:
        self.uses = 0
        self.debug_info = debug_info

    def next_use(self) -> int:
        self.uses += 1
        return self.uses

    def run(self, jaxpr: Any, consts: list[Any], args: list[Any]) -> list[Any]:
        env: dict = {}
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for eqn in jaxpr.eqns:
            values = [_value(env, v) for v in eqn.invars]
            if any(isinstance(v, LowRankKernel) for v in values):
                outs = self.rewrite(eqn, values)
            else:
                outs = _run_plain(eqn, values, self.debug_info)
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [self.concrete(_value(env, v), "it is an output") for v in jaxpr.outvars]

    @staticmethod
    def concrete(value: Any, why: str) -> Any:
        return _fallback(value, why) if isinstance(value, LowRankKernel) else value

    def rewrite(self, eqn: Any, values: list[Any]) -> list[Any]:
        name, params = eqn.primitive.name, eqn.params
        if name == "convert_element_type":
            (w,) = values
            return [dataclasses.replace(w, base=w.base.astype(params["new_dtype"]))]
        if name == "transpose":
            (w,) = values
            perm = params["permutation"]
            return [dataclasses.replace(w, base=jnp.transpose(w.base, perm), roles=tuple(w.roles[p] for p in perm))]
        if name == "dot_general":
            out = self.dot_general(eqn, values)
            if out is not None:
                return [out]
        elif name == "conv_general_dilated":
            out = self.conv(eqn, values)
            if out is not None:
                return [out]
        elif name == "gather":
            out = self.gather(eqn, values)
            if out is not None:
                return [out]
        elif name in ("pjit", "jit", "closed_call", "core_call") and "jaxpr" in params:
            closed = params["jaxpr"]
            return self.run(closed.jaxpr, list(closed.consts), values)
        elif name in ("remat2", "checkpoint"):
            return self.remat(eqn, values)
        elif name == "cond":
            return self.cond(eqn, values)
        elif name == "scan":
            out = self.scan(eqn, values)
            if out is not None:
                return out
        concrete = [self.concrete(v, f"it meets `{name}`, which has no low-rank form here") for v in values]
        return _run_plain(eqn, concrete, self.debug_info)

    # --- operations with a low-rank form -------------------------------------------------

    def dot_general(self, eqn: Any, values: list[Any]) -> jax.Array | None:
        lhs, rhs = values
        if isinstance(lhs, LowRankKernel) and isinstance(rhs, LowRankKernel):
            return None
        w_side = 0 if isinstance(lhs, LowRankKernel) else 1
        w, x = (lhs, rhs) if w_side == 0 else (rhs, lhs)
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        w_contract, x_contract = (lc, rc) if w_side == 0 else (rc, lc)
        w_batch, x_batch = (lb, rb) if w_side == 0 else (rb, lb)
        w_free = [a for a in range(w.base.ndim) if a not in w_contract and a not in w_batch]
        x_free = [a for a in range(x.ndim) if a not in x_contract and a not in x_batch]
        contract_roles = {w.roles[a][0] for a in w_contract}
        free_roles = {w.roles[a][0] for a in w_free}
        if len(contract_roles) != 1 or contract_roles == {"s"} or free_roles != {"i", "o"} - contract_roles:
            return None
        if any(w.roles[a][0] != "s" for a in w_batch) or len(w_batch) != w.n_stack:
            return None

        letters = iter(string.ascii_letters.replace("R", ""))
        x_letters = {a: next(letters) for a in range(x.ndim)}
        w_letters = {}
        for wa, xa in zip(w_contract, x_contract):
            w_letters[wa] = x_letters[xa]
        for wa, xa in zip(w_batch, x_batch):
            w_letters[wa] = x_letters[xa]
        for wa in w_free:
            w_letters[wa] = next(letters)
        batch = "".join(x_letters[a] for a in x_batch)
        x_sub = "".join(x_letters[a] for a in range(x.ndim))
        free_x = "".join(x_letters[a] for a in x_free)
        free_w = "".join(w_letters[a] for a in w_free)
        out_sub = batch + (free_w + free_x if w_side == 0 else free_x + free_w)
        a_sub, b_sub = w.subscripts(w_letters)
        first, first_sub, second, second_sub = (
            (w.a, a_sub, w.b, b_sub) if contract_roles == {"i"} else (w.b, b_sub, w.a, a_sub)
        )
        hidden = batch + free_x + "R"
        compute = first.dtype
        x_in = w.dropout_input(x, self.next_use()).astype(compute)
        h = jnp.einsum(f"{x_sub},{first_sub}->{hidden}", x_in, first, precision=eqn.params.get("precision"))
        low = jnp.einsum(f"{hidden},{second_sub}->{out_sub}", h, second.astype(compute))
        base_out = _run_plain(eqn, [w.base, x] if w_side == 0 else [x, w.base], self.debug_info)[0]
        return base_out + (w.scale * low).astype(base_out.dtype)

    def conv(self, eqn: Any, values: list[Any]) -> jax.Array | None:
        x, w = values
        p = eqn.params
        if isinstance(x, LowRankKernel) or w.n_stack or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            return None
        dn = p["dimension_numbers"]
        out_dim, out_feature = dn.rhs_spec[0], dn.out_spec[1]
        if w.roles[out_dim][0] != "o" or sum(1 for r, _ in w.roles if r == "o") != 1:
            return None
        # A laid out as a conv kernel whose output-feature axis holds the rank.
        perm = [w.roles[axis][1] if axis != out_dim else w.a.ndim - 1 for axis in range(w.base.ndim)]
        a_kernel = jnp.transpose(w.a, perm)
        x_in = w.dropout_input(x, self.next_use()).astype(w.a.dtype)
        h = jax.lax.conv_general_dilated(
            x_in,
            a_kernel,
            window_strides=p["window_strides"],
            padding=p["padding"],
            lhs_dilation=p["lhs_dilation"],
            rhs_dilation=p["rhs_dilation"],
            dimension_numbers=dn,
            precision=p["precision"],
        )
        low = jnp.moveaxis(
            jnp.tensordot(jnp.moveaxis(h, out_feature, -1), w.b.astype(h.dtype), axes=1), -1, out_feature
        )
        base_out = _run_plain(eqn, [x, w.base], self.debug_info)[0]
        return base_out + (w.scale * low).astype(base_out.dtype)

    def gather(self, eqn: Any, values: list[Any]) -> jax.Array | None:
        w, indices = values
        if isinstance(indices, LowRankKernel) or w.base.ndim != 2 or w.roles != (("i", 0), ("o", 0)):
            return None
        p = eqn.params
        dn = p["dimension_numbers"]
        if tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,) or len(dn.offset_dims) != 1:
            return None
        if tuple(p["slice_sizes"]) != (1, w.base.shape[1]):
            return None
        rank = w.a.shape[-1]
        rows = jax.lax.gather(
            w.a,
            indices,
            dimension_numbers=dn,
            slice_sizes=(1, rank),
            indices_are_sorted=p["indices_are_sorted"],
            unique_indices=p["unique_indices"],
            mode=p["mode"],
            fill_value=p["fill_value"],
        )
        offset = dn.offset_dims[0]
        low = jnp.moveaxis(jnp.tensordot(jnp.moveaxis(rows, offset, -1), w.b.astype(rows.dtype), axes=1), -1, offset)
        base_out = _run_plain(eqn, [w.base, indices], self.debug_info)[0]
        return base_out + (w.scale * low).astype(base_out.dtype)

    # --- control flow ---------------------------------------------------------------------

    def remat(self, eqn: Any, values: list[Any]) -> list[Any]:
        p = eqn.params

        def body(*args: Any) -> list[Any]:
            return self.run(p["jaxpr"], [], list(args))

        return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*values))

    def cond(self, eqn: Any, values: list[Any]) -> list[Any]:
        index, operands = values[0], values[1:]

        def branch(closed: Any) -> Callable[..., list[Any]]:
            return lambda *ops: self.run(closed.jaxpr, list(closed.consts), list(ops))

        return list(jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], *operands))

    def scan(self, eqn: Any, values: list[Any]) -> list[Any] | None:
        p = eqn.params
        n_consts, n_carry = p["num_consts"], p["num_carry"]
        consts, carry, xs = values[:n_consts], values[n_consts : n_consts + n_carry], values[n_consts + n_carry :]
        if any(isinstance(c, LowRankKernel) for c in carry):
            return None
        sliced: dict[int, tuple[Any, ...]] = {}
        for i, x in enumerate(xs):
            if not isinstance(x, LowRankKernel):
                continue
            role, position = x.roles[0]
            if role != "s":
                return None
            # Slice the factors along the same stack axis as W0's leading axis.
            rng = None if x.rng is None else jax.random.split(x.rng, p["length"])
            inner_roles = tuple((r, k - (r == "s" and k > position)) for r, k in x.roles[1:])
            sliced[i] = (inner_roles, x)
            xs[i] = (x.base, jnp.moveaxis(x.a, position, 0), jnp.moveaxis(x.b, position, 0), rng)
        closed = p["jaxpr"]

        def body(carry: list[Any], xs_t: list[Any]) -> tuple[list[Any], list[Any]]:
            xs_t = list(xs_t)
            for i, (roles, x) in sliced.items():
                base, a, b, rng = xs_t[i]
                xs_t[i] = LowRankKernel(base, a, b, rng, roles, x.scale, x.dropout, x.name)
            outs = self.run(closed.jaxpr, list(closed.consts), [*consts, *carry, *xs_t])
            return outs[:n_carry], outs[n_carry:]

        carry_out, ys = jax.lax.scan(
            body, list(carry), xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
        )
        return [*carry_out, *ys]


def _kernel(target: Target, base: jax.Array, a: jax.Array, b: jax.Array, rng: jax.Array | None) -> LowRankKernel:
    layout = target.layout
    assert layout is not None
    roles: list[AxisRole] = [("s", 0)] * len(target.shape)
    for group, axes in (("s", layout.stack), ("i", layout.inputs), ("o", layout.outputs)):
        for position, axis in enumerate(axes):
            roles[axis] = (group, position)
    if rng is not None:
        rng = jax.random.fold_in(rng, path_hash(target.name))
    rule = target.rule
    return LowRankKernel(jnp.asarray(base), a, b, rng, tuple(roles), rule.scale, rule.dropout, target.name)


def factored(fn: Callable[..., Any], spec: LoraSpec) -> Callable[..., Any]:
    """Wrap ``fn(params, *args)`` to run with adapters in factored form.

    Args:
      fn: a function whose first argument is the base param tree; static
        options (``deterministic``, ``train``) belong in its closure.
      spec: the spec the adapters were made with.

    Returns:
      ``g(params, lora, *args, dropout_rng=None)`` equal to
      ``fn(combine(params, lora, spec), *args)`` (to float rounding) when
      ``dropout_rng`` is None; with an RNG key, LoRA dropout is applied to each
      adapter's input at its rule's rate (training).
    """

    def wrapped(params: Any, lora: Any, *args: Any, dropout_rng: jax.Array | None = None) -> Any:
        pairs = resolve(params, lora, spec)
        flat_params, treedef = flatten(params)
        leaves = [leaf for _, leaf in flat_params]
        index = {path: i for i, (path, _) in enumerate(flat_params)}
        inputs: list[Any] = list(leaves)
        for target, value in pairs:
            i = index[target.path]
            if target.layout is None:
                inputs[i] = jnp.asarray(value).astype(target.dtype)
            else:
                inputs[i] = _kernel(target, leaves[i], *value, dropout_rng)

        def flat_fn(param_leaves: list[Any], args: tuple[Any, ...]) -> Any:
            return fn(jax.tree_util.tree_unflatten(treedef, param_leaves), *args)

        abstract = [abstract_leaf(x) for x in leaves]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(abstract, args)
        arg_leaves = jax.tree_util.tree_leaves(args)
        outs = _Evaluator(getattr(closed.jaxpr, "debug_info", None)).run(
            closed.jaxpr, list(closed.consts), [*inputs, *arg_leaves]
        )
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
