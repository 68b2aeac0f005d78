"""The spec of a Hugging Face PEFT LoRA or DoRA adapter, read off its ``adapter_config.json`` and a model's name table.

PEFT's own semantics (which modules ``target_modules``, ``exclude_modules``, ``modules_to_save`` and
``layers_to_transform`` select; per-module rank and alpha from ``rank_pattern`` / ``alpha_pattern``)
live in :mod:`lora_jax.io.peft_config`; this module turns them into one :class:`~lora_jax.spec.Rule`
per module of a name table (:func:`lora_jax.models.hf_names`), its pattern the param path, so
:func:`lora_jax.io.load_peft` reads the folder under it. :meth:`lora_jax.LoraSpec.from_peft` calls it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.errors import LoraError
from lora_jax.io.peft import CONFIG
from lora_jax.io.peft_config import PeftConfig, parse_config, read_config
from lora_jax.paths import flatten, path_str, stack_path
from lora_jax.spec import LoraSpec, Rule, trainable
from lora_jax.typing import PathLike, PyTree


def peft_config(config_or_dir: Mapping[str, Any] | PathLike) -> PeftConfig:
    """Return the checked config of a PEFT adapter: its ``adapter_config.json`` contents, file or folder."""
    if isinstance(config_or_dir, Mapping):
        return parse_config(dict(config_or_dir), "adapter config")
    path = Path(config_or_dir)
    file = path / CONFIG if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (a PEFT adapter folder holds {CONFIG})")
    return read_config(file)


def spec_from_peft(
    config_or_dir: Mapping[str, Any] | PathLike, names: Mapping[str, Any], params: PyTree | None = None
) -> LoraSpec:
    """Build the spec of a PEFT LoRA adapter over the modules of a name table.

    Args:
      config_or_dir: the ``adapter_config.json`` contents, or the PEFT folder (or the file itself).
      names: unrolled param path -> (PyTorch tensor name, its layout), e.g. :func:`lora_jax.models.hf_names`.
      params: the base tree, needed for a scanned model (``scan_layers=True``): the modules of every layer of a
        stacked kernel ``[L, ...]`` become one rule on it (``stack_axes=0``).

    Returns:
      One LoRA rule per adapted module's kernel (pattern: its param path; ``in_axes`` from the layout;
      rank, alpha, scaling and dropout per module as PEFT computes them; ``mode="dora"`` under ``use_dora``),
      or per stacked kernel, one trainable rule per saved module, and one per bias PEFT trains (``bias="all"`` or
      ``"lora_only"``).

    Raises:
      CheckpointCorruptError, AdapterMismatchError: as :func:`lora_jax.io.peft_config.read_config`, and
        targets that select no module of the name table (as PEFT refuses them).
      LoraError: an adapted module that is part of a fused tensor or has no linear kernel; in a scanned model,
        a stacked kernel whose layers PEFT adapts only in part, or with different ranks, alphas or modes.
    """
    config = peft_config(config_or_dir)
    modules: dict[str, list[tuple[str, Any]]] = {}
    for path, (name, layout) in names.items():
        modules.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append((path, layout))
    config.check_targets(modules)
    rules: list[Rule | tuple[str, dict[str, Any], str]] = []
    for module, entries in modules.items():
        saved, adapted = config.saves(module), config.adapts(module)
        if config.trains_bias(module):  # bias="all" or "lora_only": the bias trains beside LoRA
            biases = [(path, layout) for path, layout in entries if path.endswith("/bias")]
            parts = [path for path, layout in biases if getattr(layout, "part", None)]
            if parts:
                raise LoraError(
                    f"{config.file}: bias={config.bias!r} trains the bias of {module} whole, a fused tensor that this "
                    f"layout splits into {', '.join(parts)}; load the model in its fused layout (fused_qkv=True), "
                    "where it is one leaf"
                )
            rules.extend((path, {"mode": "train"}, module) for path, _ in biases)
        if not (saved or adapted):
            continue
        fused = [path for path, layout in entries if getattr(layout, "part", None)]
        if fused:
            raise LoraError(
                f"{config.file}: module {module} is a fused tensor that lora_jax splits into {', '.join(fused)}; "
                "PEFT adapts it as one matrix, which separate adapters cannot reproduce"
            )
        if saved:
            paths = sorted(path for path, _ in entries)
            if params is not None and all(_stacked_in(path, params) for path in paths):
                rules.extend((path, {"mode": "train"}, module) for path in paths)  # one rule per stacked leaf
                continue
            parent = paths[0].rsplit("/", 1)[0]
            leaves = "|".join(re.escape(path.rsplit("/", 1)[1]) for path in paths)
            rules.append(trainable(rf"{re.escape(parent)}/(?:{leaves})", name=module))
            continue
        kernels = [(path, layout) for path, layout in entries if path.endswith("/kernel")]
        if not kernels:
            raise LoraError(
                f"{config.file}: target {module} holds {', '.join(path for path, _ in entries)}, not a linear "
                "kernel; lora_jax reads PEFT LoRA on linear modules only"
            )
        path, layout = kernels[0]
        in_ndim = getattr(layout, "in_ndim", None)
        fields = {
            "mode": "dora" if config.dora else "lora",
            "rank": config.rank_of(module)[0],
            "alpha": config.alpha_of(module)[0],
            "scaling": "rslora" if config.rslora else "standard",
            "dropout": config.dropout,
            "in_axes": tuple(range(in_ndim)) if in_ndim else None,
        }
        rules.append((path, fields, module))
    return LoraSpec(_kernel_rules(rules, params, config.file))


def _stacked_in(path: str, params: PyTree) -> bool:
    """Return whether the unrolled ``path`` is one layer of a stacked leaf of ``params`` (a scanned model)."""
    stacked, layer = stack_path(tuple(path.split("/")))
    shapes = {path_str(p) for p, _ in flatten(params)[0]}
    return layer is not None and path not in shapes and path_str(stacked) in shapes


def _kernel_rules(
    entries: list[Rule | tuple[str, dict[str, Any], str]], params: PyTree | None, file: Any
) -> list[Rule]:
    """Return ``entries`` with each ``(path, rule fields, module)`` made a rule, in order: one per kernel (or saved
    leaf), or, for the layers of a scanned model, one per stacked leaf of ``params`` (where its first layer was).
    """
    shapes = {} if params is None else {path_str(p): np.shape(leaf) for p, leaf in flatten(params)[0]}
    rules: list[Any] = []
    stacks: dict[str, list[tuple[int, dict[str, Any], str]]] = {}
    for entry in entries:
        if isinstance(entry, Rule):
            rules.append(entry)
            continue
        path, fields, module = entry
        stacked, layer = stack_path(tuple(path.split("/")))
        if path in shapes or layer is None or path_str(stacked) not in shapes:
            rules.append(Rule(re.escape(path), name=module, **fields))
            continue
        if path_str(stacked) not in stacks:
            rules.append(path_str(stacked))  # its place; the rule follows once every layer is seen
        stacks.setdefault(path_str(stacked), []).append((layer, fields, module))
    placed = {}
    for stacked, layers in stacks.items():
        layers.sort(key=lambda entry: entry[0])
        count = shapes[stacked][0]
        if [layer for layer, _, _ in layers] != list(range(count)):
            raise LoraError(
                f"{file}: PEFT {'trains' if layers[0][1]['mode'] == 'train' else 'adapts'} layers "
                f"{[layer for layer, _, _ in layers]} of {stacked}, a scanned stack of {count}; one rule on a stacked "
                "leaf covers every layer: load the adapter on the unrolled model (scan_layers=False)"
            )
        _, first, first_module = layers[0]
        for _, fields, module in layers[1:]:
            differ = sorted(key for key in {*fields, *first} if fields.get(key) != first.get(key))
            if differ:
                key = "mode" if "mode" in differ else differ[0]
                theirs, mine = first.get(key), fields.get(key)
                raise LoraError(
                    f"{file}: {first_module} has {key}={theirs!r} and {module} {key}={mine!r}; one rule "
                    f"on the stacked kernel {stacked} takes one value: load the adapter on the unrolled model "
                    "(scan_layers=False)"
                )
        if first["mode"] == "train":  # a saved module's leaf, every layer of it
            placed[stacked] = trainable(re.escape(stacked), name=stacked)
            continue
        in_axes = first["in_axes"] or (0,)  # of one layer's kernel; the stack's layer axis comes first
        stacked_fields = {**first, "in_axes": tuple(axis + 1 for axis in in_axes)}
        placed[stacked] = Rule(re.escape(stacked), stack_axes=(0,), name=stacked, **stacked_fields)
    return [placed[rule] if isinstance(rule, str) else rule for rule in rules]
