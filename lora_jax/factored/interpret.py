"""The interpreter of the factored path and the public ``factored(fn, spec)`` wrapper.

``factored`` traces ``fn`` to a jaxpr with the public ``jax.make_jaxpr`` and evaluates it again, equation by
equation, carrying each adapted kernel as a :class:`LowRankKernel` instead of an array. Equations that touch no
kernel run as they are; the others go to the handler of their primitive (``lora_jax.factored.handlers``). Where no
handler exists, or the handler returns None, the kernel is materialized as ``W0 + s * A @ B`` (as ``combine``
would give it), so results stay right, and a warning says where and why: once per kernel and reason for each
``factored`` function, pointing at the caller's line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from lora_jax.adapters import bind
from lora_jax.errors import LoraError
from lora_jax.factored.handlers import DEFAULT_HANDLERS, MATRIX_PRIMITIVES, STRUCTURAL_PRIMITIVES, Handler
from lora_jax.factored.kernel import LowRankKernel
from lora_jax.paths import flatten
from lora_jax.plan import KernelLayout, Target, abstract_leaf
from lora_jax.quant.array import QuantizedArray, as_array, check_recompute, is_quantized, keep_codes
from lora_jax.quant.product import product_of, quantized_dot
from lora_jax.spec import LoraSpec
from lora_jax.typing import PyTree
from lora_jax.variants import variant_of

_MATERIALIZED = "using the materialized W0 + s*A@B (as combine) there"


def _value(env: dict[Any, Any], var: Any) -> Any:
    if isinstance(var, jcore.Literal):
        return var.val
    return env[var]


def _has_matrix_primitive(eqn: jcore.JaxprEqn) -> bool:
    """Return whether a sub-jaxpr of ``eqn`` (scan body, cond branch, call) holds a matrix primitive."""
    for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else [param]:
            inner = getattr(sub, "jaxpr", sub)
            if isinstance(inner, jcore.Jaxpr) and any(
                e.primitive.name in MATRIX_PRIMITIVES or _has_matrix_primitive(e) for e in inner.eqns
            ):
                return True
    return False


class Interpreter:
    """Evaluate jaxprs with some inputs in factored form, dispatching kernel-touching equations to handlers.

    One interpreter serves one call of a ``factored`` function, sub-jaxprs (scan bodies, cond branches, remat and
    jit calls) included, so that its count of kernel uses gives each use its own dropout key. It records what the
    caller warns about: each kernel's materialized fallbacks (``fallbacks``: path to reasons) and the kernels that
    were an operand of ``dot_general``, ``conv_general_dilated`` or ``gather`` (``matrix_uses``), directly or
    through values computed from params alone, so a kernel reshaped or flipped before its product still counts.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        debug_info: Any = None,
        layouts: Mapping[str, KernelLayout] | None = None,
    ) -> None:
        self.handlers = handlers
        self.debug_info = debug_info
        self.layouts: Mapping[str, KernelLayout] = layouts or {}
        self.uses = 0
        self.fallbacks: dict[str, list[str]] = {}
        self.matrix_uses: set[str] = set()
        self._declined: dict[str, str] = {}
        # Values that depend on params only (no argument of fn), by id, with the kernels they come from; the
        # value itself is kept so its id is not reused.
        self._weights: dict[int, tuple[Any, frozenset[str]]] = {}
        # Base values that are a quantized leaf dequantized (and cast to a dtype, or None), by id.
        self._dequantized: dict[int, tuple[Any, QuantizedArray, Any]] = {}

    def note_dequantized(self, value: Any, leaf: QuantizedArray, dtype: Any = None) -> None:
        """Record that ``value`` is ``as_array(leaf, dtype)``: a product with it then keeps the codes
        (:func:`~lora_jax.quant.product.quantized_dot`), and a scan over it dequantizes a layer at a time."""
        self._dequantized[id(value)] = (value, leaf, dtype)

    def dequantized(self, leaf: QuantizedArray) -> jax.Array:
        """Return ``as_array(leaf)``, recorded as :meth:`note_dequantized` does."""
        value = as_array(leaf)
        self.note_dequantized(value, leaf)
        return value

    def cast(self, value: jax.Array, dtype: Any) -> jax.Array:
        """Return ``value`` cast to ``dtype``; a dequantized float32 kernel stays recorded as its leaf, in ``dtype``.

        (Dequantizing straight to ``dtype`` rounds once, as the cast does; from a lower precision it would not.)
        """
        out = value.astype(dtype)
        entry = self._dequantized.get(id(value))
        if entry is not None and entry[2] is None and entry[1].dtype == np.float32:
            self.note_dequantized(out, entry[1], np.dtype(dtype))
        return out

    def quantized_source(self, value: Any) -> QuantizedArray | None:
        """Return the quantized leaf that ``value`` is, dequantized in its own dtype, or None."""
        entry = self._dequantized.get(id(value))
        return None if entry is None or entry[2] is not None else entry[1]

    def dequantized_as(self, value: Any) -> tuple[QuantizedArray, Any] | None:
        """Return the quantized leaf that ``value`` is, dequantized, and the dtype it was cast to (or None)."""
        entry = self._dequantized.get(id(value))
        return None if entry is None else (entry[1], entry[2])

    def next_use(self) -> int:
        """Return the number of this kernel use (from 1), folded into the kernel's dropout key."""
        self.uses += 1
        return self.uses

    def mark_weight(self, value: Any, kernels: frozenset[str] = frozenset()) -> None:
        """Record that ``value`` is computed from params alone, from the adapted kernels named in ``kernels``."""
        self._weights[id(value)] = (value, kernels)

    def decline(self, kernel: LowRankKernel, why: str) -> None:
        """Record why ``kernel`` has no low-rank form in the equation at hand, for its warning; return None.

        A handler ends with ``return interp.decline(w, "...")`` where it must fall back, so the warning says
        what to change instead of only naming the primitive.
        """
        self._declined[kernel.name] = why

    def axis_name(self, kernel: LowRankKernel, axis: int) -> str:
        """Name ``kernel``'s current ``axis`` as the user wrote it: ``"kernel axis 0 (stack axis 0 of the rule)"``."""
        role, position = kernel.roles[axis]
        group = {"s": "stack", "i": "input", "o": "output"}[role]
        layout = self.layouts.get(kernel.name)
        if layout is None:
            return f"{group} axis {position} of the rule"
        original = {"s": layout.stack, "i": layout.inputs, "o": layout.outputs}[role][position]
        return f"kernel axis {original} ({group} axis {position} of the rule)"

    def materialize(self, kernel: LowRankKernel, why: str) -> jax.Array:
        """Return ``W0 + s * A @ B`` for ``kernel`` and record why, for the caller's warning."""
        reasons = self.fallbacks.setdefault(kernel.name, [])
        if why not in reasons:
            reasons.append(why)
        value = kernel.materialize()
        self.mark_weight(value, frozenset({kernel.name}))
        return value

    def _concrete(self, value: Any, why: str) -> Any:
        return self.materialize(value, why) if isinstance(value, LowRankKernel) else value

    def _origin(self, value: Any) -> frozenset[str] | None:
        """Return the kernels a params-only value comes from, or None when it depends on an argument of fn."""
        if isinstance(value, LowRankKernel):
            return frozenset({value.name})
        entry = self._weights.get(id(value))
        return None if entry is None else entry[1]

    def run(self, jaxpr: jcore.Jaxpr, consts: list[Any], args: list[Any]) -> list[Any]:
        """Evaluate ``jaxpr`` on ``consts`` and ``args`` (arrays or kernels); kernel outputs come back materialized."""
        env: dict[Any, Any] = {}
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
            self.mark_weight(value)
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for eqn in jaxpr.eqns:
            values = [_value(env, v) for v in eqn.invars]
            origins = [self._origin(x) for v, x in zip(eqn.invars, values) if not isinstance(v, jcore.Literal)]
            self._note_matrix_use(eqn, values)
            if any(isinstance(v, LowRankKernel) for v in values):
                outs = self.rewrite(eqn, values)
            else:
                outs = self.run_plain(eqn, values)
            if all(o is not None for o in origins):
                derived = frozenset().union(*(o for o in origins if o is not None))
                for out in outs:
                    self.mark_weight(out, derived)
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [self._concrete(_value(env, v), "it is an output") for v in jaxpr.outvars]

    def _note_matrix_use(self, eqn: jcore.JaxprEqn, values: list[Any]) -> None:
        if eqn.primitive.name in MATRIX_PRIMITIVES:
            for value in values:
                self.matrix_uses |= self._origin(value) or frozenset()
            return
        # A materialized kernel entering a scan, cond or call whose body multiplies: its path inside is not
        # followed, so count it as used (the warning is then the fallback's own, never a wrong "not a matrix").
        materialized = [self._origin(v) for v in values if not isinstance(v, LowRankKernel)]
        names = frozenset().union(*(o for o in materialized if o))
        if names and _has_matrix_primitive(eqn):
            self.matrix_uses |= names

    def rewrite(self, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any]:
        """Evaluate an equation with kernel inputs by its handler, or materialized when there is no low-rank form."""
        scope = str(eqn.source_info.name_stack)
        # Under the equation's own name scope, so profiles attribute the low-rank branch to its layer.
        with jax.named_scope(scope) if scope else contextlib.nullcontext():
            return self._rewrite(eqn, values)

    def _rewrite(self, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        handler = self.handlers.get(name)
        self._declined = {}
        if handler is not None:
            outs = handler(self, eqn, values)
            if outs is not None:
                if name not in STRUCTURAL_PRIMITIVES:  # a low-rank form: a matrix use, whatever the primitive
                    self.matrix_uses.update(v.name for v in values if isinstance(v, LowRankKernel))
                return outs
        declined, self._declined = self._declined, {}
        concrete = []
        for value in values:
            if isinstance(value, LowRankKernel):
                why = declined.get(value.name)
                why = f"it meets `{name}`: {why}" if why else f"it meets `{name}`, which has no low-rank form here"
                value = self.materialize(value, why)
            concrete.append(value)
        return self.run_plain(eqn, concrete)

    def run_plain(self, eqn: jcore.JaxprEqn, values: list[Any]) -> list[Any]:
        """Evaluate one equation as it stands (array inputs only), as a one-equation jaxpr.

        A ``dot_general`` of an activation and a dequantized kernel runs as :func:`quantized_dot`, which keeps
        the kernel's codes for the backward pass and dequantizes next to the product in each pass.
        """
        name = eqn.primitive.name
        if name == "dot_general" and len(values) == 2:
            sources = [self.dequantized_as(value) for value in values]
            for side, source in enumerate(sources):
                x = values[1 - side]
                if source is not None and sources[1 - side] is None and self._origin(x) is None:
                    leaf, dtype = source
                    return [quantized_dot(product_of(eqn.params, side, x, dtype), x, leaf)]
        if name == "convert_element_type" and self.dequantized_as(values[0]) is not None:
            return [self.cast(values[0], eqn.params["new_dtype"])]
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


def _library_dirs() -> tuple[str, ...]:
    """Return the folders of lora_jax, jax, jaxlib and flax (found, not imported), each ending in a separator."""
    dirs = []
    for package in ("lora_jax", "jax", "jaxlib", "flax"):
        found = importlib.util.find_spec(package)
        for location in (found.submodule_search_locations or []) if found is not None else []:
            dirs.append(os.path.join(os.path.realpath(location), ""))
    return tuple(dirs)


_LIBRARY_DIRS = _library_dirs()


def _caller_frame() -> types.FrameType | None:
    """Return the innermost frame outside lora_jax, jax and flax: the user's line that ran the function."""
    frame = sys._getframe(1)
    while frame is not None:
        if not os.path.realpath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
            return frame
        frame = frame.f_back
    return None


def _warn_once(message: str, warned: set[str]) -> None:
    """Warn ``message`` (a ``UserWarning``) at the caller's line unless ``warned`` holds it; add it there.

    Args:
      message: the warning, naming the kernel's path and the reason.
      warned: the messages given so far by one ``factored`` function: re-tracing it (a new shape under
        ``jax.jit``) repeats nothing.
    """
    if message in warned:
        return
    warned.add(message)
    frame = _caller_frame()
    if frame is None:
        warnings.warn(message, UserWarning, stacklevel=2)
        return
    warnings.warn_explicit(
        message,
        UserWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=frame.f_globals.get("__name__"),
        module_globals=frame.f_globals,
    )


def _fallback_warnings(interpreter: Interpreter, targets: list[Target]) -> list[str]:
    """Return the warnings of one call: each materialized fallback, or one line for a leaf that is no matrix.

    A kernel that was never an operand of ``dot_general``, ``conv_general_dilated`` or ``gather`` (a bias or a
    norm scale matched by a broad pattern) gets one warning saying so instead of one per primitive it met.
    """
    messages = []
    for target in targets:
        name = target.name
        reasons = interpreter.fallbacks.get(name, [])
        if not reasons:
            continue
        if name in interpreter.matrix_uses:
            messages += [f"lora_jax.factored: {name}: {why}; {_MATERIALIZED}" for why in reasons]
            continue
        messages.append(
            f"lora_jax.factored: {name}: {target.rule.label} matches this leaf of shape {list(target.shape)}, "
            f"which is never an operand of dot_general, conv or gather here ({'; '.join(reasons)}): it is not "
            "used as a matrix, so its adapter is only ever materialized as W0 + s*A@B; narrow the pattern to the "
            "kernels it means (e.g. '.../kernel')"
        )
    return messages


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
    fn: Callable[..., Any],
    spec: LoraSpec,
    *,
    handlers: Mapping[str, Handler | None] | None = None,
    recompute_dequantized: bool | None = None,
) -> Factored:
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
        ``W0 + s * A @ B`` for that primitive, with a warning naming the kernel's path, the primitive and, where
        the handler said (``interp.decline``), what to change. Each warning is given once per kernel and
        reason by this function and points at the caller's line. A kernel that is never an operand of
        ``dot_general``, ``conv_general_dilated`` or ``gather`` (a bias or norm scale matched by a broad
        pattern) gets one warning that it is not used as a matrix.
      recompute_dequantized: on a quantized base, dequantize again for the backward pass (under
        ``jax.checkpoint`` with :func:`lora_jax.quant.recompute_dequantized`) the kernels that are read as
        arrays, instead of keeping them from the forward pass. (A ``dot_general`` of an activation and a
        quantized kernel keeps the codes whatever this says: :func:`lora_jax.quant.product.quantized_dot`; the
        kernels read as arrays are those that reach their product through another operation.) None decides by
        :func:`lora_jax.scheduling.recomputation_saves_memory`: on GPU and TPU, and on CPU under
        ``MEMORY_SCHEDULER_FLAG``; XLA:CPU's default scheduler runs the recomputation early, where it costs
        memory instead.

    Returns:
      A :class:`Factored` callable ``g(params, lora, *args, dropout_rng=None, output_scales=None, **kwargs)``
      equal to ``fn(combine(params, lora, spec), *args, **kwargs)`` (to float rounding) when ``dropout_rng`` is None;
      with an RNG key, LoRA dropout is applied to each adapter's input at its rule's rate (training).
      Keyword arguments whose values are arrays (or trees of arrays) are traced; others (``deterministic=True``)
      reach ``fn`` as they are.

    Raises:
      LoraError: ``handlers`` holds something other than handlers or None, or ``recompute_dequantized`` is
        neither a bool nor None.
    """
    check_recompute(recompute_dequantized, "factored")
    return Factored(fn, spec, handler_table(handlers), recompute_dequantized)


class Factored:
    """``fn`` run with adapters in factored form; see :func:`factored`.

    Attributes:
      warned: the fallback warnings this function has given, so each kernel and reason warns once, not once per
        trace (``jax.jit`` traces again for each new input shape).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        spec: LoraSpec,
        handlers: Mapping[str, Handler],
        recompute_dequantized: bool | None = None,
    ) -> None:
        self.fn = fn
        self.spec = spec
        self.handlers = handlers
        self.recompute_dequantized = recompute_dequantized
        self.warned: set[str] = set()

    def __call__(
        self,
        params: PyTree,
        lora: PyTree,
        *args: Any,
        dropout_rng: jax.Array | None = None,
        output_scales: Mapping[str, jax.Array] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Return ``fn(params with adapters, *args, **kwargs)``; see :func:`factored`.

        ``output_scales`` ``{kernel path: [*stack, *out]}`` multiplies each named LoRA kernel's output columns,
        ``W = g * (W0 + s A @ B)`` (a served DoRA adapter's gain, :meth:`lora_jax.variants.Dora.gain`).

        Raises:
          LoraError: ``output_scales`` names a path that is no LoRA kernel of the spec, or a scale of another shape.
        """
        fn = self.fn
        pairs = bind(params, lora, self.spec)
        scales = _check_output_scales(pairs, output_scales)
        flat_params, treedef = flatten(params)
        stored = [leaf for _, leaf in flat_params]
        position_of = {target.path: position for position, (target, _) in enumerate(pairs)}
        positions = [position_of.get(path) for path, _ in flat_params]
        targets = [target for target, _ in pairs]
        # Array keyword arguments are traced like positional ones; the rest (flags such as
        # deterministic=True, strings, None) stay Python values, as fn's own code expects.
        traced = {k: v for k, v in kwargs.items() if _is_array(v)}
        static = {k: v for k, v in kwargs.items() if k not in traced}

        def flat_fn(param_leaves: list[Any], args: tuple[Any, ...], traced: dict[str, Any]) -> Any:
            return fn(jax.tree_util.tree_unflatten(treedef, param_leaves), *args, **traced, **static)

        abstract = [abstract_leaf(x) for x in stored]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(abstract, args, traced)
        adapted = [target for target in targets if target.layout is not None]
        layouts = {target.name: target.layout for target in adapted if target.layout is not None}
        interpreter = Interpreter(self.handlers, getattr(closed.jaxpr, "debug_info", None), layouts)

        def evaluate(stored: list[Any], values: list[Any], rng: jax.Array | None, arg_leaves: list[Any]) -> Any:
            leaves = [as_array(leaf) for leaf in stored]
            inputs: list[Any] = list(leaves)
            for i, position in enumerate(positions):
                if position is not None:
                    target = targets[position]
                    inputs[i] = variant_of(target).factored(target, leaves[i], values[position], rng)
                    if target.name in scales:
                        inputs[i] = dataclasses.replace(inputs[i], output_scale=scales[target.name])
            for value, leaf in zip(inputs, stored):
                if not isinstance(value, LowRankKernel):
                    interpreter.mark_weight(value)
                if is_quantized(leaf):
                    interpreter.note_dequantized(value.base if isinstance(value, LowRankKernel) else value, leaf)
            return interpreter.run(closed.jaxpr, list(closed.consts), [*inputs, *arg_leaves])

        # Kernels read as arrays (not straight into a product, which keeps codes by itself) are dequantized again
        # for the backward pass rather than kept: a whole-precision copy of the base would erase QLoRA's saving.
        evaluate = keep_codes(evaluate, stored, self.recompute_dequantized)
        arg_leaves = jax.tree_util.tree_leaves((args, traced))
        outs = evaluate(stored, [value for _, value in pairs], dropout_rng, arg_leaves)
        for message in _fallback_warnings(interpreter, adapted):
            _warn_once(message, self.warned)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def _check_output_scales(
    pairs: list[tuple[Target, Any]], output_scales: Mapping[str, jax.Array] | None
) -> dict[str, jax.Array]:
    """Return ``output_scales`` after checking each names a LoRA kernel and has its ``[*stack, *out]`` shape."""
    if not output_scales:
        return {}
    kernels = {target.name: target for target, _ in pairs if target.rule.mode == "lora"}
    for name, scale in output_scales.items():
        target = kernels.get(name)
        if target is None or target.layout is None:
            raise LoraError(
                f"output_scales names {name!r}, which is no LoRA kernel of the spec; give the paths of its 'lora' "
                f"targets, such as {sorted(kernels)[:3]}"
            )
        shape = (*target.layout.stack_shape, *target.layout.out_shape)
        if tuple(np.shape(scale)) != shape:
            raise LoraError(
                f"output_scales[{name!r}] has shape {tuple(np.shape(scale))}; the kernel's output columns are "
                f"[*stack, *out] = {shape}"
            )
    return dict(output_scales)


def _is_array(value: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(value)
    return bool(leaves) and all(isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves)
