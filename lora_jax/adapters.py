"""The adapter tree: its layout, and the check that it fits a base tree and spec.

An adapter tree (``lora``) is a nested dict that mirrors the base tree's paths.
What it holds at each target's path is the
target's variant's business (:mod:`lora_jax.variants`): ``{"a": A [*stack, *in, r],
"b": B [*stack, r, *out]}`` at an adapted kernel, the trainable copy at a
fully trainable leaf. Nothing else is in it, so every leaf of ``lora``
is trainable and ``lora`` can go straight to ``jax.grad``, optax or orbax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import AdapterMismatchError
from lora_jax.paths import PathTuple, flatten, path_str
from lora_jax.plan import Target, abstract_leaf, plan
from lora_jax.spec import LoraSpec
from lora_jax.variants import variant_of


def expected_leaves(targets: tuple[Target, ...]) -> dict[PathTuple, tuple[tuple[int, ...], Target]]:
    """Map the path of each adapter-tree leaf to its shape and the target it belongs to."""
    expected = {}
    for target in targets:
        for path, leaf in variant_of(target).leaves(target).items():
            expected[path] = (tuple(leaf.shape), target)
    return expected


def check_fits(targets: tuple[Target, ...], lora: Any) -> dict[PathTuple, Any]:
    """Check that ``lora`` has exactly the leaves and shapes ``targets`` call for.

    Returns:
      The adapter-tree leaves by path.

    Raises:
      AdapterMismatchError: naming the first missing, unexpected or misshapen path.
    """
    expected = expected_leaves(targets)
    found, _ = flatten(lora)
    leaves = dict(found)
    missing = [p for p in expected if p not in leaves]
    if missing:
        raise AdapterMismatchError(
            f"adapter tree has no leaf at {path_str(missing[0])} "
            f"({len(missing)} missing); was it made for another spec or base tree?"
        )
    extra = [p for p in leaves if p not in expected]
    if extra:
        raise AdapterMismatchError(
            f"adapter tree has a leaf at {path_str(extra[0])} that the spec does not adapt "
            f"({len(extra)} unexpected); was it made for another spec or base tree?"
        )
    for path, value in leaves.items():
        want = expected[path][0]
        got = abstract_leaf(value)
        if tuple(got.shape) != tuple(want):
            raise AdapterMismatchError(f"adapter leaf {path_str(path)} has shape {tuple(got.shape)}, expected {want}")
        if not jnp.issubdtype(got.dtype, jnp.floating):  # numpy alone does not count bfloat16
            raise AdapterMismatchError(f"adapter leaf {path_str(path)} has dtype {got.dtype}, expected floating")
    return leaves


def bind(params: Any, lora: Any, spec: LoraSpec) -> list[tuple[Target, Any]]:
    """Pair each target of ``spec`` on ``params`` with its value in ``lora``, after checking that ``lora`` fits.

    Returns:
      ``(target, value)`` in the base tree's leaf order; the value is what the
      target's variant gathers (``(A, B)`` for LoRA, the leaf for a fully trainable one).
    """
    targets = plan(params, spec)
    leaves = check_fits(targets, lora)
    return [(target, variant_of(target).value(target, leaves)) for target in targets]


def signature(params: Any, spec: LoraSpec) -> dict[str, dict]:
    """Describe each leaf of the adapter tree by the settings that give its numbers meaning.

    Adapter files and training checkpoints store this, so a file is only read
    back under a spec and base that give every leaf the same shape, mode, rank
    and scale.

    Returns:
      ``{path: {"shape", "mode", "rank", "scale"}}``; rank and scale are None
      for fully trainable leaves.
    """
    out = {}
    for path, (shape, target) in expected_leaves(plan(params, spec)).items():
        out[path_str(path)] = {"shape": list(shape), "mode": target.rule.mode, **variant_of(target).signature(target)}
    return out


_LABELS = {"rank": "rank", "scale": "scale (alpha / r)", "mode": "mode", "shape": "shape"}
_SHOWN_TARGETS = 3  # leaf names listed per "targets:" phrase


def signature_differences(
    saved: dict[str, dict], wanted: dict[str, dict], *, saved_in: str = "the checkpoint"
) -> list[str]:
    """Return what differs between two adapter signatures (:func:`signature`), one phrase per difference.

    Adapter files and training checkpoints both compare with this, so a changed
    rank, scale, mode, shape or set of targets reads the same wherever it is found.

    Args:
      saved: the signature a file or checkpoint was written with.
      wanted: the signature of the current base and spec.
      saved_in: how the phrases name where ``saved`` came from.

    Returns:
      Phrases such as ``"targets: ... only in the checkpoint (2 leaves)"`` or
      ``"encoder/query/kernel/a: rank 4 in the checkpoint, 8 now"``; empty
      when the signatures agree.
    """
    out = []
    only_saved = sorted(set(saved) - set(wanted))
    only_wanted = sorted(set(wanted) - set(saved))
    if only_saved:
        shown = ", ".join(only_saved[:_SHOWN_TARGETS])
        out.append(f"targets: {shown} only in {saved_in} ({len(only_saved)} leaves)")
    if only_wanted:
        shown = ", ".join(only_wanted[:_SHOWN_TARGETS])
        out.append(f"targets: {shown} only in this spec ({len(only_wanted)} leaves)")
    for name in sorted(set(saved) & set(wanted)):
        before_all, now_all = saved[name], wanted[name]
        # Settings a variant adds beyond the four known ones are compared too, after them, where the saved
        # signature records them (files written before a setting was recorded lack it).
        keys = [*_LABELS, *sorted(set(before_all) - set(_LABELS))]
        for key in keys:
            before, now = before_all.get(key), now_all.get(key)
            if before != now:
                out.append(f"{name}: {_LABELS.get(key, key)} {before} in {saved_in}, {now} now")
    return out


def trainable_count(lora: Any) -> int:
    """Count the scalars in an adapter tree: what ``describe(params, spec).trainable_size`` reports."""
    return sum(int(np.prod(abstract_leaf(x).shape)) for x in jax.tree_util.tree_leaves(lora))
