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

from lora_jax.errors import LoraError
from lora_jax.io.peft import CONFIG
from lora_jax.io.peft_config import PeftConfig, parse_config, read_config
from lora_jax.spec import LoraSpec, Rule, trainable
from lora_jax.typing import PathLike


def peft_config(config_or_dir: Mapping[str, Any] | PathLike) -> PeftConfig:
    """Return the checked config of a PEFT adapter: its ``adapter_config.json`` contents, file or folder."""
    if isinstance(config_or_dir, Mapping):
        return parse_config(dict(config_or_dir), "adapter config")
    path = Path(config_or_dir)
    file = path / CONFIG if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (a PEFT adapter folder holds {CONFIG})")
    return read_config(file)


def spec_from_peft(config_or_dir: Mapping[str, Any] | PathLike, names: Mapping[str, Any]) -> LoraSpec:
    """Build the spec of a PEFT LoRA adapter over the modules of a name table.

    Args:
      config_or_dir: the ``adapter_config.json`` contents, or the PEFT folder (or the file itself).
      names: unrolled param path -> (PyTorch tensor name, its layout), e.g. :func:`lora_jax.models.hf_names`.

    Returns:
      One LoRA rule per adapted module's kernel (pattern: its param path; ``in_axes`` from the layout;
      rank, alpha, scaling and dropout per module as PEFT computes them; ``mode="dora"`` under ``use_dora``)
      and one trainable rule per saved module.

    Raises:
      CheckpointCorruptError, AdapterMismatchError: as :func:`lora_jax.io.peft_config.read_config`, and
        targets that select no module of the name table (as PEFT refuses them).
      LoraError: an adapted module that is part of a fused tensor or has no linear kernel.
    """
    config = peft_config(config_or_dir)
    modules: dict[str, list[tuple[str, Any]]] = {}
    for path, (name, layout) in names.items():
        modules.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append((path, layout))
    config.check_targets(modules)
    rules: list[Rule] = []
    for module, entries in modules.items():
        saved, adapted = config.saves(module), config.adapts(module)
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
        rules.append(
            Rule(
                re.escape(path),
                mode="dora" if config.dora else "lora",
                rank=config.rank_of(module)[0],
                alpha=config.alpha_of(module)[0],
                scaling="rslora" if config.rslora else "standard",
                dropout=config.dropout,
                in_axes=tuple(range(in_ndim)) if in_ndim else None,
                name=module,
            )
        )
    return LoraSpec(rules)
