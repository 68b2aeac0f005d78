"""``LoraSpec``: which leaves get adapters, and how.

A spec is an ordered tuple of :class:`Rule`; for each leaf of the base tree the
first rule whose pattern matches decides. Everything here is static and
hashable, so a spec can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, Literal

import jax

from lora_jax.errors import CheckpointCorruptError, SpecError
from lora_jax.paths import Predicate, check_pattern, matches
from lora_jax.typing import PathLike

Mode = Literal["lora", "dora", "train", "freeze"]
ADAPTED_MODES = ("lora", "dora")
"""Modes that add low-rank factors to a kernel (and so need its layout)."""
Scaling = Literal["standard", "rslora"]
Init = Literal["kaiming_uniform", "gaussian"]
Axes = tuple[int, ...]

SPEC_VERSION = 1
"""The version of :meth:`LoraSpec.to_dict`'s layout; :meth:`LoraSpec.from_dict` reads this one only."""
SPEC_METADATA_KEY = "spec"
"""The adapter file's metadata entry that holds the spec as JSON."""


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
      slices: names of equal slices of one output axis of a fused kernel, in order along it, e.g.
        ``("q", "k", "v")`` for GPT-2's ``c_attn`` (loralib's ``MergedLinear``). Each adapted slice gets its
        own rank-``r`` factors; the update of every other slice is exactly zero (see
        :class:`lora_jax.variants.SlicedLowRank`). Needs ``mode="lora"``.
      adapt: the slices that get an adapter, e.g. ``("q", "v")``; default all of ``slices``. Stored in
        the order of ``slices``, which is the order of their blocks in ``A``'s and ``B``'s rank axis.
      slice_axis: the kernel axis the slices split (one of its output axes; negative counts from the end);
        default the first output axis.
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
    slices: tuple[str, ...] | None = None
    adapt: tuple[str, ...] | None = None
    slice_axis: int | None = None

    def __post_init__(self) -> None:
        for field in ("in_axes", "out_axes", "stack_axes"):
            object.__setattr__(self, field, _as_axes(getattr(self, field)))
        object.__setattr__(self, "dtype", str(jax.numpy.dtype(self.dtype)))
        label = self.label
        if self.mode not in (*ADAPTED_MODES, "train", "freeze"):
            raise ValueError(f"{label}: mode must be 'lora', 'dora', 'train' or 'freeze', got {self.mode!r}")
        check_pattern(self.pattern, label)
        self._check_slices(label)
        if self.mode not in ADAPTED_MODES:
            return
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{label}: rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not math.isfinite(self.alpha):
            raise ValueError(f"{label}: alpha must be a finite number, got {self.alpha!r}")
        if self.alpha == 0:
            # A zero scale keeps B's gradient at zero: the adapter would never leave the base model.
            raise ValueError(f"{label}: alpha is 0, so the adapter's scale alpha/r is 0 and it never trains")
        if self.scaling not in ("standard", "rslora"):
            raise ValueError(f"{label}: scaling must be 'standard' or 'rslora', got {self.scaling!r}")
        if self.init not in ("kaiming_uniform", "gaussian"):
            raise ValueError(f"{label}: init must be 'kaiming_uniform' or 'gaussian', got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{label}: dropout must be in [0, 1), got {self.dropout!r}")
        if not jax.numpy.issubdtype(self.dtype, jax.numpy.floating):
            raise ValueError(f"{label}: adapter dtype must be floating, got {self.dtype}")

    def _check_slices(self, label: str) -> None:
        """Check ``slices``, ``adapt`` and ``slice_axis``; store them as tuples, ``adapt`` in slice order."""
        if self.slices is None:
            for field in ("adapt", "slice_axis"):
                if getattr(self, field) is not None:
                    raise SpecError(f"{label}: {field} needs slices, the names of the fused kernel's output slices")
            return
        slices = _names(self.slices, "slices", label, "('q', 'k', 'v')")
        if len(slices) < 2:
            raise SpecError(f"{label}: slices {slices} names one slice; give two or more, or leave slices out")
        if self.mode != "lora":
            raise SpecError(f"{label}: slices need mode='lora' (got {self.mode!r})")
        adapt = slices if self.adapt is None else _names(self.adapt, "adapt", label, "('q', 'v')")
        unknown = [name for name in adapt if name not in slices]
        if unknown:
            raise SpecError(f"{label}: adapt names {unknown[0]!r}, which is not one of slices {slices}")
        if self.slice_axis is not None and (isinstance(self.slice_axis, bool) or not isinstance(self.slice_axis, int)):
            raise SpecError(f"{label}: slice_axis must be an integer kernel axis, got {self.slice_axis!r}")
        object.__setattr__(self, "slices", slices)
        object.__setattr__(self, "adapt", tuple(name for name in slices if name in adapt))

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


