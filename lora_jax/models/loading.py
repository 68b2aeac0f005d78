"""``from_pretrained``: a local Hugging Face model directory -> (Flax module, params).

Tensors are read one at a time with ``safetensors.safe_open`` (numpy), reshaped,
cast and moved to JAX straight away, so peak host memory stays near one copy
of the weights. Scanned layouts fill one preallocated ``[layers, ...]`` buffer
per param and hand it to JAX once its last layer arrives.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from lora_jax.models.bert import POOLINGS, BertForSequenceClassification, BertModel, has_pooler
from lora_jax.models.config import BertConfig, ConfigError, GPT2Config, LlamaConfig, ModelConfig
from lora_jax.models.convert import CheckpointError, Tensor, is_ignored, key_map, normalize_name
from lora_jax.models.gpt2 import GPT2LMHeadModel
from lora_jax.models.llama import LlamaForCausalLM
from lora_jax.paths import PathTuple, flatten, nested_set, path_hash, path_str, stack_path

# architecture name -> (config class, module class)
ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "BertModel": (BertConfig, BertModel),
    "BertForSequenceClassification": (BertConfig, BertForSequenceClassification),
    "GPT2LMHeadModel": (GPT2Config, GPT2LMHeadModel),
    "GPT2Model": (GPT2Config, GPT2LMHeadModel),  # the head is tied, so the weights are the same
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
}
DEFAULT_FOR_TYPE = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict; FileNotFoundError names the file."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a model directory needs config.json")
    return json.loads(file.read_text())


def resolve_architecture(values: dict[str, Any], architecture: str | None = None) -> str:
    """The supported architecture to build for a ``config.json``.

    ``architecture`` overrides the file (e.g. ``"BertForSequenceClassification"``
    on a plain encoder checkpoint). An unlisted head of a known ``model_type``
    falls back to that type's base model, with a warning.
    """
    supported = ", ".join(ARCHITECTURES)
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {architecture!r}; supported: {supported}")
        return architecture
    listed = values.get("architectures") or []
    for name in listed:
        if name in ARCHITECTURES:
            return name
    model_type = values.get("model_type")
    if model_type in DEFAULT_FOR_TYPE:
        fallback = DEFAULT_FOR_TYPE[model_type]
        if listed:
            warnings.warn(f"architecture {listed[0]!r} is not supported; loading {fallback}", stacklevel=3)
        return fallback
    raise ConfigError(f"unknown architecture {listed or None} (model_type {model_type!r}); supported: {supported}")


def checkpoint_files(path: str | Path) -> list[Path]:
    """``model.safetensors``, or the shards named by ``model.safetensors.index.json``."""
    path = Path(path)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    index = path / INDEX_FILE
    if not index.is_file():
        others = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
        hint = f" (found {others}; only safetensors are read)" if others else ""
        raise FileNotFoundError(f"{path / SINGLE_FILE} not found, and no sharded {INDEX_FILE} either{hint}")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map'")
    files = [path / name for name in dict.fromkeys(weight_map.values())]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"shard {file} listed in {index} not found")
    return files


def checkpoint_names(files: list[Path]) -> list[str]:
    """Tensor names across files; reads headers only."""
    names = []
    for file in files:
        with safe_open(file, framework="numpy") as f:
            names.extend(f.keys())
    return names


def _tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for name in list(f.keys()):
                yield name, f.get_tensor(name)


def build_model(
    architecture: str,
    values: dict[str, Any],
    *,
    scan_layers: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    num_labels: int | None = None,
    add_pooler: bool = True,
    pooling: str = "cls",
) -> nn.Module:
    """The Flax module for ``architecture`` and a ``config.json`` dict."""
    config_cls, module_cls = ARCHITECTURES[architecture]
    if values.get("model_type", config_cls.model_type) != config_cls.model_type:
        raise ConfigError(f"architecture {architecture} does not fit model_type {values.get('model_type')!r}")
    config: ModelConfig = config_cls.from_hf(values)
    if num_labels is not None:
        config = dataclasses.replace(config, num_labels=num_labels)
    kwargs = {"scan_layers": scan_layers, "dtype": dtype, "param_dtype": param_dtype}
    if module_cls is BertModel:
        kwargs["add_pooler"] = add_pooler
    if module_cls is BertForSequenceClassification:
        kwargs["pooling"] = pooling
    return module_cls(config, **kwargs)


def abstract_params(model: nn.Module) -> dict[PathTuple, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of ``model``'s params by path, without allocating them."""
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])
    leaves, _ = flatten(shapes)
    return dict(leaves)


