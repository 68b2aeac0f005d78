"""Hugging Face PEFT folders: adapters to and from ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT stores, per adapted module ``M``, ``base_model.model.M.lora_A.weight [r, in]``
and ``base_model.model.M.lora_B.weight [out, r]`` (PyTorch's ``[out, in]``
convention), and fully trainable modules (``modules_to_save``) as their
weights under the same prefix. Here ``A [*stack, *in, r]`` and
``B [*stack, r, *out]`` are flattened in the kernel's own axis order, so a
DenseGeneral ``[D, H, Dh]`` query matches PEFT's ``[H*Dh, D]`` Linear, and a
stacked (``nn.scan``) kernel becomes one module per layer.

Which checkpoint name goes with which param path is the model's business: a
:data:`NameTable` maps each param path (in the unrolled ``layer_{i}`` layout)
to its PyTorch tensor name and an :class:`HfName` layout;
:func:`lora_jax.models.hf_names` gives the table for the bundled models. Both
files are written through :func:`lora_jax.io.atomic.write_atomic`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from lora_jax._extras import require
from lora_jax.adapters import A_KEY, B_KEY, check_fits
from lora_jax.errors import AdapterMismatchError, LoraError
from lora_jax.io.atomic import refuse_existing, write_atomic, write_text
from lora_jax.io.peft_spec import target_modules
from lora_jax.paths import PathTuple, nested_set, path_str, unroll_path
from lora_jax.plan import Target, plan
from lora_jax.spec import LoraSpec
from lora_jax.typing import PathLike, PyTree

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class HfName(Protocol):
    """Where a param lives in the PyTorch model: a tensor name and how the layouts relate."""

    transpose: bool  # PyTorch stores ``[out, in]``

    def checkpoint_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        """Return the shape the checkpoint tensor has for a param of shape ``target``."""
        ...


# path of a leaf in the unrolled layout -> (PyTorch tensor name, its layout)
NameTable = Mapping[str, tuple[str, HfName]]


def _unrolled(path: PathTuple, layer: int | None) -> str:
    """Return the unrolled path of one layer of a stacked leaf: ``.../layers/...`` -> ``.../layer_{i}/...``."""
    return path_str(unroll_path(path, layer))


def _layers(target: Target) -> list[int | None]:
    """Return the layer indices of a stacked target (one leading layer axis), or ``[None]`` for an unstacked one."""
    layout = target.layout
    stack = layout.stack if layout is not None else ()
    if len(stack) > 1 or (stack and stack != (0,)):
        raise LoraError(f"{target.name}: PEFT export handles one leading layer axis, not stack axes {stack}")
    return list(range(target.shape[0])) if stack else [None]


def _lookup(names: NameTable, path: PathTuple, layer: int | None) -> tuple[str, HfName]:
    """Return the PyTorch name and layout of one layer of ``path``; refuse a part of a fused tensor."""
    key = _unrolled(path, layer)
    if key not in names:
        raise LoraError(f"no PyTorch name for {key}; the name table covers {len(names)} params")
    name, layout = names[key]
    if getattr(layout, "part", None):
        raise LoraError(f"{key} is part of the fused tensor {name}; PEFT adapts whole modules")
    return name, layout


def _to_kernel_order(x: np.ndarray, axes: tuple[int, ...], lead: int) -> np.ndarray:
    """Permute the group of axes after ``lead`` leading axes from rule order to kernel order."""
    order = np.argsort(axes)
    return np.transpose(x, [*range(lead), *(lead + int(i) for i in order), *range(lead + len(axes), x.ndim)])


def _from_kernel_order(x: np.ndarray, axes: tuple[int, ...], lead: int) -> np.ndarray:
    """Permute the group of axes after ``lead`` leading axes from kernel order to rule order."""
    order = np.argsort(np.argsort(axes))
    return np.transpose(x, [*range(lead), *(lead + int(i) for i in order), *range(lead + len(axes), x.ndim)])


def _pattern_values(targets: list[Target], names: NameTable) -> dict[str, Any]:
    """Return the config's ``r``, ``lora_alpha``, scaling, dropout and per-module rank and alpha overrides."""
    rules = [t.rule for t in targets if t.layout is not None]
    if not rules:
        raise LoraError("the spec adapts no kernel; PEFT needs at least one LoRA module")
    if len({r.scaling for r in rules}) > 1:
        raise LoraError("PEFT takes one scaling for all modules; the spec mixes standard and rsLoRA")
    first = rules[0]
    rank_pattern, alpha_pattern = {}, {}
    for t in targets:
        if t.layout is None:
            continue
        for layer in _layers(t):
            module = _lookup(names, t.path, layer)[0].removesuffix(".weight")
            if t.rule.rank != first.rank:
                rank_pattern[module] = t.rule.rank
            if t.rule.alpha != first.alpha:
                alpha_pattern[module] = t.rule.alpha
    return {
        "r": first.rank,
        "lora_alpha": first.alpha,
        "use_rslora": first.scaling == "rslora",
        "lora_dropout": first.dropout,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def to_peft(params: PyTree, lora: PyTree, spec: LoraSpec, names: NameTable) -> tuple[dict[str, np.ndarray], dict]:
    """Return the PEFT tensors and the ``adapter_config.json`` contents for an adapter tree.

    Args:
      params: the base tree ``lora`` was made for.
      lora: the adapter tree (``A [*stack, *in, r]``, ``B [*stack, r, *out]`` and fully trainable leaves).
      spec: the spec ``lora`` was made with; one scaling for all rules.
      names: the model's name table (:func:`lora_jax.models.hf_names`).

    Returns:
      ``(tensors, config)``: float32 ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]`` and
      ``modules_to_save`` weights by PEFT name, and the config as a dict.

    Raises:
      AdapterMismatchError: ``lora`` does not fit ``params`` and ``spec``.
      LoraError: a path the name table lacks, part of a fused tensor, more than one stack axis, no adapted
        kernel, or mixed scalings.
    """
    targets = list(plan(params, spec))
    leaves = check_fits(tuple(targets), lora)
    tensors: dict[str, np.ndarray] = {}
    lora_modules, saved_modules = set(), set()
    for t in targets:
        for layer in _layers(t):
            name, layout = _lookup(names, t.path, layer)
            module = name.removesuffix(".weight").removesuffix(".bias")
            if t.layout is None:
                value = np.asarray(jnp.asarray(leaves[t.path], jnp.float32))
                value = value if layer is None else value[layer]
                flat = layout.checkpoint_shape(value.shape)
                value = value.reshape(flat[::-1] if layout.transpose else flat)
                tensors[PREFIX + name] = np.ascontiguousarray(value.T if layout.transpose else value)
                saved_modules.add(module.split(".")[-1])
                continue
            a = np.asarray(jnp.asarray(leaves[(*t.path, A_KEY)], jnp.float32))
            b = np.asarray(jnp.asarray(leaves[(*t.path, B_KEY)], jnp.float32))
            if layer is not None:
                a, b = a[layer], b[layer]
            a = _to_kernel_order(a, t.layout.inputs, 0).reshape(t.layout.in_size, -1)
            b = _to_kernel_order(b, t.layout.outputs, 1).reshape(-1, t.layout.out_size)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
            lora_modules.add(module)
    config = {
        "peft_type": "LORA",
        **_pattern_values(targets, names),
        # the shortest name suffixes that pick these modules and no others
        "target_modules": target_modules(lora_modules, (name.rsplit(".", 1)[0] for name, _ in names.values())),
        "modules_to_save": sorted(saved_modules) or None,
        "bias": "none",
        "fan_in_fan_out": any(not names[k][1].transpose for k in names if k.endswith("/kernel")),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return tensors, config


def save_peft(
    directory: PathLike,
    params: PyTree,
    lora: PyTree,
    spec: LoraSpec,
    names: NameTable,
    *,
    overwrite: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory``.

    Args:
      directory: the folder to write; created if missing.
      params: the base tree ``lora`` was made for.
      lora: the adapter tree.
      spec: the spec ``lora`` was made with.
      names: the model's name table (:func:`lora_jax.models.hf_names`).
      overwrite: replace existing files.
      base_model_name_or_path: recorded in the config for PEFT to find the base model.

    Returns:
      ``directory`` as a ``Path``.

    Raises:
      FileExistsError: either file is there and ``overwrite`` is False.
      AdapterMismatchError, LoraError: as :func:`to_peft`.
    """
    directory = Path(directory)
    refuse_existing([directory / WEIGHTS, directory / CONFIG], overwrite)
    tensors, config = to_peft(params, lora, spec, names)
    config["base_model_name_or_path"] = base_model_name_or_path
    save_file = require("safetensors.numpy", "io").save_file
    write_atomic(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp), overwrite=True)
    write_text(directory / CONFIG, json.dumps(config, indent=2), overwrite=True)
    return directory


def load_peft(directory: PathLike, params: PyTree, spec: LoraSpec, names: NameTable) -> dict:
    """Read a PEFT LoRA adapter folder into an adapter tree for ``params`` and ``spec``.

    Args:
      directory: the folder holding ``adapter_model.safetensors`` and ``adapter_config.json``.
      params: the base tree.
      spec: the spec to read the adapter under; its ranks and scales must be the file's.
      names: the model's name table (:func:`lora_jax.models.hf_names`).

    Returns:
      The adapter tree, ``A`` and ``B`` in each rule's dtype, fully trainable leaves in the base's.

    Raises:
      FileNotFoundError: either file is missing.
      LoraError: the config is not a LoRA adapter; a path the name table lacks.
      AdapterMismatchError: a rank or scale differs, or a tensor is missing or left over (names the module).
    """
    directory = Path(directory)
    for file in (WEIGHTS, CONFIG):
        if not (directory / file).is_file():
            raise FileNotFoundError(
                f"{directory / file}: missing (a PEFT adapter directory holds {WEIGHTS} and {CONFIG})"
            )
    config = json.loads((directory / CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise LoraError(f"{directory / CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
    tensors = require("safetensors.numpy", "io").load_file(str(directory / WEIGHTS))
    tensors = {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in tensors.items()
    }
    lora: dict = {}
    used = set()
    for t in plan(params, spec):
        layers = _layers(t)
        if t.layout is None:
            parts = []
            for layer in layers:
                name, layout = _lookup(names, t.path, layer)
                key = PREFIX + name
                if key not in tensors:
                    raise AdapterMismatchError(f"{directory / WEIGHTS} has no {key} for trainable {t.name}")
                value = tensors[key].T if layout.transpose else tensors[key]
                parts.append(value.reshape(t.shape[1:] if layer is not None else t.shape))
                used.add(key)
            nested_set(lora, t.path, jnp.asarray(np.stack(parts) if layers != [None] else parts[0], t.dtype))
            continue
        a_parts, b_parts = [], []
        for layer in layers:
            module = _lookup(names, t.path, layer)[0].removesuffix(".weight")
            rank = config.get("rank_pattern", {}).get(module, config["r"])
            alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            if rank != t.rule.rank or not math.isclose(scale, t.rule.scale):
                raise AdapterMismatchError(
                    f"{module}: the PEFT file has r={rank}, scale {scale:g}; {t.rule.label} has r={t.rule.rank}, "
                    f"scale {t.rule.scale:g} ({t.name})"
                )
            key_a, key_b = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
            if key_a not in tensors or key_b not in tensors:
                raise AdapterMismatchError(f"{directory / WEIGHTS} has no LoRA pair for {module} ({t.name})")
            used.update((key_a, key_b))
            layout = t.layout
            a = tensors[key_a].T.reshape(*(t.shape[i] for i in sorted(layout.inputs)), rank)
            b = tensors[key_b].T.reshape(rank, *(t.shape[i] for i in sorted(layout.outputs)))
            a_parts.append(_from_kernel_order(a, layout.inputs, 0))
            b_parts.append(_from_kernel_order(b, layout.outputs, 1))
        stack = (lambda xs: np.stack(xs)) if layers != [None] else (lambda xs: xs[0])
        nested_set(lora, (*t.path, A_KEY), jnp.asarray(stack(a_parts), t.rule.dtype))
        nested_set(lora, (*t.path, B_KEY), jnp.asarray(stack(b_parts), t.rule.dtype))
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterMismatchError(f"{directory / WEIGHTS} holds {extra[0]}, which the spec does not cover")
    check_fits(plan(params, spec), lora)
    return lora
