"""The interpreter of the factored path and the public ``factored(fn, spec)`` wrapper.

``factored`` traces ``fn`` to a jaxpr with the public ``jax.make_jaxpr`` and evaluates it again, equation by
equation, carrying each adapted kernel as a :class:`LowRankKernel` instead of an array. Equations that touch no
kernel run as they are; the others go to the handler of their primitive (``lora_jax.factored.handlers``). Where no
handler exists, or the handler returns None, the kernel is materialized as ``W0 + s * A @ B`` (as ``combine``
would give it) with a warning naming its path, so results stay right.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from lora_jax.adapters import bind
from lora_jax.errors import LoraError
from lora_jax.factored.handlers import DEFAULT_HANDLERS, Handler
from lora_jax.factored.kernel import LowRankKernel
from lora_jax.paths import flatten
from lora_jax.plan import abstract_leaf
from lora_jax.spec import LoraSpec
from lora_jax.typing import PyTree
from lora_jax.variants import variant_of


def _fallback(kernel: LowRankKernel, why: str) -> jax.Array:
    warnings.warn(
        f"lora_jax.factored: {kernel.name}: {why}; using the materialized W0 + s*A@B (as combine) there",
        stacklevel=2,
    )
    return kernel.materialize()


def _concrete(value: Any, why: str) -> Any:
    return _fallback(value, why) if isinstance(value, LowRankKernel) else value


def _value(env: dict[Any, Any], var: Any) -> Any:
    if isinstance(var, jcore.Literal):
        return var.val
    return env[var]


class Interpreter:
    """Evaluate jaxprs with some inputs in factored form, dispatching kernel-touching equations to handlers.

    One interpreter serves one call of a ``factored`` function, sub-jaxprs (scan bodies, cond branches, remat and
    jit calls) included, so that its count of kernel uses gives each use its own dropout key.
    """

    def __init__(self, handlers: Mapping[str, Handler], debug_info: Any = None) -> None:
        self.handlers = handlers
        self.debug_info = debug_info
        self.uses = 0

    def next_use(self) -> int:
        """Return the number of this kernel use (from 1), folded into the kernel's dropout key."""
        self.uses += 1
        return self.uses

    def run(self, jaxpr: jcore.Jaxpr, consts: list[Any], args: list[Any]) -> list[Any]:
        """Evaluate ``jaxpr`` on ``consts`` and ``args`` (arrays or kernels); kernel outputs come back materialized."""
        env: dict[Any, Any] = {}
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for eqn in jaxpr.eqns:
            values = [_value(env, v) for v in eqn.invars]
            if any(isinstance(v, LowRankKernel) for v in values):
                outs = self.rewrite(eqn, values)
            else:
                outs = self.run_plain(eqn, values)
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [_concrete(_value(env, v), "it is an output") for v in jaxpr.outvars]

    def rewrite(self, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any]:
        """Evaluate an equation with kernel inputs by its handler, or materialized when there is no low-rank form."""
        name = eqn.primitive.name
        handler = self.handlers.get(name)
        if handler is not None:
            outs = handler(self, eqn, values)
            if outs is not None:
                return outs
        concrete = [_concrete(v, f"it meets `{name}`, which has no low-rank form here") for v in values]
        return self.run_plain(eqn, concrete)

    def run_plain(self, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any]:
        """Evaluate one equation as it stands (array inputs only), as a one-equation jaxpr."""
        invars, inputs, seen = [], [], set()
        for var, value in zip(eqn.invars, values):
            if not isinstance(var, jcore.Literal) and var not in seen:
                seen.add(var)
                invars.append(var)
                inputs.append(value)
        info = self.debug_info
        if info is not None:
            info = info._replace(arg_names=None, result_paths=None)
        jaxpr = jcore.Jaxpr([], invars, eqn.outvars, [eqn], effects=eqn.effects, debug_info=info)  # pyright: ignore[reportArgumentType]  (None is accepted)
        return list(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, []))(*inputs))