def _names(value: Any, field: str, label: str, example: str) -> tuple[str, ...]:
    """Return ``value`` as a tuple of distinct, non-empty names, or raise ``SpecError`` naming ``field``."""
    if isinstance(value, str) or not isinstance(value, tuple | list):
        raise SpecError(f"{label}: {field} must be a tuple of names such as {example}, got {value!r}")
    names = tuple(value)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise SpecError(f"{label}: {field} must be non-empty names such as {example}, got {value!r}")
    if len(set(names)) != len(names):
        raise SpecError(f"{label}: {field} {names} repeats a name")
    return names


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

    @property
    def storable(self) -> bool:
        """Whether :meth:`to_dict` can store this spec: no rule has a predicate pattern."""
        return all(isinstance(rule.pattern, str) for rule in self.rules)

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as JSON-safe data: ``{"version": 1, "rules": [{field: value}, ...]}``.

        Every :class:`Rule` field is stored; axes become lists. :meth:`from_dict` reads it back.

        Raises:
          SpecError: a rule has a predicate pattern, which cannot be stored (names the rule).
        """
        return {"version": SPEC_VERSION, "rules": [_rule_to_dict(rule, index) for index, rule in enumerate(self.rules)]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraSpec:
        """Build a spec from :meth:`to_dict`'s data, checking every key and type.

        A rule may leave out fields (they take :class:`Rule`'s defaults); ``pattern`` is required.

        Raises:
          SpecError: not a mapping, another version, an unknown key, a missing pattern, a value of the
            wrong type or one :class:`Rule` refuses (names the field and the rule's index).
        """
        if not isinstance(data, Mapping):
            raise SpecError(f"a stored spec is a mapping with 'version' and 'rules', got {type(data).__name__}")
        unknown = sorted(set(data) - {"version", "rules"})
        if unknown:
            raise SpecError(f"stored spec: unknown key {unknown[0]!r}; expected 'version' and 'rules'")
        if data.get("version") != SPEC_VERSION:
            raise SpecError(
                f"stored spec: version {data.get('version')!r} is not {SPEC_VERSION}; "
                "it was written by another lora_jax, pass the spec in code instead"
            )
        rules = data.get("rules")
        if not isinstance(rules, list) or not rules:
            raise SpecError(f"stored spec: 'rules' must be a non-empty list, got {rules!r}")
        return cls([_rule_from_dict(rule, index) for index, rule in enumerate(rules)])

    @classmethod
    def from_file(cls, path: PathLike) -> LoraSpec:
        """Return the spec stored in an adapter file written by :func:`lora_jax.save_adapter`.

        Only the file's header is read.

        Raises:
          FileNotFoundError: no file at ``path``.
          CheckpointCorruptError: the file is not readable, stores no spec (it was saved from a spec with a
            predicate rule) or a damaged one (names the file).
        """
        from lora_jax._extras import require

        safetensors = require("safetensors", "io")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no adapter file there")
        try:
            with safetensors.safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
        except (safetensors.SafetensorError, OSError, ValueError) as err:
            raise CheckpointCorruptError(f"{path}: not a readable safetensors file ({err})") from None
        if SPEC_METADATA_KEY not in metadata:
            raise CheckpointCorruptError(
                f"{path} stores no spec (it was saved from a spec with a predicate rule, or not by lora_jax); "
                "pass the spec it was made with: load_adapter(path, params, spec)"
            )
        try:
            return cls.from_dict(json.loads(metadata[SPEC_METADATA_KEY]))
        except (ValueError, RecursionError, TypeError) as err:  # JSON errors, SpecError, numbers too long, nesting
            raise CheckpointCorruptError(
                f"{path}: damaged spec in the metadata ({type(err).__name__}: {err})"
            ) from None

    @classmethod
    def from_peft(
        cls, config_or_dir: Mapping[str, Any] | PathLike, names: Mapping[str, Any], params: Any = None
    ) -> LoraSpec:
        """Build the spec of a Hugging Face PEFT LoRA adapter, one rule per adapted or saved module.

        Args:
          config_or_dir: the ``adapter_config.json`` contents, or the PEFT folder holding it.
          names: the model's name table (:func:`lora_jax.models.hf_names`), which says which param path
            each PyTorch module name is.
          params: the base tree; needed for a scanned model, whose layers' modules become one rule per
            stacked kernel.

        Returns:
          The spec :func:`lora_jax.io.load_peft` reads the folder under: ``target_modules`` with ``r``,
          ``lora_alpha``, ``use_rslora``, ``lora_dropout`` and the ``rank_pattern`` / ``alpha_pattern``
          overrides as LoRA rules (``mode="dora"`` under ``use_dora``), ``modules_to_save`` as fully trainable ones.

        Raises:
          FileNotFoundError: a folder without ``adapter_config.json``.
          LoraError: a config that is not LoRA, a setting lora_jax cannot express, or a target that
            matches no module of the name table (see :mod:`lora_jax.io.peft_spec`).
        """
        from lora_jax.io.peft_spec import spec_from_peft

        return spec_from_peft(config_or_dir, names, params)


_AXES_FIELDS = ("in_axes", "out_axes", "stack_axes")
_TUPLE_FIELDS = (*_AXES_FIELDS, "slices", "adapt")
_SLICE_FIELDS = ("slices", "adapt", "slice_axis")
"""Stored only when ``slices`` is set, so a spec without them reads back in a lora_jax that predates them."""


def _rule_to_dict(rule: Rule, index: int) -> dict[str, Any]:
    """Return one rule's fields as JSON-safe data (axes as lists)."""
    if not isinstance(rule.pattern, str):
        raise SpecError(
            f"{rule.label} (rule {index}) has a predicate pattern, which cannot be stored; "
            "pass the spec when loading instead (load_adapter(path, params, spec))"
        )
    out: dict[str, Any] = {}
    for field in dataclasses.fields(Rule):
        value = getattr(rule, field.name)
        if field.name in _SLICE_FIELDS and rule.slices is None:
            continue
        out[field.name] = list(value) if field.name in _TUPLE_FIELDS and value is not None else value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# field -> (check, what it must be)
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "pattern": (lambda v: isinstance(v, str), "a regex string"),
    "mode": (lambda v: isinstance(v, str), "a string"),
    "rank": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "alpha": (_is_number, "a number"),
    "scaling": (lambda v: isinstance(v, str), "a string"),
    "init": (lambda v: isinstance(v, str), "a string"),
    "init_std": (lambda v: v is None or _is_number(v), "a number or null"),
    "dropout": (_is_number, "a number"),
    "dtype": (lambda v: isinstance(v, str), "a dtype name"),
    "in_axes": (lambda v: v is None or (isinstance(v, list) and all(type(a) is int for a in v)), "a list of integers"),
    "name": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "slices": (lambda v: v is None or (isinstance(v, list) and all(isinstance(n, str) for n in v)), "a list of names"),
    "slice_axis": (lambda v: v is None or type(v) is int, "an integer or null"),
}
_FIELD_TYPES["out_axes"] = _FIELD_TYPES["stack_axes"] = _FIELD_TYPES["in_axes"]
_FIELD_TYPES["adapt"] = _FIELD_TYPES["slices"]


def _rule_from_dict(data: Any, index: int) -> Rule:
    """Build rule ``index`` of a stored spec, naming the index and field of anything wrong."""
    if not isinstance(data, Mapping):
        raise SpecError(f"stored spec, rule {index}: expected a mapping of fields, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise SpecError(f"stored spec, rule {index}: unknown field {unknown[0]!r}; fields are {sorted(_FIELD_TYPES)}")
    if "pattern" not in data:
        raise SpecError(f"stored spec, rule {index}: no 'pattern'")
    for field, value in data.items():
        check, wanted = _FIELD_TYPES[field]
        if not check(value):
            raise SpecError(f"stored spec, rule {index}: field {field!r} must be {wanted}, got {value!r}")
    try:
        return Rule(**data)
    except (ValueError, TypeError) as err:  # Rule's own checks (SpecError is a ValueError)
        raise SpecError(f"stored spec, rule {index}: {err}") from None
