"""LoRA specs for registered models, with the axes of their DenseGeneral kernels filled in.

``lora_spec(model, "qv", rank=8)`` adapts the query and value projections of
every layer. Attention kernels are ``[D, heads, Dh]`` (query/key/value) and
``[heads, Dh, D]`` (out); scanned layouts add a leading layer axis. The names,
paths and input axes come from the family's registry entry (:attr:`Architecture.linears`),
so callers give none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn

from lora_jax.errors import SpecError
from lora_jax.models.bundled import ARCHITECTURES
from lora_jax.models.registry import Architecture, Linear, Registry
from lora_jax.paths import STACKED, UNROLLED_PATTERN
from lora_jax.spec import LoraSpec, Rule, trainable

PRESETS = {"qv": ("q", "v"), "qk": ("q", "k"), "qkv": ("q", "k", "v"), "qkvo": ("q", "k", "v", "o")}
METHODS = ("lora", "full", "bitfit", "head")
"""Fine-tuning methods of :func:`method_spec`."""


def head_pattern(head: str) -> str:
    """Return the pattern of every leaf under a task head's top-level key ``head``."""
    return rf"{head}/.*"


HEAD_PATTERN = head_pattern("classifier")
"""The BERT classifier's head (``classifier/kernel``, ``classifier/bias``)."""


def target_names(
    model_type: str | Architecture, targets: str | Iterable[str], registry: Registry = ARCHITECTURES
) -> tuple[str, ...]:
    """Expand ``"qv"``, ``"qkvo"``, ``"all-linear"`` or explicit names (``["q", "v", "up"]``).

    Raises:
      SpecError: an unknown preset or name, with the family's names.
    """
    arch = registry.by_type(model_type) if isinstance(model_type, str) else model_type
    known = [linear.name for linear in arch.linears if linear.flag is None]
    if isinstance(targets, str):
        if targets == "all-linear":
            return tuple(known)
        if targets in known:  # a single name: "q"
            return (targets,)
        if targets not in PRESETS:
            raise SpecError(f"unknown targets {targets!r}; use one of {[*PRESETS, 'all-linear']} or names {known}")
        return PRESETS[targets]
    names = tuple(targets)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SpecError(f"unknown targets {unknown or names}; names for {arch.model_type}: {known}")
    return names


def is_scanned(model_or_config: Any, scan_layers: bool | None = None) -> bool:
    """Return the layer layout: ``scan_layers`` if given, else the module's own, else unrolled (a config)."""
    if scan_layers is not None:
        return bool(scan_layers)
    return bool(model_or_config.scan_layers) if isinstance(model_or_config, nn.Module) else False


def kernel_pattern(arch: Architecture, linear: Linear, scan: bool) -> str:
    """Return the pattern of ``linear``'s kernel in every block, with any prefix, in the scanned or unrolled layout."""
    layer = STACKED if scan else UNROLLED_PATTERN
    return rf"(?:.*/)?{arch.stack}/{layer}/{linear.path}/kernel"


