"""Specs that name their targets exactly: the spec of an adapter set and of a weighted combination."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lora_jax.errors import SpecError
from lora_jax.plan import Target
from lora_jax.spec import LoraSpec, Rule

NONFINITE_FIX = "the adapter diverged in training or its file is damaged; serve another"
"""What a refusal of an adapter holding NaN or Inf tells the user to do."""


def kind(target: Target) -> tuple[Any, ...]:
    """Return what must agree between two adapters of one kernel: the mode and the axes of its layout.

    LoRA and DoRA kernels are of one kind (``"lora"``): a DoRA adapter is LoRA's factors and a gain per column.
    """
    layout = target.layout
    if layout is None:
        return (target.rule.mode,)
    return ("lora", layout.stack, layout.inputs, layout.outputs)


def check_lora_or_train(target: Target, what: str) -> None:
    """Refuse a target that is neither a LoRA kernel nor a fully trainable leaf (DoRA), naming it.

    Raises:
      SpecError: naming the path, its rule and ``what`` takes only LoRA adapters.
    """
    if target.rule.mode not in ("lora", "train"):
        raise SpecError(
            f"{target.name}: {target.rule.label} is a {target.rule.mode!r} target; {what} takes LoRA factors and "
            "fully trainable leaves only: merge this adapter and serve it alone"
        )


def exact_spec(targets: Sequence[Target], ranks: Sequence[int | None], *, dtype: str, name: str) -> LoraSpec:
    """Return a spec adapting exactly ``targets``' paths, with their modes and axes, ``ranks`` and scale 1.

    Targets of the same kind (:func:`kind`: DoRA targets give LoRA rules), axes and rank share one rule whose pattern
    lists their paths; ``alpha`` equals the rank, so the scale ``alpha / r`` is 1 (what an adapter's ``B`` already
    carries).

    Args:
      targets: LoRA kernels and fully trainable leaves.
      ranks: the rank of each LoRA target (None for a fully trainable leaf).
      dtype: the dtype of the factors.
      name: the rules' name, shown in their errors.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for target, rank in zip(targets, ranks, strict=True):
        groups.setdefault((*kind(target), rank), []).append(re.escape(target.name))
    rules = []
    for key, names in groups.items():
        pattern = "(?:" + "|".join(names) + ")"
        if key[0] == "train":
            rules.append(Rule(pattern, mode="train", name=name))
            continue
        _, stack, inputs, outputs, rank = key
        rules.append(
            Rule(
                pattern,
                rank=rank,
                alpha=float(rank),
                dtype=dtype,
                stack_axes=stack or None,
                in_axes=inputs,
                out_axes=outputs,
                name=name,
            )
        )
    return LoraSpec(rules)
