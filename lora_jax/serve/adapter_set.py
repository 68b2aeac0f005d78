"""Adapter sets: N adapters of one base and one set of targets, stacked as data with a leading slot axis.

A set holds, for each adapted kernel, ``A [N, *stack, *in, R]`` and ``B [N, *stack, R, *out]`` (every adapter
zero-padded to the set's rank ``R``: padding adds zero columns to ``A`` and zero rows to ``B``, so ``A @ B`` is
unchanged), its scale ``s [N]`` as data (adapters of different alpha and rank share a set), a fully trainable leaf
(a classifier head) as ``[N, *shape]``, and which slots hold an adapter, ``used [N]``. A kernel that takes DoRA
adapters also holds each slot's gain ``g [N, *stack, *out]``, ``m / ||W0 + s A @ B||`` computed once when the adapter
is added (1 for a LoRA adapter), so a row serves ``g * (x W0 + s (x A) B)`` with no ``W0 + s A @ B`` formed per row.
What is static (the set's
spec: targets, axes, rank ``R``; the capacity ``N`` is a shape) does not change when an adapter is added, replaced
or removed, so a function jitted on a set is traced once for all its contents.

An empty slot (and the id -1) stands for the base model: zero factors, zero scale, gain 1, the base's own value of
every fully trainable leaf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters import bind
from lora_jax.errors import AdapterMismatchError, LoraError, SpecError
from lora_jax.finite import check_finite, is_traced
from lora_jax.paths import flatten, nested_set, path_str
from lora_jax.plan import Target, plan
from lora_jax.quant.array import as_array
from lora_jax.serve.specs import NONFINITE_FIX, exact_spec, kind
from lora_jax.spec import ADAPTED_MODES, LoraSpec
from lora_jax.typing import PyTree
from lora_jax.variants import A_KEY, B_KEY, Dora, variant_of

SET_RULE_NAME = "adapter set"
"""The name of the set spec's rules, shown in its errors."""
GAIN_KEY = "g"
"""The key of a gathered row's gain ``[B, *stack, *out]`` beside ``a`` and ``b``, at kernels that take DoRA."""
_DORA = Dora()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """N adapters for one base, stacked along a leading slot axis.

    Attributes:
      lora: the set spec's adapter tree with a leading slot axis: ``{"a": A [N, *stack, *in, R],
        "b": B [N, *stack, R, *out]}`` at each adapted kernel, ``[N, *shape]`` at each fully trainable leaf.
      scales: ``{kernel path: s [N]}`` float32, each adapter's own ``alpha / r`` (or rsLoRA's); 0 in empty slots.
      gains: ``{kernel path: g [N, *stack, *out]}`` float32 at the kernels that take DoRA adapters: a DoRA
        adapter's ``m / ||W0 + s A @ B||``, 1 for a LoRA adapter and in empty slots.
      used: ``[N]`` bool, the slots that hold an adapter.
      spec: the set spec (static): one rule per kind of target, rank ``R`` and scale 1 (the scales are data).
    """

    lora: PyTree
    scales: dict[str, jax.Array]
    gains: dict[str, jax.Array]
    used: jax.Array
    spec: LoraSpec = dataclasses.field(metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        """Return ``N``, the number of slots."""
        return int(self.used.shape[0])

    @property
    def rank(self) -> int:
        """Return ``R``, the rank every adapter is padded to."""
        return max(rule.rank for rule in self.spec.rules if rule.mode in ADAPTED_MODES)

    @property
    def nbytes(self) -> int:
        """Return the bytes of the set's arrays (factors, trainable leaves, scales, slot flags)."""
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self))

    def slots(self) -> list[int]:
        """Return the slots that hold an adapter (reads ``used`` back to the host)."""
        return [int(i) for i in np.flatnonzero(np.asarray(self.used))]


def set_spec(targets: Sequence[Target], rank: int, dtype: str = "float32") -> LoraSpec:
    """Return the spec of a set over ``targets``: rank ``rank`` everywhere, scale 1 (the set's scales are data).

    DoRA targets become LoRA ones: the set holds their gains as data (:attr:`AdapterSet.gains`).
    """
    ranks = [None if target.layout is None else rank for target in targets]
    return exact_spec(targets, ranks, dtype=dtype, name=SET_RULE_NAME)


