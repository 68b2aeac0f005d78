"""Weighted combinations of adapters, as PEFT's ``add_weighted_adapter`` makes them.

With weights ``w_i``, adapters ``(A_i, B_i)`` of scale ``s_i``, and ``delta_i = s_i A_i B_i``:

- ``"linear"``: ``A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i`` and ``B = sum_i sqrt(|w_i s_i|) B_i`` (the sign
  goes on ``A`` only). Every adapter must have the same rank at a kernel. A rough approximation: ``A B`` holds the
  cross terms ``A_i B_j`` too.
- ``"cat"``: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]`` and ``B = [B_1; B_2; ...]`` along the rank: ``A B`` is exactly
  ``sum_i w_i delta_i``, at the sum of the ranks.
- ``"svd"``: the truncated SVD of ``sum_i w_i delta_i`` (per layer of a stacked kernel): ``A = U[:, :k]``,
  ``B = diag(S[:k]) V^T[:k]``, rank ``k`` (default: the largest rank of the adapters), the entries of both
  optionally clamped to the ``clamp`` quantile of their absolute values.

The result has scale 1 (``alpha = r``, as PEFT sets ``lora_alpha = r``). As in PEFT: with one adapter the
combination is ``"linear"``; a kernel some adapters leave alone combines those that adapt it; a fully trainable
leaf (PEFT's ``modules_to_save``) may belong to one adapter only. Unlike PEFT, that leaf keeps the adapter's
trained value (PEFT gives the new adapter a fresh copy of the base module).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters import bind
from lora_jax.errors import AdapterMismatchError, LoraError, SpecError
from lora_jax.finite import check_finite, is_traced
from lora_jax.paths import PathTuple, nested_set, path_str
from lora_jax.plan import Target
from lora_jax.serve.specs import NONFINITE_FIX, check_lora_or_train, exact_spec, kind
from lora_jax.spec import LoraSpec
from lora_jax.typing import PyTree
from lora_jax.variants import A_KEY, B_KEY

Combination = Literal["linear", "cat", "svd"]
COMBINATIONS = ("linear", "cat", "svd")
RULE_NAME = "weighted adapter"


def _linear(parts: list[tuple[float, Target, jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    a_sum, b_sum = 0.0, 0.0
    for w, target, a, b in parts:
        ws = w * target.rule.scale
        root = math.sqrt(abs(ws))
        a_sum = a_sum + (root if ws >= 0 else -root) * a.astype(jnp.float32)
        b_sum = b_sum + root * b.astype(jnp.float32)
    return jnp.asarray(a_sum), jnp.asarray(b_sum)


def _cat(parts: list[tuple[float, Target, jax.Array, jax.Array]], n_stack: int) -> tuple[jax.Array, jax.Array]:
    a = jnp.concatenate([w * t.rule.scale * a.astype(jnp.float32) for w, t, a, _ in parts], axis=-1)
    b = jnp.concatenate([b.astype(jnp.float32) for _, _, _, b in parts], axis=n_stack)
    return a, b


def _svd(
    parts: list[tuple[float, Target, jax.Array, jax.Array]], rank: int, clamp: float | None
) -> tuple[jax.Array, jax.Array]:
    layout = parts[0][1].layout
    assert layout is not None
    stack = layout.stack_shape
    delta = 0.0
    for w, target, a, b in parts:
        a2 = a.astype(jnp.float32).reshape(*stack, layout.in_size, target.rule.rank)
        b2 = b.astype(jnp.float32).reshape(*stack, target.rule.rank, layout.out_size)
        delta = delta + (w * target.rule.scale) * jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    u, s, vt = jnp.linalg.svd(jnp.asarray(delta), full_matrices=False)
    a_new = u[..., :rank]  # [*stack, in, k]
    b_new = s[..., :rank, None] * vt[..., :rank, :]  # [*stack, k, out]
    if clamp is not None:
        # One threshold per matrix, as PEFT takes it per module: the quantile of both factors' entries.
        flat = jnp.concatenate([b_new.reshape(*stack, -1), a_new.reshape(*stack, -1)], axis=-1)
        high = jnp.quantile(flat, clamp, axis=-1)[..., None, None]
        a_new, b_new = jnp.clip(a_new, -high, high), jnp.clip(b_new, -high, high)
    return (
        a_new.reshape(*stack, *layout.in_shape, rank),
        b_new.reshape(*stack, rank, *layout.out_shape),
    )


def weighted_adapter(
    params: PyTree,
    loras: Sequence[tuple[PyTree, LoraSpec]],
    weights: Sequence[float],
    *,
    combination: Combination = "svd",
    rank: int | None = None,
    clamp: float | None = None,
) -> tuple[PyTree, LoraSpec]:
    """Return one adapter (tree and spec) combining ``loras`` with ``weights``, as PEFT's ``add_weighted_adapter``.

    Args:
      params: the base tree.
      loras: ``(lora, spec)`` pairs for ``params``; their ranks and alphas may differ.
      weights: one number per adapter; negative weights subtract.
      combination: ``"linear"``, ``"cat"`` or ``"svd"`` (see the module's docstring); ``"linear"`` whenever
        there is one adapter.
      rank: the rank of ``"svd"`` (default: the largest rank of any adapter at any kernel).
      clamp: ``"svd"`` only: a quantile in (0, 1]; the factors' entries are clamped to ``[-q, q]`` with ``q`` that
        quantile of all their entries (PEFT's ``svd_clamp``).

    Returns:
      ``(lora, spec)``: ``spec`` adapts each kernel any adapter adapts, rank as the combination gives, scale 1;
      ``merge(params, lora, spec)`` is the combined model.

    Raises:
      LoraError: no adapters, a weight per adapter missing or not finite, an unknown combination, or options that
        do not apply to it.
      AdapterMismatchError: two adapters give one kernel other axes, a fully trainable leaf belongs to more than
        one adapter, or ``"linear"`` meets different ranks at a kernel.
      SpecError: a DoRA adapter, or an SVD rank above a kernel's ``min(in, out)``.
    """
    if not loras:
        raise LoraError("weighted_adapter: give at least one (lora, spec) pair")
    if len(weights) != len(loras):
        raise LoraError(f"weighted_adapter: {len(loras)} adapters but {len(weights)} weights; give one weight each")
    for i, w in enumerate(weights):
        if getattr(w, "shape", None) == () and np.issubdtype(np.asarray(w).dtype, np.number):
            w = np.asarray(w).item()  # a JAX or numpy scalar array
        if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w):
            raise LoraError(f"weighted_adapter: weights[{i}] = {w!r} is not a finite number")
    for i, (lora, _) in enumerate(loras):
        check_finite(lora, f"weighted_adapter: adapter {i}'s leaf", NONFINITE_FIX, traced=is_traced(lora))
    if combination not in COMBINATIONS:
        raise LoraError(f"weighted_adapter: combination {combination!r} is not one of {', '.join(COMBINATIONS)}")
    if combination != "svd" and (rank is not None or clamp is not None):
        raise LoraError(f"weighted_adapter: rank and clamp apply to combination='svd', not {combination!r}")
    if clamp is not None and not 0.0 < clamp <= 1.0:
        raise LoraError(f"weighted_adapter: clamp {clamp!r} is not a quantile in (0, 1]")
    if len(loras) == 1:
        if rank is not None or clamp is not None:
            raise LoraError(
                "weighted_adapter: one adapter combines linearly (as in PEFT), where rank and clamp do not apply; "
                "give two or more adapters, or leave them out"
            )
        combination = "linear"

    by_path: dict[PathTuple, list[tuple[float, Target, Any]]] = {}
    for (lora, spec), w in zip(loras, weights):
        for target, value in bind(params, lora, spec):
            check_lora_or_train(target, RULE_NAME)
            by_path.setdefault(target.path, []).append((float(w), target, value))

    if combination == "svd":
        ranks = [t.rule.rank for entries in by_path.values() for _, t, _ in entries if t.layout is not None]
        rank = rank if rank is not None else max(ranks, default=1)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise LoraError(f"weighted_adapter: rank {rank!r} is not a positive integer")

    new: dict = {}
    targets, new_ranks = [], []
    for path, entries in by_path.items():
        first = entries[0][1]
        for _, target, _ in entries[1:]:
            if kind(target) != kind(first):
                raise AdapterMismatchError(
                    f"{path_str(path)}: the adapters give mode and axes {kind(first)} and {kind(target)}; "
                    "combine adapters whose rules give the same axes"
                )
        if first.layout is None:
            if len(entries) > 1:
                raise AdapterMismatchError(
                    f"{path_str(path)}: {len(entries)} adapters train this leaf in full; its trained values cannot "
                    "be combined (PEFT refuses the same): drop it from all specs but one"
                )
            nested_set(new, path, entries[0][2])
            targets.append(first)
            new_ranks.append(None)
            continue
        parts = [(w, t, value[0], value[1]) for w, t, value in entries]
        if combination == "linear":
            found = sorted({t.rule.rank for _, t, _ in entries})
            if len(found) > 1:
                raise AdapterMismatchError(
                    f"{path_str(path)}: the adapters have ranks {found} here; combination='linear' needs one rank "
                    "(as in PEFT): use 'cat' or 'svd'"
                )
            a, b = _linear(parts)
        elif combination == "cat":
            total, limit = sum(t.rule.rank for _, t, _ in entries), min(first.layout.in_size, first.layout.out_size)
            if total > limit:
                raise SpecError(
                    f"weighted_adapter: 'cat' gives rank {total} at {path_str(path)}, above min(in, out) = {limit}, "
                    f"which no spec holds; use combination='svd' with rank={limit} (exact at that rank)"
                )
            a, b = _cat(parts, len(first.layout.stack))
        else:
            assert rank is not None
            limit = min(first.layout.in_size, first.layout.out_size)
            if rank > limit:
                raise SpecError(f"weighted_adapter: rank {rank} exceeds min(in, out) = {limit} for {path_str(path)}")
            a, b = _svd(parts, rank, clamp)
        nested_set(new, (*path, A_KEY), a)
        nested_set(new, (*path, B_KEY), b)
        targets.append(first)
        new_ranks.append(int(a.shape[-1]))
    check_finite(new, "weighted_adapter: the combined leaf", "the weights overflow float32; use smaller ones")
    return new, exact_spec(targets, new_ranks, dtype="float32", name=RULE_NAME)