def lora_spec(
    model_or_config: Any,
    targets: str | Iterable[str] = "qv",
    rank: int = 8,
    alpha: float = 8.0,
    scan_layers: bool | None = None,
    head: bool = False,
    registry: Registry = ARCHITECTURES,
    **rule_kwargs: Any,
) -> LoraSpec:
    """Build a :class:`lora_jax.LoraSpec` for a registered module or config (BERT, GPT-2, Llama, ...).

    Args:
      model_or_config: a module (its ``scan_layers`` picks the layout) or a config.
      targets: ``"qv"``, ``"qk"``, ``"qkv"``, ``"qkvo"``, ``"all-linear"``
        (attention and MLP kernels of every layer), or names from
        ``q k v o`` plus the MLP's (``intermediate output`` for BERT,
        ``fc proj`` for GPT-2, ``gate up down`` for Llama). On a model whose config fuses
        q, k and v into one kernel (GPT-2's ``fused_qkv``), the named ones are adapted as its
        slices (``Rule.slices``): ``"qv"`` gives q and v each their own rank-``rank`` adapter and
        leaves the k slice exactly as it is, as separate q and v adapters would.
      rank, alpha: as :class:`lora_jax.Rule`.
      scan_layers: the layout; defaults to the module's, else unrolled.
      head: also make the task head fully trainable
        (``lora_jax.trainable(HEAD_PATTERN)`` for BERT); needs a family with a head.
      registry: the families; the model's own gives the names.
      **rule_kwargs: more :class:`lora_jax.Rule` fields (``scaling``, ``dropout``, ``dtype``, ...).

    Patterns accept any prefix, so the same spec fits ``BertModel`` params and
    the ``bert/...`` tree of ``BertForSequenceClassification``.

    Raises:
      ConfigError: no registered family builds the module or uses the config.
      SpecError: unknown targets, or ``head=True`` for a family without a task head.
    """
    arch = registry.of(model_or_config)
    scan = is_scanned(model_or_config, scan_layers)
    offset = 1 if scan else 0
    present = arch.linears_for(getattr(model_or_config, "config", model_or_config))
    fused = {part: linear for linear in present for part in linear.slices}
    chosen: dict[str, tuple[str, ...]] = {}  # linear name -> the names it adapts (its slices' when fused)
    for name in target_names(arch, targets):
        linear = fused.get(name) or arch.linear(name)
        chosen[linear.name] = (*chosen.get(linear.name, ()), name)
    rules = []
    for name, parts in chosen.items():
        linear = arch.linear(name)
        sliced = {}
        if linear.slices:  # one kernel holds several maps: adapt the named ones, leave the rest exactly as they are
            sliced = {"slices": linear.slices, "adapt": parts, "slice_axis": offset + linear.in_axes}
        rules.append(
            Rule(
                kernel_pattern(arch, linear, scan),
                rank=rank,
                alpha=alpha,
                in_axes=tuple(range(offset, offset + linear.in_axes)),
                stack_axes=(0,) if scan else None,
                name=linear.path.replace("/", "."),
                **sliced,
                **rule_kwargs,
            )
        )
    if head:
        if arch.head is None:
            raise SpecError(f"head=True needs a classification model with a task head; {arch.model_type} has none")
        rules.append(trainable(head_pattern(arch.head), name=arch.head))
    return LoraSpec(rules)


def method_spec(
    model_or_config: Any,
    method: str = "lora",
    targets: str | Iterable[str] = "qv",
    rank: int = 8,
    alpha: float = 8.0,
    registry: Registry = ARCHITECTURES,
) -> LoraSpec:
    """Build the spec of a fine-tuning method for a model with a task head; the head always trains.

    Args:
      model_or_config: a registered module or config whose family has a task head (BERT's classifier).
      method: ``"lora"`` (:func:`lora_spec` on ``targets`` with ``head=True``), ``"full"`` (every leaf
        trainable), ``"bitfit"`` (the biases and the head) or ``"head"`` (the head alone).
      targets, rank, alpha: the LoRA rules (``"lora"`` only).
      registry: the families.

    Raises:
      SpecError: an unknown method or targets, or a family without a task head.
    """
    if method == "lora":
        return lora_spec(model_or_config, targets, rank=rank, alpha=alpha, head=True, registry=registry)
    if method == "full":
        return LoraSpec([trainable(".*", name="everything")])
    arch = registry.of(model_or_config)
    if arch.head is None:
        raise SpecError(f"method {method!r} trains a task head; {arch.model_type} has none")
    head = trainable(head_pattern(arch.head), name=arch.head)
    if method == "bitfit":
        return LoraSpec([head, trainable(r".*/bias", name="biases")])
    if method == "head":
        return LoraSpec([head])
    raise SpecError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