def _placement(path: PathTuple, scan: bool) -> tuple[PathTuple, int | None]:
    """Unrolled path -> (path in the model's layout, layer index or None)."""
    return stack_path(path) if scan else (path, None)


def _init_head(model: nn.Module, path: PathTuple, shape: tuple[int, ...], dtype: Any, key: jax.Array) -> jax.Array:
    """A fresh classifier leaf as Hugging Face draws it: kernel ``N(0, range^2)``, bias 0."""
    if path[-1] == "bias":
        return jnp.zeros(shape, dtype)
    key = jax.random.fold_in(key, path_hash(path_str(path)))
    return (model.config.initializer_range * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def load_params(
    path: str | Path, model: nn.Module, key: jax.Array | None = None, classifier: bool | None = None
) -> dict[str, Any]:
    """Read the safetensors in ``path`` into ``model``'s param tree.

    Args:
      path: a directory with ``model.safetensors`` or a sharded index.
      model: a module from :func:`build_model` (either layer layout, any param dtype).
      key: draws a classifier head the checkpoint lacks (default ``key(0)``).
      classifier: whether ``model`` has a ``bert/`` + ``classifier/`` tree;
        inferred from the module class.

    Raises:
      FileNotFoundError: no ``model.safetensors`` / index / shard.
      CheckpointError: a tensor's shape does not fit, or required tensors are missing.
    """
    files = checkpoint_files(path)
    config = model.config
    model_type = config.model_type
    classifier = isinstance(model, BertForSequenceClassification) if classifier is None else classifier
    scan = bool(getattr(model, "scan_layers", False))
    pooler = has_pooler(model)
    mapping = key_map(config, classifier=classifier, pooler=pooler)
    targets = abstract_params(model)
    assembly = _Assembly(targets, scan, np.dtype(model.param_dtype))
    unexpected = []
    prefix = ""  # as the checkpoint spells it, for messages
    for raw_name, array in _tensors(files):
        name = normalize_name(raw_name, model_type, classifier)
        if raw_name.endswith(name) and raw_name != name:
            prefix = raw_name[: -len(name)]
        if name not in mapping:
            unused_pooler = not pooler and name.startswith(("pooler.", "bert.pooler."))
            if not (unused_pooler or is_ignored(name, config) or is_ignored(raw_name, config)):
                unexpected.append(raw_name)
            continue
        for tensor in mapping[name]:
            assembly.put(raw_name, array, tensor)
        del array

    params = assembly.params
    missing = [t for ts in mapping.values() for t in ts if t.path not in assembly.done]
    head_missing = [t for t in missing if t.path[0] == "classifier"]
    if head_missing:
        warnings.warn("the checkpoint has no classifier; drawing a new one", stacklevel=2)
        key = jax.random.key(0) if key is None else key
        for t in head_missing:
            leaf = targets[t.path]
            nested_set(params, t.path, _init_head(model, t.path, tuple(leaf.shape), leaf.dtype, key))
        missing = [t for t in missing if t.path[0] != "classifier"]
    if missing:
        wanted = {t.path: _spelled(name, prefix) for name, ts in mapping.items() for t in ts}
        listed = ", ".join(f"{wanted[t.path]} -> {path_str(t.path)}" for t in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{len(missing)} tensors missing from the checkpoint in {path}: {listed}{more}")
    if unexpected:
        warnings.warn(f"ignored {len(unexpected)} unused checkpoint tensors: {unexpected[:8]}", stacklevel=2)
    return params


def _spelled(name: str, prefix: str) -> str:
    """A normalized name as the checkpoint would spell it."""
    if not prefix or name.startswith(("lm_head.", "classifier.")):
        return name
    return name if name.startswith(prefix) else prefix + name


class _Assembly:
    """A param tree filled tensor by tensor, in the model's layer layout.

    Scanned params collect their layers in one numpy buffer ``[layers, ...]``
    that moves to JAX as soon as its last layer arrives.
    """

    def __init__(self, targets: dict[PathTuple, jax.ShapeDtypeStruct], scan: bool, dtype: np.dtype) -> None:
        self.targets, self.scan, self.dtype = targets, scan, dtype
        self.params: dict[str, Any] = {}
        self.done: set[PathTuple] = set()  # unrolled paths placed so far
        self._buffers: dict[PathTuple, np.ndarray] = {}
        self._layers: dict[PathTuple, set[int]] = {}

    def put(self, name: str, array: np.ndarray, tensor: Tensor) -> None:
        """Convert checkpoint tensor ``name`` and place it at ``tensor.path``."""
        dest, layer = _placement(tensor.path, self.scan)
        if dest not in self.targets:
            raise CheckpointError(f"checkpoint tensor {name!r} maps to {path_str(dest)!r}, which the model lacks")
        shape = tuple(self.targets[dest].shape)
        self.done.add(tensor.path)
        if layer is None:
            value = tensor.convert(name, array, shape).astype(self.dtype, copy=False)
            nested_set(self.params, dest, jnp.asarray(value))
            return
        if dest not in self._buffers:
            self._buffers[dest] = np.empty(shape, self.dtype)
            self._layers[dest] = set()
        self._buffers[dest][layer] = tensor.convert(name, array, shape[1:])
        self._layers[dest].add(layer)
        if len(self._layers[dest]) == shape[0]:
            nested_set(self.params, dest, jnp.asarray(self._buffers.pop(dest)))


def from_pretrained(
    path: str | Path,
    *,
    architecture: str | None = None,
    scan_layers: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    num_labels: int | None = None,
    pooling: str = "cls",
    key: jax.Array | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a local Hugging Face model directory.

    Args:
      path: holds ``config.json`` and ``model.safetensors`` (or
        ``model.safetensors.index.json`` with its ``model-*.safetensors`` shards).
      architecture: build this instead of ``config.json``'s ``architectures``,
        e.g. ``"BertForSequenceClassification"`` on a plain encoder.
      scan_layers: stack the layers under ``nn.scan`` (params ``.../layers/...``
        with a leading layer axis) instead of ``layer_0``, ``layer_1``, ...
      dtype: compute dtype; param_dtype: storage dtype of the params.
      num_labels: classifier width (classification only).
      pooling: the classifier's sentence pooling, ``"cls"`` (Hugging Face's head) or ``"mean"``
        (see :func:`sentence_pooling` for a sentence-transformers checkpoint's own).
      key: draws a classifier head the checkpoint lacks.

    Returns:
      ``(module, params)``; call ``module.apply({"params": params}, ...)``.
    """
    values = read_config(path)
    name = resolve_architecture(values, architecture)
    files = checkpoint_files(path)
    pooler = True
    if name == "BertModel":
        pooler = any(n.endswith("pooler.dense.weight") for n in checkpoint_names(files))
    if num_labels is not None and name != "BertForSequenceClassification":
        raise ConfigError(f"num_labels applies to BertForSequenceClassification, not {name}")
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling != "cls" and name != "BertForSequenceClassification":
        raise ConfigError(f"pooling applies to BertForSequenceClassification, not {name}")
    model = build_model(
        name,
        values,
        scan_layers=scan_layers,
        dtype=dtype,
        param_dtype=param_dtype,
        num_labels=num_labels,
        add_pooler=pooler,
        pooling=pooling,
    )
    return model, load_params(path, model, key=key)


def sentence_pooling(path: str | Path) -> str:
    """The pooling a sentence-transformers checkpoint was trained with (``1_Pooling/config.json``).

    ``"mean"`` or ``"cls"``; ``"cls"`` for a plain Hugging Face directory.

    Raises:
      ConfigError: the pooling config names a mode the classifier does not have (max, sqrt-length).
    """
    file = Path(path) / "1_Pooling" / "config.json"
    if not file.exists():
        return "cls"
    modes = [key for key, on in json.loads(file.read_text()).items() if key.startswith("pooling_mode_") and on]
    by_mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in by_mode:
        raise ConfigError(f"{file}: pooling modes {modes} are not one of {sorted(by_mode)}")
    return by_mode[modes[0]]