def _check_rank(targets: Sequence[Target], rank: int) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise SpecError(f"adapter set: rank must be a positive integer, got {rank!r}")
    for target in targets:
        layout = target.layout
        if layout is not None and rank > min(layout.in_size, layout.out_size):
            raise SpecError(
                f"adapter set: rank {rank} exceeds min(in, out) = {min(layout.in_size, layout.out_size)} for "
                f"{target.name}; give rank <= that"
            )


def _check_capacity(capacity: Any) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise LoraError(f"adapter set: capacity must be a positive integer, got {capacity!r}")
    return capacity


def empty_set(
    params: PyTree, spec: LoraSpec, capacity: int, *, rank: int | None = None, dtype: str = "float32"
) -> AdapterSet:
    """Return a set of ``capacity`` empty slots for adapters made with ``spec``'s targets on ``params``.

    Args:
      params: the base tree.
      spec: gives the targets (paths, modes, axes); adapters added later may have other ranks and alphas. Its
        DoRA kernels take DoRA and LoRA adapters (the set holds their gains); its LoRA kernels LoRA adapters only.
      capacity: ``N``, the number of slots; fixed for the set's life.
      rank: ``R``, the largest rank the set takes (default: the largest rank in ``spec``).
      dtype: the dtype of the stacked factors.

    Raises:
      SpecError: ``rank`` is not positive or exceeds a kernel's ``min(in, out)``.
      LoraError: ``capacity`` is not a positive integer.
    """
    targets = plan(params, spec)
    return _empty(params, targets, capacity, rank, dtype, {t.path for t in targets if t.rule.mode == "dora"})


def _empty(
    params: PyTree,
    targets: Sequence[Target],
    capacity: int,
    rank: int | None,
    dtype: str,
    gained: set[tuple[str, ...]],
) -> AdapterSet:
    """Return :func:`empty_set` of ``targets``, with gains at the kernels of ``gained`` (their paths)."""
    capacity = _check_capacity(capacity)
    if rank is None:
        ranks = [t.factor_rank for t in targets if t.layout is not None]
        if not ranks:
            raise SpecError("adapter set: the spec adapts no kernel (only fully trainable leaves); give rank=")
        rank = max(ranks)
    _check_rank(targets, rank)
    dtype = str(jnp.dtype(dtype))
    the_spec = set_spec(targets, rank, dtype)
    lora: dict = {}
    scales, gains = {}, {}
    for target in plan(params, the_spec):
        for path, leaf in variant_of(target).leaves(target).items():
            nested_set(lora, path, jnp.zeros((capacity, *leaf.shape), leaf.dtype))
        if target.layout is None:
            continue
        scales[target.name] = jnp.zeros((capacity,), jnp.float32)
        if target.path in gained:
            gains[target.name] = jnp.ones((capacity, *target.layout.stack_shape, *target.layout.out_shape))
    return AdapterSet(lora, scales, gains, jnp.zeros((capacity,), bool), the_spec)


def adapter_set(
    params: PyTree,
    loras: Sequence[tuple[PyTree, LoraSpec]],
    *,
    capacity: int | None = None,
    rank: int | None = None,
    dtype: str = "float32",
) -> AdapterSet:
    """Stack adapters of the same targets into a set; adapter ``i`` goes to slot ``i``.

    Args:
      params: the base tree.
      loras: ``(lora, spec)`` pairs; the specs may differ in rank, alpha, scaling and LoRA or DoRA, not in targets
        or axes. A kernel that is DoRA in any of them holds gains, so it takes DoRA adapters added later too.
      capacity: ``N`` (default: the number of adapters); the free slots stay empty for :func:`add`.
      rank: ``R`` (default: the largest rank among the adapters).
      dtype: the dtype of the stacked factors.

    Raises:
      LoraError: no adapters, or more than ``capacity``.
      AdapterMismatchError: an adapter's targets or axes differ from the first's, or its tree does not fit its spec.
      SpecError: a rank above ``R``.
    """
    if not loras:
        raise LoraError("adapter_set: give at least one (lora, spec) pair, or use empty_set")
    capacity = len(loras) if capacity is None else _check_capacity(capacity)
    if len(loras) > capacity:
        raise LoraError(f"adapter_set: {len(loras)} adapters do not fit a capacity of {capacity}")
    planned = [plan(params, spec) for _, spec in loras]
    if rank is None:
        rank = max(t.factor_rank for targets in planned for t in targets if t.layout is not None)
    gained = {t.path for targets in planned for t in targets if t.rule.mode == "dora"}
    out = _empty(params, planned[0], capacity, rank, dtype, gained)
    for slot, (lora, spec) in enumerate(loras):
        out = _put(params, lora, spec, out, slot)
    return out


