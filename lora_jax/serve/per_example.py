"""One batch, a different adapter per row: ``x W0 + s_i (x A_i) B_i`` with no ``W0 + A_i B_i`` formed.

``per_example(fn)`` runs ``fn`` on the factored path (:func:`lora_jax.factored`) under ``jax.vmap`` over the
rows of the batch. Each row carries its own adapter, gathered from the set (``A_i [*stack, *in, R]``,
``s_i B_i [*stack, R, *out]``, fully trainable leaves such as a classifier head), so at each adapted
``dot_general`` the frozen branch ``x W0`` is one batched product with the shared ``W0`` and the low-rank branch is
a batched product with the gathered factors: ``(x A_ids) B_ids``, the gather-then-einsum form. A row of a DoRA
adapter also multiplies the kernel's output columns by its gain (``output_scales`` of the factored path).

The example axis is explicit: it is the axis ``jax.vmap`` maps, by default the leading axis of every input array
(``in_axes`` / ``kwarg_axes`` name another, e.g. axis 1 of a KV cache ``[layers, B, S, K, Dh]``). Every batched
input must have ``len(adapter_ids)`` entries along it, or it is refused naming the input. ``fn`` must compute each
row from its own rows of the inputs alone (true of the bundled models at inference; not of batch statistics
over the batch), since each row runs as a batch of one.

Measured on 2 shared CPU cores (``experiments/bench_serving.py``, MiniLM-sized rows ``x [32, 64, 384]``, rank 8):
gathering each row's factors and multiplying in one batched einsum took 0.07-0.09x the frozen ``x W0`` at N = 1,
16 and 64 adapters; a one-hot einsum over all N adapters 0.14-0.17x; ``jax.lax.ragged_dot`` on rows sorted by
adapter 3.6x at N = 16 and 15x at N = 64 (XLA:CPU computes it densely over every group). At N = 4 the one-hot
form measured faster (0.27x against 0.39x). The gather form is the one kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import LoraError
from lora_jax.factored import Factored, factored
from lora_jax.factored.handlers import Handler
from lora_jax.serve.adapter_set import AdapterSet, check_ids, gather_rows, split_gains
from lora_jax.spec import LoraSpec
from lora_jax.typing import PyTree

Axes = Any
"""A ``jax.vmap``-style axis tree: an int or None, or a tree prefix of the inputs (outputs) with ints and Nones."""


def _array_tree(value: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(value)
    return bool(leaves) and all(isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves)


def _is_none(x: Any) -> bool:
    return x is None


def _example_axes(tree: Any, prefix: Axes, batch: int, what: str) -> Any:
    """Return ``prefix`` broadcast to ``tree``: per leaf the example axis (made non-negative), or None.

    A leaf with no axes (a Python number, a scalar array) is shared by all rows whatever the prefix says.

    Raises:
      LoraError: a leaf has no such axis, or that axis does not hold ``batch`` entries (naming the leaf).
    """
    try:
        full = jax.tree.broadcast(prefix, tree, is_leaf=_is_none)
    except ValueError as err:
        raise LoraError(f"per-example adapters: the axes given for {what} do not fit its structure ({err})") from None
    axes_leaves, treedef = jax.tree_util.tree_flatten(full, is_leaf=_is_none)
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    resolved = []
    for axis, (path, leaf) in zip(axes_leaves, leaves_with_paths):
        ndim = int(np.ndim(leaf))
        if axis is None or ndim == 0:
            resolved.append(None)
            continue
        name = f"{what}{jax.tree_util.keystr(path)}"
        if not -ndim <= axis < ndim:
            raise LoraError(
                f"per-example adapters: {name} has {ndim} axes, so it has no example axis {axis}; "
                "name its example axis in in_axes / kwarg_axes (None if all rows share it)"
            )
        axis %= ndim
        if leaf.shape[axis] != batch:
            raise LoraError(
                f"per-example adapters: {name} has shape {tuple(leaf.shape)}, whose axis {axis} (taken as the example "
                f"axis) holds {leaf.shape[axis]} entries, not B = {batch} = len(adapter_ids); give one adapter id per "
                "row, or name this input's example axis in in_axes / kwarg_axes (None if all rows share it)"
            )
        resolved.append(axis)
    return jax.tree_util.tree_unflatten(treedef, resolved)


def _unsqueeze(tree: Any, axes: Any) -> Any:
    """Put back the example axis (size 1) that ``jax.vmap`` took out, so ``fn`` sees a batch of one."""
    return jax.tree.map(lambda axis, x: x if axis is None else jnp.expand_dims(x, axis), axes, tree, is_leaf=_is_none)


def _squeeze(tree: Any, prefix: Axes) -> Any:
    """Take out the example axis (size 1) of each output, for ``jax.vmap`` to stack the rows along it."""
    full = jax.tree.broadcast(prefix, tree, is_leaf=_is_none)
    return jax.tree.map(lambda axis, x: x if axis is None else jnp.squeeze(x, axis), full, tree, is_leaf=_is_none)


class PerExample:
    """``fn`` run with a different adapter per row; see :func:`per_example`."""

    def __init__(
        self,
        fn: Callable[..., Any],
        in_axes: Axes,
        kwarg_axes: Mapping[str, Axes],
        out_axes: Axes,
        handlers: Mapping[str, Handler | None] | None,
    ) -> None:
        self.fn = fn
        self.in_axes = in_axes
        self.kwarg_axes = dict(kwarg_axes)
        self.out_axes = out_axes
        self.handlers = handlers
        self._factored: dict[LoraSpec, Factored] = {}

    def _inner(self, spec: LoraSpec) -> Factored:
        if spec not in self._factored:
            self._factored[spec] = factored(self.fn, spec, handlers=self.handlers)
        return self._factored[spec]

    def __call__(self, params: PyTree, lora_set: AdapterSet, adapter_ids: jax.Array, *args: Any, **kwargs: Any) -> Any:
        """Return ``fn(params with row i's adapter, *args, **kwargs)`` for every row i at once.

        Args:
          params: the base tree.
          lora_set: the adapters.
          adapter_ids: ``[B]`` int: a slot of ``lora_set`` per row, or -1 for the base alone. Outside ``jax.jit``
            ids of empty or missing slots are refused; under it they serve the base.
          args, kwargs: ``fn``'s inputs; array inputs are batched along their example axis (``B`` entries),
            other keyword values reach ``fn`` as they are.

        Raises:
          LoraError: bad ids (see :func:`~lora_jax.serve.check_ids`), an input without ``B`` entries along its
            example axis, or an adapted kernel that has no low-rank form in ``fn`` (it would be formed per row).
        """
        check_ids(lora_set, adapter_ids)
        rows = gather_rows(params, lora_set, adapter_ids)
        return self.apply_rows(params, rows, lora_set.spec, *args, **kwargs)

    def apply_rows(self, params: PyTree, rows: PyTree, spec: LoraSpec, *args: Any, **kwargs: Any) -> Any:
        """Return what :meth:`__call__` does, from rows gathered once (:func:`~lora_jax.serve.gather_rows`).

        A decoding loop gathers the rows before it and calls this at every step.

        Args:
          params: the base tree.
          rows: the set spec's adapter tree with a leading batch axis ``[B, ...]``.
          spec: the set's spec (``lora_set.spec``).
        """
        leaves = jax.tree_util.tree_leaves(rows)
        if not leaves:
            raise LoraError("per-example adapters: the rows hold no adapter leaves")
        batch = int(leaves[0].shape[0])
        arrays = {k: v for k, v in kwargs.items() if _array_tree(v)}
        static = {k: v for k, v in kwargs.items() if k not in arrays}
        arg_axes = _example_axes(args, self.in_axes, batch, "positional argument ")
        kwarg_axes = {
            k: _example_axes(v, self.kwarg_axes.get(k, 0), batch, f"keyword argument {k!r}") for k, v in arrays.items()
        }
        if all(axis is None for axis in jax.tree_util.tree_leaves((arg_axes, kwarg_axes), is_leaf=_is_none)):
            raise LoraError(
                "per-example adapters: no input has an example axis (no array with one or more axes, or all named "
                "None in in_axes / kwarg_axes), so no row can be told apart; pass the batch's inputs as arrays"
            )
        inner = self._inner(spec)
        warned = set(inner.warned)
        rows, gains = split_gains(params, rows, spec)

        def one(row: PyTree, gain: dict, args_row: tuple, arrays_row: dict) -> Any:
            out = inner(
                params,
                row,
                *_unsqueeze(args_row, arg_axes),
                output_scales=gain,
                **_unsqueeze(arrays_row, kwarg_axes),
                **static,
            )
            return _squeeze(out, self.out_axes)

        out = jax.vmap(one, in_axes=(0, 0, arg_axes, kwarg_axes), out_axes=self.out_axes)(rows, gains, args, arrays)
        fallbacks = sorted(inner.warned - warned) or sorted(inner.warned)
        if fallbacks:
            raise LoraError(
                f"per-example adapters: {fallbacks[0]}; serving it per row would form W0 + s*A_i@B_i for every row. "
                "Narrow the spec to kernels used as matrices, or merge the adapter and serve it alone"
            )
        return out


def per_example(
    fn: Callable[..., Any],
    *,
    in_axes: Axes = 0,
    kwarg_axes: Mapping[str, Axes] | None = None,
    out_axes: Axes = 0,
    handlers: Mapping[str, Handler | None] | None = None,
) -> PerExample:
    """Wrap ``fn(params, *args, **kwargs)`` to run each row of a batch with its own adapter from a set.

    ``per_example(fn)(params, lora_set, adapter_ids, *args)`` gives, in row i, what
    ``fn(merge(params, lora_k, spec_k), *args)`` gives in row i for the adapter ``k`` in slot ``adapter_ids[i]``
    (the base's row for -1), computing ``x W0 + s_k (x A_k) B_k`` at each adapted kernel: no ``W0 + A_k B_k`` is
    formed. Swapping the set's adapters changes data only: a jitted caller is traced once per set structure.

    Args:
      fn: a function of the base param tree and the inputs, whose rows are independent.
      in_axes: the example axis of each positional input, as in ``jax.vmap``: an int, None (shared by every
        row) or a tree prefix of the inputs; by default the leading axis of every array. Scalars are shared.
      kwarg_axes: the same per keyword argument (default 0 for array values); non-array values are static.
      out_axes: where the example axis goes in each output (a tree prefix of the outputs).
      handlers: passed to :func:`lora_jax.factored` (extra or replaced primitive handlers).

    Returns:
      A :class:`PerExample` callable ``(params, lora_set, adapter_ids, *args, **kwargs)``.
    """
    return PerExample(fn, in_axes, kwarg_axes or {}, out_axes, handlers)
