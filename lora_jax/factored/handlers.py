"""One handler per primitive that has a low-rank form, and the default ``{primitive name: handler}`` table.

A handler is called for an equation at least one of whose inputs is a :class:`LowRankKernel`, as
``handler(interpreter, eqn, values)``, where ``values`` holds the equation's inputs (arrays or kernels). It
returns the equation's outputs, or None when it has no low-rank form for this equation: then the interpreter
materializes every kernel input (``W0 + s * A @ B``, as ``combine``), warns with the kernel's path, and runs the
equation as it stands. A handler that falls back says why with ``return interp.decline(kernel, "...")``: the
warning then names the axis at fault and what to change in the rule. Handlers call back into the interpreter
for the frozen branch (``run_plain``), for sub-jaxprs (``run``) and for the dropout key of each kernel use
(``next_use``).
"""

from __future__ import annotations

import dataclasses
import functools
import string
import types
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from lora_jax.factored.kernel import LowRankKernel

if TYPE_CHECKING:
    from lora_jax.factored.interpret import Interpreter

Handler = Callable[["Interpreter", jcore.JaxprEqn, list[Any]], "list[Any] | None"]
"""``(interpreter, eqn, values) -> outputs``, or None for the materialized fallback."""

MATRIX_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated", "gather"})
"""The primitives that use a kernel as a matrix; a LoRA kernel that meets none of them is no matrix (a bias)."""


# --- layout changes: tracked on the kernel -------------------------------------------------


def convert_element_type(interp: Interpreter, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any] | None:
    """Cast ``W0``; the factors keep their dtype and are cast where they are used."""
    (w,) = values
    return [dataclasses.replace(w, base=interp.cast(w.base, eqn.params["new_dtype"]))]


def transpose(interp: Interpreter, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any] | None:
    """Permute ``W0`` and its axis roles."""
    (w,) = values
    perm = eqn.params["permutation"]
    return [dataclasses.replace(w, base=jnp.transpose(w.base, perm), roles=tuple(w.roles[p] for p in perm))]


# --- operations with a low-rank form -------------------------------------------------------


def _dot_general_problem(
    interp: Interpreter, w: LowRankKernel, contract: Sequence[int], batch: Sequence[int], free: list[int]
) -> str | None:
    """Return why ``w`` has no low-rank form in this ``dot_general`` and what to change, or None when it has.

    It has one when the contraction is over all of the rule's input axes (or all its output axes), the other
    role's axes come out free, and each stack axis is a batch axis (one layer of an ``nn.scan`` stack per step)
    or a free one (a fused kernel such as Gemma's ``qkv_einsum [3, N, D, H]``, whose stack axis comes out as an
    output axis).
    """
    for axis in batch:
        if w.roles[axis][0] != "s":
            return (
                f"{interp.axis_name(w, axis)} is a batch axis of the contraction, so it indexes separate matrices: "
                "give this axis in stack_axes"
            )
    roles = {w.roles[a][0] for a in contract} - {"s"}
    for axis in contract:
        if w.roles[axis][0] == "s":
            instead = "out_axes" if roles == {"o"} else "in_axes"
            return (
                f"{interp.axis_name(w, axis)} is contracted: a stack axis must be a batch or output axis of the "
                f"contraction; give this axis in {instead} instead of stack_axes"
            )
    if not roles:
        return "no axis of the kernel is contracted (an outer product has no low-rank form)"
    if len(roles) == 2:
        names = ", ".join(interp.axis_name(w, a) for a in contract)
        return (
            f"the contraction is over {names}: it must cover all input axes or all output axes of the rule; "
            "give the contracted axes in in_axes and the others in out_axes"
        )
    (role,) = roles
    for axis in free:
        if w.roles[axis][0] == role:
            instead = "out_axes" if role == "i" else "in_axes"
            return (
                f"{interp.axis_name(w, axis)} is not contracted but comes out of the contraction: give this axis "
                f"in {instead} (or in stack_axes if it indexes separate matrices)"
            )
    return None