def _slot_values(
    params: PyTree, lora: PyTree, spec: LoraSpec, lora_set: AdapterSet
) -> tuple[dict, dict[str, jax.Array], dict[str, jax.Array]]:
    """Return one adapter as a slot of ``lora_set``: its tree padded to rank ``R``, its scales and its gains."""
    mine = {target.path: (target, value) for target, value in bind(params, lora, spec)}
    theirs = {target.path: target for target in plan(params, lora_set.spec)}
    for path in mine:
        if path not in theirs:
            raise AdapterMismatchError(
                f"the adapter's spec adapts {path_str(path)}, which the set does not hold; a set takes adapters "
                "of the same targets only"
            )
    for path, target in theirs.items():
        if path not in mine:
            raise AdapterMismatchError(
                f"the set holds {path_str(path)}, which the adapter's spec does not adapt; a set takes adapters "
                "of the same targets only"
            )
        own = mine[path][0]
        if own.rule.mode == "dora" and own.name not in lora_set.gains:
            raise SpecError(
                f"{own.name}: the adapter is DoRA there, and the set's slots hold no gain for that kernel; build "
                "the set from a spec with mode='dora' there (empty_set), or with a DoRA adapter among adapter_set's"
            )
        if kind(own) != kind(target):
            raise AdapterMismatchError(
                f"{own.name}: the adapter's {own.rule.label} gives mode and axes {kind(own)}, the set {kind(target)}; "
                "a set takes adapters whose rules give the same axes"
            )
        if own.layout is not None and own.factor_rank > target.rule.rank:
            raise SpecError(
                f"{own.name}: rank {own.factor_rank} exceeds the set's rank {target.rule.rank}; "
                f"build the set with rank={own.factor_rank} or more"
            )
    row: dict = {}
    scales, gains = {}, {}
    base = dict(flatten(params)[0])
    for path, target in theirs.items():
        own, value = mine[path]
        if target.layout is None:
            nested_set(row, path, jnp.asarray(value).astype(target.dtype))
            continue
        if own.rule.mode == "dora":
            gains[target.name] = _DORA.gain(own, as_array(base[path]), value)
            value = value[:2]
        elif target.name in lora_set.gains:
            gains[target.name] = jnp.ones_like(lora_set.gains[target.name][0])
        a, b = value
        dtype, pad = jnp.dtype(target.rule.dtype), target.rule.rank - own.factor_rank
        n_stack = len(target.layout.stack)
        a = jnp.pad(jnp.asarray(a).astype(dtype), [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        b = jnp.pad(jnp.asarray(b).astype(dtype), [(0, 0)] * n_stack + [(0, pad)] + [(0, 0)] * (b.ndim - n_stack - 1))
        nested_set(row, (*path, A_KEY), a)
        nested_set(row, (*path, B_KEY), b)
        scales[target.name] = jnp.float32(own.rule.scale)
    return row, scales, gains


@jax.jit
def _write(
    lora_set: AdapterSet, slot: jax.Array, row: PyTree, scales: dict, gains: dict, used: jax.Array
) -> AdapterSet:
    """Return ``lora_set`` with slot ``slot`` holding ``row``; one trace per set structure, whatever the slot."""
    return AdapterSet(
        jax.tree_util.tree_map(lambda stack, value: stack.at[slot].set(value), lora_set.lora, row),
        {name: stack.at[slot].set(scales[name]) for name, stack in lora_set.scales.items()},
        {name: stack.at[slot].set(gains[name]) for name, stack in lora_set.gains.items()},
        lora_set.used.at[slot].set(used),
        lora_set.spec,
    )


def _check_slot(lora_set: AdapterSet, slot: Any) -> int:
    if not isinstance(slot, int | np.integer) or isinstance(slot, bool) or not 0 <= slot < lora_set.capacity:
        raise LoraError(f"adapter set: slot {slot!r} is not one of 0 .. {lora_set.capacity - 1}")
    return int(slot)


def _put(params: PyTree, lora: PyTree, spec: LoraSpec, lora_set: AdapterSet, slot: int) -> AdapterSet:
    row, scales, gains = _slot_values(params, lora, spec, lora_set)
    # After the cast to the set's dtype, which can overflow; a NaN would reach every row served from this slot.
    check_finite(row, f"adapter set slot {slot}: adapter leaf", NONFINITE_FIX, traced=is_traced(row))
    check_finite(gains, f"adapter set slot {slot}: DoRA gain of", NONFINITE_FIX, traced=is_traced(gains))
    return _write(lora_set, jnp.int32(slot), row, scales, gains, jnp.bool_(True))


def add(
    params: PyTree, lora: PyTree, spec: LoraSpec, lora_set: AdapterSet, slot: int | None = None
) -> tuple[AdapterSet, int]:
    """Return ``lora_set`` with the adapter in a free slot, and that slot; nothing is recompiled.

    Args:
      params: the base tree.
      lora: the adapter tree.
      spec: the spec ``lora`` was made with; the set's targets and axes, any rank up to ``R``, any alpha.
      lora_set: the set; it is not modified.
      slot: the free slot to fill (default: the first free one).

    Raises:
      LoraError: the set is full, or ``slot`` is out of range or holds an adapter (use :func:`replace`).
      AdapterMismatchError / SpecError: as :func:`adapter_set`.
    """
    used = lora_set.slots()
    if slot is None:
        free = [i for i in range(lora_set.capacity) if i not in used]
        if not free:
            raise LoraError(
                f"adapter set: all {lora_set.capacity} slots hold adapters; remove one, or build a larger set"
            )
        slot = free[0]
    slot = _check_slot(lora_set, slot)
    if slot in used:
        raise LoraError(f"adapter set: slot {slot} holds an adapter; use replace to swap it")
    return _put(params, lora, spec, lora_set, slot), slot


def replace(params: PyTree, lora: PyTree, spec: LoraSpec, lora_set: AdapterSet, slot: int) -> AdapterSet:
    """Return ``lora_set`` with the adapter in ``slot`` swapped for ``lora``; nothing is recompiled.

    Raises:
      LoraError: ``slot`` is out of range or empty (use :func:`add`).
      AdapterMismatchError / SpecError: as :func:`adapter_set`.
    """
    slot = _check_slot(lora_set, slot)
    if slot not in lora_set.slots():
        raise LoraError(f"adapter set: slot {slot} is empty; use add to fill it")
    return _put(params, lora, spec, lora_set, slot)


def remove(lora_set: AdapterSet, slot: int) -> AdapterSet:
    """Return ``lora_set`` with ``slot`` emptied (it then serves the base); nothing is recompiled.

    Raises:
      LoraError: ``slot`` is out of range or already empty.
    """
    slot = _check_slot(lora_set, slot)
    if slot not in lora_set.slots():
        raise LoraError(f"adapter set: slot {slot} is already empty")
    zeros = jax.tree_util.tree_map(lambda stack: jnp.zeros(stack.shape[1:], stack.dtype), lora_set.lora)
    scales = {name: jnp.float32(0.0) for name in lora_set.scales}
    gains = {name: jnp.ones_like(stack[0]) for name, stack in lora_set.gains.items()}
    return _write(lora_set, jnp.int32(slot), zeros, scales, gains, jnp.bool_(False))


def check_ids(lora_set: AdapterSet, adapter_ids: Any) -> None:
    """Check that each id is -1 (the base) or a slot that holds an adapter.

    Under ``jax.jit`` (traced ids) nothing can be checked here: an id out of range or of an empty slot then gives
    its row NaN outputs (see :func:`gather_rows`), never the base's.

    Raises:
      LoraError: ``adapter_ids`` is not a 1-dim integer array, or an id names no adapter (the first such position).
    """
    ids = jnp.asarray(adapter_ids) if not is_traced(adapter_ids) else adapter_ids
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise LoraError(f"adapter_ids must be a 1-dim integer array [B], got shape {ids.shape} and dtype {ids.dtype}")
    if is_traced((adapter_ids, lora_set.used)):
        return
    values, used = np.asarray(ids), np.asarray(lora_set.used)
    for position, value in enumerate(values.tolist()):
        if value == -1:
            continue
        if not 0 <= value < lora_set.capacity:
            raise LoraError(
                f"adapter_ids[{position}] = {value} is no slot of the set (0 .. {lora_set.capacity - 1}, "
                "or -1 for the base)"
            )
        if not used[value]:
            raise LoraError(f"adapter_ids[{position}] = {value} names an empty slot; add an adapter there or use -1")


def gather_rows(params: PyTree, lora_set: AdapterSet, adapter_ids: jax.Array) -> PyTree:
    """Return the adapter of each row: the set spec's adapter tree with a leading batch axis ``[B, ...]``.

    Each row's ``B`` carries its adapter's scale (the set spec's own scale is 1); at a kernel that takes DoRA, the
    row's gain sits beside its factors under :data:`GAIN_KEY` (``per_example`` applies it). A row whose id is -1,
    out of range or an empty slot gets zero factors, gain 1 and the base's value of every fully trainable leaf,
    and the latter two a NaN scale, so their outputs are NaN rather than the base's. Jittable.

    Args:
      params: the base tree.
      lora_set: the set.
      adapter_ids: ``[B]`` int, a slot per row or -1 for the base alone.

    Returns:
      ``{"a": [B, *stack, *in, R], "b": [B, *stack, R, *out]}`` at each kernel (and ``"g": [B, *stack, *out]`` at
      each kernel that takes DoRA), ``[B, *shape]`` at each fully trainable leaf.
    """
    ids = jnp.asarray(adapter_ids)
    safe = jnp.clip(ids, 0, lora_set.capacity - 1)
    valid = (ids >= 0) & (ids < lora_set.capacity) & jnp.take(lora_set.used, safe)
    bad = (ids != -1) & ~valid
    targets = {target.path: target for target in plan(params, lora_set.spec)}
    targets_by_name = {target.name: target.path for target in targets.values()}
    base = dict(flatten(params)[0])
    rows: dict = {}
    for path, stack in flatten(lora_set.lora)[0]:
        taken = jnp.take(stack, safe, axis=0)
        expand = (slice(None),) + (None,) * (taken.ndim - 1)
        if path in targets:  # a fully trainable leaf: the adapter's value, or the base's
            rows_value = jnp.where(valid[expand], taken, jnp.asarray(base[path])[None].astype(taken.dtype))
        elif path[-1] == B_KEY:
            scale = jnp.where(valid, jnp.take(lora_set.scales[path_str(path[:-1])], safe), 0.0)
            # An id that is neither -1 nor a filled slot (only possible under jit, where check_ids cannot look)
            # makes its row NaN rather than silently serving the base.
            scale = jnp.where(bad, jnp.nan, scale)
            rows_value = taken * scale[expand].astype(taken.dtype)
        else:
            rows_value = taken
        nested_set(rows, path, rows_value)
    for name, stack in lora_set.gains.items():
        taken = jnp.take(stack, safe, axis=0)
        expand = (slice(None),) + (None,) * (taken.ndim - 1)
        nested_set(rows, (*targets_by_name[name], GAIN_KEY), jnp.where(valid[expand], taken, 1.0))
    return rows


def split_gains(params: PyTree, rows: PyTree, spec: LoraSpec) -> tuple[PyTree, dict[str, jax.Array]]:
    """Return rows gathered from a set of spec ``spec`` without their gains, and the gains by kernel path.

    Returns:
      ``(rows as the set spec's adapter tree, {kernel path: [B, *stack, *out]})``.
    """
    kernels = {target.path for target in plan(params, spec) if target.layout is not None}
    kept: dict = {}
    gains = {}
    for path, value in flatten(rows)[0]:
        if path[-1] == GAIN_KEY and path[:-1] in kernels:
            gains[path_str(path[:-1])] = value
        else:
            nested_set(kept, path, value)
    return kept, gains
