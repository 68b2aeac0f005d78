"""LoRA specs for the bundled models, with the axes of their DenseGeneral kernels filled in.

``lora_spec(model, "qv", rank=8)`` adapts the query and value projections of
every layer. Attention kernels are ``[D, heads, Dh]`` (query/key/value) and
``[heads, Dh, D]`` (out); scanned layouts add a leading layer axis. The rules
here carry those axes, so callers give none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn

from lora_jax.models.config import BertConfig, GPT2Config, LlamaConfig
from lora_jax.paths import STACKED, UNROLLED_PATTERN
from lora_jax.spec import LoraSpec, Rule, trainable

# Short name -> (path inside a layer, number of leading input axes of the unrolled kernel).
ATTENTION = {
    "q": ("attention/query", 1),
    "k": ("attention/key", 1),
    "v": ("attention/value", 1),
    "o": ("attention/out", 2),
}
MLP = {
    "bert": {"intermediate": ("mlp/intermediate", 1), "output": ("mlp/output", 1)},
    "gpt2": {"fc": ("mlp/fc", 1), "proj": ("mlp/proj", 1)},
    "llama": {"gate": ("mlp/gate", 1), "up": ("mlp/up", 1), "down": ("mlp/down", 1)},
}
STACK = {"bert": "encoder", "gpt2": "decoder", "llama": "decoder"}
PRESETS = {"qv": ("q", "v"), "qk": ("q", "k"), "qkv": ("q", "k", "v"), "qkvo": ("q", "k", "v", "o")}
HEAD_PATTERN = r"classifier/.*"


def _config(model_or_config: Any) -> tuple[Any, bool | None]:
    if isinstance(model_or_config, nn.Module):
        return model_or_config.config, bool(getattr(model_or_config, "scan_layers", False))
    return model_or_config, None


def target_names(model_type: str, targets: str | Iterable[str]) -> tuple[str, ...]:
    """Expand ``"qv"``, ``"qkvo"``, ``"all-linear"`` or explicit names (``["q", "v", "up"]``)."""
    known = {**ATTENTION, **MLP[model_type]}
    if isinstance(targets, str):
        if targets == "all-linear":
            return tuple(known)
        if targets in known:  # a single name: "q"
            return (targets,)
        if targets not in PRESETS:
            raise ValueError(
                f"unknown targets {targets!r}; use one of {[*PRESETS, 'all-linear']} or names {list(known)}"
            )
        return PRESETS[targets]
    names = tuple(targets)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown targets {unknown or names}; names for {model_type}: {list(known)}")
    return names


def lora_spec(
    model_or_config: Any,
    targets: str | Iterable[str] = "qv",
    rank: int = 8,
    alpha: float = 8.0,
    scan_layers: bool | None = None,
    head: bool = False,
    **rule_kwargs: Any,
) -> LoraSpec:
    """A :class:`lora_jax.LoraSpec` for a BERT, GPT-2 or Llama module or config.

    Args:
      model_or_config: a module (its ``scan_layers`` picks the layout) or a config.
      targets: ``"qv"``, ``"qk"``, ``"qkv"``, ``"qkvo"``, ``"all-linear"``
        (attention and MLP kernels of every layer), or names from
        ``q k v o`` plus the MLP's (``intermediate output`` for BERT,
        ``fc proj`` for GPT-2, ``gate up down`` for Llama).
      rank, alpha: as :class:`lora_jax.Rule`.
      scan_layers: the layout; defaults to the module's, else unrolled.
      head: also make the classifier fully trainable
        (``lora_jax.trainable(HEAD_PATTERN)``); needs a classification model.
      **rule_kwargs: more :class:`lora_jax.Rule` fields (``scaling``, ``dropout``, ``dtype``, ...).

    Patterns accept any prefix, so the same spec fits ``BertModel`` params and
    the ``bert/...`` tree of ``BertForSequenceClassification``.
    """
    config, model_scan = _config(model_or_config)
    if not isinstance(config, BertConfig | GPT2Config | LlamaConfig):
        raise TypeError(f"lora_spec needs a BERT, GPT-2 or Llama module or config, got {type(config).__name__}")
    scan = model_scan if scan_layers is None else scan_layers
    scan = bool(scan)
    model_type = config.model_type
    table = {**ATTENTION, **MLP[model_type]}
    layer = STACKED if scan else UNROLLED_PATTERN
    rules = []
    for name in target_names(model_type, targets):
        path, inputs = table[name]
        offset = 1 if scan else 0
        rules.append(
            Rule(
                rf"(?:.*/)?{STACK[model_type]}/{layer}/{path}/kernel",
                rank=rank,
                alpha=alpha,
                in_axes=tuple(range(offset, offset + inputs)),
                stack_axes=(0,) if scan else None,
                name=path.replace("/", "."),
                **rule_kwargs,
            )
        )
    if head:
        if model_type != "bert":
            raise ValueError("head=True needs a classification model (BertForSequenceClassification)")
        rules.append(trainable(HEAD_PATTERN, name="classifier"))
    return LoraSpec(rules)