class LowRankSubscripts(NamedTuple):
    """The einsum subscripts of ``s * (x first) second``: ``x``, the two factors, ``h = x first`` and the output;
    and the ``dot_general``'s precision, which every contraction keeps."""

    x: str
    first: str
    second: str
    hidden: str
    out: str
    precision: Any = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def low_rank_product(
    subscripts: LowRankSubscripts, scale: float, x: jax.Array, first: jax.Array, second: jax.Array
) -> jax.Array:
    """Return ``scale * (x first) second`` by the einsum ``subscripts``; ``h = x first`` is the small ``[.., r]``.

    The backward pass is written out so that every gradient contraction puts the rank-sized operand first:
    left to autodiff, XLA:CPU lays the activation-sized cotangent out again (a transpose copy of ``[.., out]``
    per adapted kernel and step) to compute the gradient of ``second``, and the input ``x`` likewise for
    the gradient of ``first``.
    """
    return _low_rank_forward(subscripts, scale, x, first, second)[0]


def _low_rank_forward(subscripts: LowRankSubscripts, scale: float, x: jax.Array, first: jax.Array, second: jax.Array):
    sub = subscripts
    h = jnp.einsum(f"{sub.x},{sub.first}->{sub.hidden}", x, first, precision=sub.precision)
    h = h * jnp.asarray(scale, h.dtype)
    low = jnp.einsum(f"{sub.hidden},{sub.second}->{sub.out}", h, second, precision=sub.precision)
    return low, (x, first, second, h)


def _low_rank_backward(subscripts: LowRankSubscripts, scale: float, residuals: tuple, g: jax.Array):
    sub = subscripts
    x, first, second, h = residuals
    g = g.astype(h.dtype)
    d_second = jnp.einsum(f"{sub.hidden},{sub.out}->{sub.second}", h, g, precision=sub.precision)
    dh = jnp.einsum(f"{sub.out},{sub.second}->{sub.hidden}", g, second, precision=sub.precision)
    dh = dh * jnp.asarray(scale, dh.dtype)
    # The rank axis comes out first and the barrier keeps XLA from folding the transpose back into the
    # contraction: folded, XLA:CPU lays out a transposed copy of the activation-sized x for it (GPT-2's MLP
    # input, [B*T, 3072] per layer: 12% of an all-linear LoRA step).
    rank_first = "R" + sub.first.replace("R", "")
    d_first = jnp.einsum(f"{sub.hidden},{sub.x}->{rank_first}", dh, x, precision=sub.precision)
    d_first = jnp.einsum(f"{rank_first}->{sub.first}", jax.lax.optimization_barrier(d_first))
    dx = jnp.einsum(f"{sub.hidden},{sub.first}->{sub.x}", dh, first, precision=sub.precision)
    return dx.astype(x.dtype), d_first.astype(first.dtype), d_second.astype(second.dtype)


low_rank_product.defvjp(_low_rank_forward, _low_rank_backward)  # pyright: ignore[reportFunctionMemberAccess]


def dot_general(interp: Interpreter, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any] | None:
    """Compute ``x W0 + s * (dropout(x) A) B`` for Dense, DenseGeneral and Einsum kernels."""
    lhs, rhs = values
    if isinstance(lhs, LowRankKernel) and isinstance(rhs, LowRankKernel):
        for kernel in (lhs, rhs):
            interp.decline(kernel, "both operands are adapted kernels")
        return None
    w_side = 0 if isinstance(lhs, LowRankKernel) else 1
    w, x = (lhs, rhs) if w_side == 0 else (rhs, lhs)
    assert isinstance(w, LowRankKernel) and not isinstance(x, LowRankKernel)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_contract, x_contract = (lc, rc) if w_side == 0 else (rc, lc)
    w_batch, x_batch = (lb, rb) if w_side == 0 else (rb, lb)
    w_free = [a for a in range(w.base.ndim) if a not in w_contract and a not in w_batch]
    x_free = [a for a in range(x.ndim) if a not in x_contract and a not in x_batch]
    problem = _dot_general_problem(interp, w, w_contract, w_batch, w_free)
    if problem is not None:
        return interp.decline(w, problem)
    contract_roles = {w.roles[a][0] for a in w_contract}
    if w.output_scale is not None and contract_roles != {"i"}:
        return interp.decline(w, "a DoRA magnitude on the contracted (output) axes has no low-rank form here")

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
    free_stack = "".join(w_letters[a] for a in w_free if w.roles[a][0] == "s")
    hidden = batch + free_x + free_stack + "R"
    compute = first.dtype
    x_in = w.dropout_input(x, interp.next_use()).astype(compute)
    subscripts = LowRankSubscripts(x_sub, first_sub, second_sub, hidden, out_sub, eqn.params.get("precision"))
    low = cast(jax.Array, low_rank_product(subscripts, w.scale, x_in, first, second.astype(compute)))
    base_out = interp.run_plain(eqn, [w.base, x] if w_side == 0 else [x, w.base])[0]
    out = base_out + low.astype(base_out.dtype)
    if w.output_scale is not None:
        g_sub = w.output_subscripts(w_letters)
        out = jnp.einsum(f"{out_sub},{g_sub}->{out_sub}", out, w.output_scale.astype(out.dtype))
    return [out]


