"""``LoraSpec``: which leaves get adapters, and how.

A spec is an ordered tuple of :class:`Rule`; for each leaf of the base tree the
first rule whose pattern matches decides. Everything here is static and
hashable, so a spec can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax

from lora_jax.paths import Predicate, check_pattern, matches

Mode = Literal["lora", "dora", "train", "freeze"]
ADAPTED_MODES = ("lora", "dora")
"""Modes that add low-rank factors to a kernel (and so need its layout)."""
Scaling = Literal["standard", "rslora"]
Init = Literal["kaiming_uniform", "gaussian"]
Axes = tuple[int, ...]


def _as_axes(value: int | Axes | None) -> Axes | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One entry of a :class:`LoraSpec`.

    Args:
      pattern: a regular expression that must match the whole ``/``-joined
        path of a leaf (``re.fullmatch``), or a predicate
        ``(path, jax.ShapeDtypeStruct) -> bool``.
      mode: ``"lora"`` adds a low-rank adapter; ``"dora"`` adds one with a
        trainable magnitude per output column (DoRA, Liu et al. 2024); ``"train"`` makes the leaf fully
        trainable (a new head; PEFT's ``modules_to_save``); ``"freeze"`` keeps
        it frozen and stops later rules from matching it.
      rank: ``r``, the inner dimension of ``A [*in, r]`` and ``B [r, *out]``.
      alpha: the numerator of the scale ``s``.
      scaling: ``"standard"`` gives ``s = alpha / r``; ``"rslora"`` gives
        ``s = alpha / sqrt(r)`` (Kalajdzievski, 2023).
      init: the distribution of ``A``. ``"kaiming_uniform"`` is PEFT's and
        loralib's default, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
        ``fan_in`` the product of the input axes; ``"gaussian"`` draws
        ``N(0, init_std^2)`` (``init_std`` defaults to ``1/r`` as in PEFT).
      init_std: standard deviation for ``init="gaussian"``.
      dropout: LoRA dropout rate on the adapter's input (training only; needs
        the factored path).
      dtype: dtype of ``A`` and ``B``, float32 unless set, whatever the base.
      in_axes / out_axes / stack_axes: how the kernel's axes split. Two-dim
        kernels ``[in, out]`` need none. Give ``stack_axes`` for the leading
        layer axis of ``nn.scan`` stacks; of ``in_axes`` and ``out_axes`` one
        is enough, the other is what remains. Negative axes count from the end.
      name: a label shown in ``describe`` and error messages.
    """

    pattern: str | Predicate
    mode: Mode = "lora"
    rank: int = 8
    alpha: float = 8.0
    scaling: Scaling = "standard"
    init: Init = "kaiming_uniform"
    init_std: float | None = None
    dropout: float = 0.0
    dtype: str = "float32"
    in_axes: Axes | None = None
    out_axes: Axes | None = None
    stack_axes: Axes | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        for field in ("in_axes", "out_axes", "stack_axes"):
            object.__setattr__(self, field, _as_axes(getattr(self, field)))
        object.__setattr__(self, "dtype", str(jax.numpy.dtype(self.dtype)))
        label = self.label
        if self.mode not in (*ADAPTED_MODES, "train", "freeze"):
            raise ValueError(f"{label}: mode must be 'lora', 'dora', 'train' or 'freeze', got {self.mode!r}")
        check_pattern(self.pattern, label)
        if self.mode not in ADAPTED_MODES:
            return
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{label}: rank must be a positive integer, got {self.rank!r}")
        if self.scaling not in ("standard", "rslora"):
            raise ValueError(f"{label}: scaling must be 'standard' or 'rslora', got {self.scaling!r}")
        if self.init not in ("kaiming_uniform", "gaussian"):
            raise ValueError(f"{label}: init must be 'kaiming_uniform' or 'gaussian', got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{label}: dropout must be in [0, 1), got {self.dropout!r}")
        if not jax.numpy.issubdtype(self.dtype, jax.numpy.floating):
            raise ValueError(f"{label}: adapter dtype must be floating, got {self.dtype}")

    @property
    def label(self) -> str:
        if self.name:
            return f"rule {self.name!r}"
        pattern = self.pattern if isinstance(self.pattern, str) else getattr(self.pattern, "__name__", "predicate")
        return f"rule {pattern!r}"

    @property
    def scale(self) -> float:
        """``s``: ``alpha / r`` (standard) or ``alpha / sqrt(r)`` (rsLoRA)."""
        if self.scaling == "rslora":
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def matches(self, path: str, leaf: jax.ShapeDtypeStruct) -> bool:
        """Whether this rule's pattern matches the leaf at ``path`` (see :func:`lora_jax.paths.matches`)."""
        return matches(self.pattern, path, leaf)


def trainable(pattern: str | Predicate, name: str | None = None) -> Rule:
    """Return a rule that makes matching leaves fully trainable (PEFT's ``modules_to_save``)."""
    return Rule(pattern, mode="train", name=name)


def freeze(pattern: str | Predicate, name: str | None = None) -> Rule:
    """Return a rule that keeps matching leaves frozen and shields them from later rules."""
    return Rule(pattern, mode="freeze", name=name)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """An ordered, hashable set of rules; the first rule that matches a leaf wins.

    ``LoraSpec(rules=[...])`` accepts any iterable of :class:`Rule` and stores a tuple.
    """

    rules: tuple[Rule, ...]

    def __init__(self, rules: Any) -> None:
        if isinstance(rules, Rule):
            rules = (rules,)
        rules = tuple(rules)
        if not rules:
            raise ValueError("LoraSpec needs at least one rule")
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"LoraSpec rules must be Rule instances, got {type(rule).__name__}")
        object.__setattr__(self, "rules", rules)

    def __add__(self, other: LoraSpec) -> LoraSpec:
        return LoraSpec(self.rules + other.rules)

    @property
    def has_dropout(self) -> bool:
        return any(r.mode in ADAPTED_MODES and r.dropout > 0 for r in self.rules)
