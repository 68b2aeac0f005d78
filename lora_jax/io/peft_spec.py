"""The spec of a Hugging Face PEFT LoRA adapter, read off its ``adapter_config.json`` and a model's name table.

PEFT chooses modules by their PyTorch names (``bert.encoder.layer.0.attention.self.query``):
``target_modules`` is a list of names or name suffixes, or one regex matched in full;
``exclude_modules`` takes modules back out the same way; ``modules_to_save`` trains whole modules;
``rank_pattern`` and ``alpha_pattern`` override ``r`` and ``lora_alpha`` for modules whose name ends
with one of their keys (each a regex). This module applies those rules to the modules of a name
table (:func:`lora_jax.models.hf_names`) and writes one :class:`~lora_jax.spec.Rule` per module,
its pattern the param path, so :func:`lora_jax.io.load_peft` reads the folder under it.
:meth:`lora_jax.LoraSpec.from_peft` calls it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lora_jax.errors import LoraError
from lora_jax.spec import LoraSpec, Rule, trainable
from lora_jax.typing import PathLike

CONFIG = "adapter_config.json"
# Settings whose non-empty values change what PEFT trains in ways a spec of LoRA and trainable rules cannot say.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "layers_to_transform": "layers_to_transform",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "lora_bias": "lora_bias",
}


def read_config(config_or_dir: Mapping[str, Any] | PathLike) -> tuple[dict[str, Any], str]:
    """Return the adapter config as a dict and a label for messages (the file, or ``adapter config``).

    Raises:
      FileNotFoundError: a folder without ``adapter_config.json``.
      LoraError: the file is not JSON or not an object.
    """
    if isinstance(config_or_dir, Mapping):
        return dict(config_or_dir), "adapter config"
    path = Path(config_or_dir)
    file = path / CONFIG if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (a PEFT adapter directory holds {CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraError(f"{file}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config, str(file)


def _module(name: str) -> str:
    """Return the module of a PyTorch tensor name: ``a.b.weight`` -> ``a.b``."""
    return name.rsplit(".", 1)[0] if "." in name else name


def _listed(value: str | list[str], module: str) -> bool:
    """Return whether ``module`` is chosen by a PEFT module list (name or suffix) or regex (full match)."""
    if isinstance(value, str):
        return re.fullmatch(value, module) is not None
    return module in value or any(module.endswith(f".{key}") for key in value)


def is_saved(config: Mapping[str, Any], module: str) -> bool:
    """Return whether ``module`` is (inside) one of ``modules_to_save``, as PEFT matches them."""
    return any(re.match(rf"(^|.*\.){key}($|\..*)", module) for key in config.get("modules_to_save") or ())


def is_target(config: Mapping[str, Any], module: str) -> bool:
    """Return whether PEFT puts a LoRA adapter on ``module`` (targets, less exclusions and saved modules)."""
    if config.get("exclude_modules") and _listed(config["exclude_modules"], module):
        return False
    if is_saved(config, module):
        return False
    return _listed(config.get("target_modules") or [], module)


def target_modules(adapted: Iterable[str], modules: Iterable[str]) -> list[str]:
    """Return the shortest name suffixes that choose exactly the ``adapted`` modules among ``modules`` in PEFT.

    ``attention.output.dense`` rather than ``dense`` when the MLP's ``intermediate.dense`` stays frozen.
    """
    adapted, modules = set(adapted), set(modules) | set(adapted)
    chosen = set()
    for module in adapted:
        parts = module.split(".")
        for start in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[start:])
            if all(other in adapted for other in modules if _listed([suffix], other)):
                chosen.add(suffix)
                break
    return sorted(chosen)


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """Return the value of the first ``rank_pattern`` / ``alpha_pattern`` key that ends ``module``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check(config: Mapping[str, Any], label: str) -> None:
    """Refuse a config that is not plain LoRA or has values of the wrong type."""
    if config.get("peft_type") != "LORA":
        raise LoraError(f"{label}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise LoraError(f"{label}: {what} ({key}={config[key]!r}) has no lora_jax counterpart")
    if config.get("bias", "none") != "none":
        raise LoraError(f"{label}: bias={config['bias']!r} trains biases PEFT's way; only bias='none' is read")
    targets = config.get("target_modules")
    if targets == "all-linear":
        raise LoraError(f"{label}: target_modules='all-linear' is expanded by PEFT at training; list the modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise LoraError(f"{label}: target_modules must be a list of names or a regex, got {targets!r}")
    if isinstance(config.get("r"), bool) or not isinstance(config.get("r"), int):
        raise LoraError(f"{label}: r must be an integer, got {config.get('r')!r}")
    for key in ("lora_alpha", "lora_dropout"):
        value = config.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LoraError(f"{label}: {key} must be a number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise LoraError(f"{label}: {key} must be an object, got {config[key]!r}")


def spec_from_peft(config_or_dir: Mapping[str, Any] | PathLike, names: Mapping[str, Any]) -> LoraSpec:
    """Build the spec of a PEFT LoRA adapter over the modules of a name table.

    Args:
      config_or_dir: the ``adapter_config.json`` contents, or the PEFT folder (or the file itself).
      names: unrolled param path -> (PyTorch tensor name, its layout), e.g. :func:`lora_jax.models.hf_names`.

    Returns:
      One LoRA rule per adapted module's kernel (pattern: its param path; ``in_axes`` from the layout;
      rank, alpha, scaling and dropout from the config) and one trainable rule per saved module.

    Raises:
      FileNotFoundError: a folder without ``adapter_config.json``.
      LoraError: a config that is not LoRA or uses a setting lora_jax cannot express, an adapted module
        that is part of a fused tensor or has no linear kernel, or targets that match no module.
    """
    config, label = read_config(config_or_dir)
    _check(config, label)
    modules: dict[str, list[tuple[str, Any]]] = {}
    for path, (name, layout) in names.items():
        modules.setdefault(_module(name), []).append((path, layout))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    scaling = "rslora" if config.get("use_rslora") else "standard"
    rules: list[Rule] = []
    for module, entries in modules.items():
        saved, target = is_saved(config, module), is_target(config, module)
        if not (saved or target):
            continue
        fused = [path for path, layout in entries if getattr(layout, "part", None)]
        if fused:
            raise LoraError(
                f"{label}: module {module} is a fused tensor that lora_jax splits into {', '.join(fused)}; "
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
                f"{label}: target {module} holds {', '.join(path for path, _ in entries)}, not a linear kernel; "
                "lora_jax reads PEFT LoRA on linear modules only"
            )
        path, layout = kernels[0]
        in_ndim = getattr(layout, "in_ndim", None)
        rules.append(
            Rule(
                re.escape(path),
                rank=pattern_value(rank_pattern, module, config["r"]),
                alpha=pattern_value(alpha_pattern, module, config.get("lora_alpha", 8)),
                scaling=scaling,
                dropout=float(config.get("lora_dropout") or 0.0),
                in_axes=tuple(range(in_ndim)) if in_ndim else None,
                name=module,
            )
        )
    if not any(rule.mode == "lora" for rule in rules):
        raise LoraError(
            f"{label}: target_modules {config.get('target_modules')!r} match no module of the name table "
            f"({len(modules)} modules, e.g. {next(iter(modules), 'none')}); was it made for another model?"
        )
    return LoraSpec(rules)