def conv_general_dilated(interp: Interpreter, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any] | None:
    """Convolve with ``A`` laid out as a kernel of ``r`` output features, then apply ``B`` per position (Conv)."""
    x, w = values
    p = eqn.params
    if isinstance(x, LowRankKernel):
        return interp.decline(x, "the kernel is the convolution's input, not its filter")
    if w.n_stack:
        return interp.decline(w, "a stacked convolution filter has no low-rank form here; drop stack_axes")
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return interp.decline(w, "a grouped (or depthwise) convolution has no low-rank form here")
    if w.output_scale is not None:
        return interp.decline(w, "a DoRA convolution filter has no low-rank form here")
    dn = p["dimension_numbers"]
    out_dim, out_feature = dn.rhs_spec[0], dn.out_spec[1]
    if w.roles[out_dim][0] != "o" or sum(1 for r, _ in w.roles if r == "o") != 1:
        return interp.decline(
            w,
            f"the convolution's output features are {interp.axis_name(w, out_dim)}: give that axis alone in "
            "out_axes (the spatial and input-feature axes are inputs)",
        )
    # A laid out as a conv kernel whose output-feature axis holds the rank.
    perm = [w.roles[axis][1] if axis != out_dim else w.a.ndim - 1 for axis in range(w.base.ndim)]
    a_kernel = jnp.transpose(w.a, perm)
    x_in = w.dropout_input(x, interp.next_use()).astype(w.a.dtype)
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
    low = jnp.moveaxis(jnp.tensordot(jnp.moveaxis(h, out_feature, -1), w.b.astype(h.dtype), axes=1), -1, out_feature)
    base_out = interp.run_plain(eqn, [x, w.base])[0]
    return [base_out + (w.scale * low).astype(base_out.dtype)]


def gather(interp: Interpreter, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any] | None:
    """Look up rows of ``A`` and apply ``B`` beside the rows of ``W0`` (Embed; no dropout on token ids)."""
    w, indices = values
    if isinstance(indices, LowRankKernel):
        return interp.decline(indices, "the kernel is used as gather indices")
    if w.base.ndim != 2 or w.roles != (("i", 0), ("o", 0)):
        return interp.decline(
            w, "only a 2-dim [vocab, dim] table whose rows are the rule's inputs is looked up in low rank here"
        )
    if w.output_scale is not None:
        return interp.decline(w, "a DoRA embedding table has no low-rank form here")
    p = eqn.params
    dn = p["dimension_numbers"]
    whole_rows = tuple(p["slice_sizes"]) == (1, w.base.shape[1])
    if (
        tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or len(dn.offset_dims) != 1
        or not whole_rows
    ):
        return interp.decline(w, "only a lookup of whole rows has a low-rank form (indexing or slicing the kernel)")
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
    base_out = interp.run_plain(eqn, [w.base, indices])[0]
    return [base_out + (w.scale * low).astype(base_out.dtype)]


# --- calls and control flow: the rewrite continues inside ----------------------------------