def handler_table(handlers: Mapping[str, Handler | None] | None = None) -> Mapping[str, Handler]:
    """Return ``DEFAULT_HANDLERS`` with ``handlers`` merged over it, read-only.

    Args:
      handlers: primitive name to handler; a handler adds or replaces that primitive's, None removes it (the
        primitive then always takes the materialized fallback).

    Raises:
      LoraError: a key is not a string or a value is neither callable nor None.
    """
    table = dict(DEFAULT_HANDLERS)
    for name, handler in (handlers or {}).items():
        if not isinstance(name, str):
            raise LoraError(f"factored handlers: key {name!r} is not a primitive name; use e.g. 'dot_general'")
        if handler is None:
            table.pop(name, None)
        elif callable(handler):
            table[name] = handler
        else:
            raise LoraError(
                f"factored handlers: the handler for `{name}` is {handler!r}; give a function "
                "(interpreter, eqn, values) -> outputs | None, or None for the materialized fallback"
            )
    return types.MappingProxyType(table)


def factored(
    fn: Callable[..., Any], spec: LoraSpec, *, handlers: Mapping[str, Handler | None] | None = None
) -> Callable[..., Any]:
    """Wrap ``fn(params, *args)`` to run with adapters in factored form: ``x W0 + s * dropout(x) A B``.

    ``W0`` only enters as a closed-over constant, so ``jax.grad`` with respect to ``lora`` computes no
    kernel-sized gradient.

    Args:
      fn: a function whose first argument is the base param tree; static options (``deterministic``,
        ``train``) belong in its closure.
      spec: the spec the adapters were made with.
      handlers: optional ``{primitive name: handler}`` merged over ``DEFAULT_HANDLERS``. A handler is
        ``(interpreter, eqn, values) -> outputs | None`` (see ``lora_jax.factored.handlers``); it adds a
        primitive or replaces the default one. None, or a handler returning None, gives the materialized
        ``W0 + s * A @ B`` for that primitive, with a warning naming the kernel's path.

    Returns:
      ``g(params, lora, *args, dropout_rng=None, **kwargs)`` equal to
      ``fn(combine(params, lora, spec), *args, **kwargs)`` (to float rounding) when ``dropout_rng`` is None;
      with an RNG key, LoRA dropout is applied to each adapter's input at its rule's rate (training).
      Keyword arguments whose values are arrays (or trees of arrays) are traced; others (``deterministic=True``)
      reach ``fn`` as they are.

    Raises:
      LoraError: ``handlers`` holds something other than handlers or None.
    """
    table = handler_table(handlers)

    def wrapped(params: PyTree, lora: PyTree, *args: Any, dropout_rng: jax.Array | None = None, **kwargs: Any) -> Any:
        pairs = bind(params, lora, spec)
        flat_params, treedef = flatten(params)
        leaves = [leaf for _, leaf in flat_params]
        index = {path: i for i, (path, _) in enumerate(flat_params)}
        inputs: list[Any] = list(leaves)
        for target, value in pairs:
            i = index[target.path]
            inputs[i] = variant_of(target).factored(target, leaves[i], value, dropout_rng)
        # Array keyword arguments are traced like positional ones; the rest (flags such as
        # deterministic=True, strings, None) stay Python values, as fn's own code expects.
        traced = {k: v for k, v in kwargs.items() if _is_array(v)}
        static = {k: v for k, v in kwargs.items() if k not in traced}

        def flat_fn(param_leaves: list[Any], args: tuple[Any, ...], traced: dict[str, Any]) -> Any:
            return fn(jax.tree_util.tree_unflatten(treedef, param_leaves), *args, **traced, **static)

        abstract = [abstract_leaf(x) for x in leaves]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(abstract, args, traced)
        arg_leaves = jax.tree_util.tree_leaves((args, traced))
        interpreter = Interpreter(table, getattr(closed.jaxpr, "debug_info", None))
        outs = interpreter.run(closed.jaxpr, list(closed.consts), [*inputs, *arg_leaves])
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def _is_array(value: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(value)
    return bool(leaves) and all(isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves)
