"""``save_pretrained``: (module, params) -> a Hugging Face model directory, the inverse of ``from_pretrained``.

Each checkpoint name of the family's key map (:mod:`lora_jax.models.registry`) is written from the
params its :class:`~lora_jax.models.common.convert.Tensor` entries fill, in the checkpoint's own
layout (:meth:`Tensor.to_checkpoint`): PyTorch ``Linear`` weights ``[out, in]``, GPT-2's ``Conv1D``
weights ``[in, out]`` with query, key and value joined into its fused ``c_attn``. Names are spelled as
the module's PyTorch class saves them, so ``transformers`` loads the directory; tied weights (GPT-2's
``lm_head``, a tied Llama head) are left for it to tie. Both layer layouts export alike.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np
from safetensors.numpy import save_file

from lora_jax.finite import check_finite
from lora_jax.io.atomic import refuse_existing, write_bytes, write_directory_atomic
from lora_jax.models.bundled import ARCHITECTURES
from lora_jax.models.common.config import to_hf
from lora_jax.models.common.convert import CheckpointError, join_parts
from lora_jax.models.common.loading import SINGLE_FILE, read_config
from lora_jax.models.registry import Registry
from lora_jax.paths import PathTuple, flatten, nested_get, path_str, stack_path
from lora_jax.typing import PathLike, PyTree

CONFIG_FILE = "config.json"
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "1_Pooling/config.json",  # sentence-transformers' pooling, which lora_jax.models.sentence_pooling reads
)
"""Files of a source directory copied beside the weights: the tokenizer, generation defaults, pooling."""


def _param(params: PyTree, path: PathTuple, scan: bool) -> np.ndarray:
    """Return the param at unrolled ``path`` (one layer of a stacked leaf in the scanned layout)."""
    dest, layer = stack_path(path) if scan else (path, None)
    try:
        value = np.asarray(nested_get(params, dest))
    except KeyError:
        raise CheckpointError(f"params have no {path_str(dest)}, which the checkpoint needs") from None
    return value if layer is None else value[layer]


def checkpoint_tensors(
    model: nn.Module, params: PyTree, *, registry: Registry = ARCHITECTURES
) -> dict[str, np.ndarray]:
    """Return ``model``'s params as checkpoint tensors by name, in the checkpoint's layouts and the params' dtypes.

    Args:
      model: a registered module (either layer layout).
      params: its param tree (e.g. ``lora_jax.merge(...)`` of it).
      registry: the families; ``model``'s own gives the key map.

    Raises:
      CheckpointError: a param the key map needs is missing, or a param has no checkpoint name.
    """
    mapping = registry.of(model).key_map(model)
    scan = bool(getattr(model, "scan_layers", False))
    tensors, used = {}, set()
    for name, entries in mapping.items():
        if not entries:  # known and unused: a tied head, a pooler the module lacks
            continue
        pieces = [entry.to_checkpoint(_param(params, entry.path, scan)) for entry in entries]
        tensors[name] = join_parts(name, entries, pieces)
        used.update((stack_path(entry.path)[0] if scan else entry.path) for entry in entries)
    leaves, _ = flatten(params)
    lost = [path_str(path) for path, _ in leaves if path not in used]
    if lost:
        raise CheckpointError(
            f"param {lost[0]} ({len(lost)} in all) has no checkpoint name in the {type(model).__name__} key map; "
            "it would be lost"
        )
    return tensors


def _label_names(count: int, labels: Sequence[str] | None, old: dict[str, str]) -> list[str]:
    """Return a classifier's class names: ``labels``, else the source's ``id2label`` if it fits, else ``LABEL_{i}``."""
    if labels is not None:
        if len(labels) != count:
            raise CheckpointError(f"{len(labels)} label names for a classifier of {count} classes")
        return list(labels)
    if sorted(old) == sorted(str(i) for i in range(count)):
        return [old[str(i)] for i in range(count)]
    return [f"LABEL_{i}" for i in range(count)]


def config_json(
    model: nn.Module,
    *,
    base: dict[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    registry: Registry = ARCHITECTURES,
) -> dict[str, Any]:
    """Return the ``config.json`` of ``model``: ``base`` (e.g. the source's) updated with the module's config.

    Args:
      model: a registered module.
      base: entries to keep that the module's config does not hold (token ids, ``transformers_version``).
      labels: class names of a classifier (``id2label``); default ``LABEL_{i}`` or ``base``'s when they fit.
      registry: the families.
    """
    arch = registry.of(model)
    name = next(build.name for build in arch.builds if build.module is type(model))
    values = {**(base or {}), **to_hf(model.config), "architectures": [name]}
    values["dtype"] = str(np.dtype(model.param_dtype))
    if "torch_dtype" in values:
        values["torch_dtype"] = values["dtype"]
    count = getattr(model.config, "num_labels", None)
    if isinstance(count, int):
        names = _label_names(count, labels, (base or {}).get("id2label") or {})
        values["id2label"] = {str(i): label for i, label in enumerate(names)}
        values["label2id"] = {label: i for i, label in enumerate(names)}
    return values


def save_pretrained(
    directory: PathLike,
    model: nn.Module,
    params: PyTree,
    *,
    source: PathLike | None = None,
    labels: Sequence[str] | None = None,
    overwrite: bool = False,
    registry: Registry = ARCHITECTURES,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``from_pretrained`` and ``transformers`` load.

    Args:
      directory: the folder to write; created if missing.
      model: a registered module (either layer layout).
      params: its params, e.g. ``lora_jax.merge(params, lora, spec)``.
      source: the model directory ``model`` came from: its ``config.json`` entries are kept and its
        tokenizer files (:data:`SIDE_FILES`) copied.
      labels: class names of a classifier, written as ``id2label``.
      overwrite: replace existing files.
      registry: the families; ``model``'s own gives the key map.

    Returns:
      ``directory`` as a ``Path``.

    Raises:
      FileExistsError: a file to write is there and ``overwrite`` is False.
      CheckpointError: params that do not fit the key map (see :func:`checkpoint_tensors`).
    """
    directory = Path(directory)
    side = [name for name in SIDE_FILES if source is not None and (Path(source) / name).is_file()]
    refuse_existing([directory / name for name in (CONFIG_FILE, SINGLE_FILE, *side)], overwrite)
    if getattr(model, "pooling", "cls") != "cls":
        warnings.warn(
            f"{type(model).__name__} pools with {model.pooling!r}; transformers pools [CLS] through the pooler, so it "
            f"loads these weights but not this head's behaviour (lora_jax's from_pretrained(..., pooling="
            f"{model.pooling!r}) does)",
            stacklevel=2,
        )
    tensors = checkpoint_tensors(model, params, registry=registry)
    base = read_config(source) if source is not None else None
    config = config_json(model, base=base, labels=labels, registry=registry)
    check_finite(tensors, "tensor", "the model diverged or was merged from a damaged adapter; export an earlier state")
    metadata = {"format": "pt"}  # transformers reads the framework from the metadata
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    files: dict[str, Callable[[str], object]] = {
        SINGLE_FILE: lambda tmp: save_file(tensors, tmp, metadata=metadata),
        CONFIG_FILE: lambda tmp: Path(tmp).write_text(text),
    }
    copied = {name: (Path(source) / name).read_bytes() for name in side} if source is not None else {}
    for name, content in copied.items():
        if "/" not in name:
            files[name] = lambda tmp, content=content: Path(tmp).write_bytes(content)
    # One folder swap: a reader never sees new weights beside an old config. Files in subfolders (sentence-
    # transformers' 1_Pooling/config.json) follow, each written whole; they describe pooling, not the weights.
    write_directory_atomic(directory, files, overwrite=True)
    for name, content in copied.items():
        if "/" in name:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            write_bytes(directory / name, content, overwrite=True)
    return directory