def inline_call(interp: Interpreter, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any] | None:
    """Evaluate a ``jit``-style call's jaxpr in place (the outer ``jit`` compiles it anyway)."""
    closed = eqn.params.get("jaxpr")
    if closed is None:
        return None
    return interp.run(closed.jaxpr, list(closed.consts), values)


def checkpoint(interp: Interpreter, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any] | None:
    """Re-issue ``nn.remat`` as ``jax.checkpoint`` with the same policy, rewriting inside."""
    p = eqn.params

    def body(*args: Any) -> list[Any]:
        return interp.run(p["jaxpr"], [], list(args))

    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*values))


def cond(interp: Interpreter, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any] | None:
    """Re-issue ``cond``/``switch`` as ``jax.lax.switch``, rewriting each branch."""
    index, operands = values[0], values[1:]

    def branch(closed: jcore.ClosedJaxpr) -> Callable[..., list[Any]]:
        return lambda *ops: interp.run(closed.jaxpr, list(closed.consts), list(ops))

    return list(jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], *operands))


def scan(interp: Interpreter, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any] | None:
    """Re-issue ``scan`` (``nn.scan``) as ``jax.lax.scan``, slicing stacked kernels' factors along with ``W0``."""
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, carry, xs = values[:n_consts], values[n_consts : n_consts + n_carry], values[n_consts + n_carry :]
    if any(isinstance(c, LowRankKernel) for c in carry):
        return None
    sliced: dict[int, tuple[Any, ...]] = {}
    layered: set[int] = set()  # xs whose W0 enters as quantized layers, dequantized in the body
    for i, x in enumerate(xs):
        base = x.base if isinstance(x, LowRankKernel) else x
        source = interp.quantized_source(base)
        layers = None if source is None else source.layers()
        if layers is not None:
            layered.add(i)
            base = layers
        if not isinstance(x, LowRankKernel):
            xs[i] = base
            continue
        role, position = x.roles[0]
        if role != "s":
            return None
        # Slice the factors along the same stack axis as W0's leading axis; one dropout key per step.
        rng = None if x.rng is None else jax.random.split(x.rng, p["length"])
        inner_roles = tuple((r, k - (r == "s" and k > position)) for r, k in x.roles[1:])
        sliced[i] = (inner_roles, x)
        g = None if x.output_scale is None else jnp.moveaxis(x.output_scale, position, 0)
        xs[i] = (base, jnp.moveaxis(x.a, position, 0), jnp.moveaxis(x.b, position, 0), rng, g)
    closed = p["jaxpr"]

    def body(carry: list[Any], xs_t: list[Any]) -> tuple[list[Any], list[Any]]:
        xs_t = list(xs_t)
        for i in layered - set(sliced):
            xs_t[i] = interp.dequantized(xs_t[i])
        for i, (roles, x) in sliced.items():
            base, a, b, rng, g = xs_t[i]
            base = interp.dequantized(base) if i in layered else base
            xs_t[i] = LowRankKernel(base, a, b, rng, roles, x.scale, x.dropout, x.name, g)
        outs = interp.run(closed.jaxpr, list(closed.consts), [*consts, *carry, *xs_t])
        return outs[:n_carry], outs[n_carry:]

    carry_out, ys = jax.lax.scan(body, list(carry), xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*carry_out, *ys]


DEFAULT_HANDLERS: Mapping[str, Handler] = types.MappingProxyType(
    {
        "convert_element_type": convert_element_type,
        "transpose": transpose,
        "dot_general": dot_general,
        "conv_general_dilated": conv_general_dilated,
        "gather": gather,
        "scan": scan,
        "cond": cond,
        "remat2": checkpoint,
        "checkpoint": checkpoint,
        "pjit": inline_call,
        "jit": inline_call,
        "closed_call": inline_call,
        "core_call": inline_call,
    }
)
"""The handler of every primitive with a low-rank form or a rewrite inside; read-only."""

STRUCTURAL_PRIMITIVES = frozenset(DEFAULT_HANDLERS) - MATRIX_PRIMITIVES
"""Primitives whose default handlers carry the kernel on (a cast, a transpose, a sub-jaxpr) rather than use it."""
