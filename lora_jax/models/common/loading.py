"""``from_pretrained``: a local Hugging Face model directory -> (Flax module, params), for any registered family.

The family comes from the registry (:mod:`lora_jax.models.registry`): its config class reads
``config.json``, its build says which module to make, its key map says where each checkpoint
tensor goes. Tensors are read one at a time with ``safetensors.safe_open`` (numpy), reshaped,
cast and moved to JAX straight away, so peak host memory stays near one copy of the weights.
Scanned layouts fill one preallocated ``[layers, ...]`` buffer per param and hand it to JAX once
its last layer arrives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from lora_jax.models.bundled import ARCHITECTURES
from lora_jax.models.common.config import ConfigError
from lora_jax.models.common.convert import CheckpointError, KeyMap, Tensor
from lora_jax.models.quantizing import quant_rules
from lora_jax.models.registry import Build, Registry
from lora_jax.paths import PathTuple, Pattern, flatten, nested_set, path_hash, path_str, stack_path
from lora_jax.quant import Format, Nf4
from lora_jax.quant.tree import check_rules, matching, quantize_leaf
from lora_jax.typing import PathLike, PyTree

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(path: PathLike) -> dict[str, Any]:
    """Return ``config.json`` of a model directory as a dict.

    Raises:
      FileNotFoundError: the directory has no ``config.json``.
      ConfigError: ``config.json`` is not UTF-8 JSON, or not a JSON object; naming the file.
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a model directory needs config.json")
    fix = "restore config.json from the model's source"
    values = _read_json(file, ConfigError, fix)
    if not isinstance(values, dict):
        raise ConfigError(f"{file} holds a JSON {type(values).__name__}, not an object of config fields; {fix}")
    listed = values.get("architectures", [])
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise ConfigError(f"{file}: 'architectures' is {listed!r}, not a list of class names; {fix}")
    if not isinstance(values.get("model_type", ""), str):
        raise ConfigError(f"{file}: 'model_type' is {values['model_type']!r}, not a name such as 'bert'; {fix}")
    return values


def _read_json(file: Path, error: type[Exception], fix: str) -> Any:
    """Return the JSON value in ``file``; a file that is not UTF-8 JSON raises ``error`` naming it and ``fix``."""
    try:
        return json.loads(file.read_bytes())
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError
        raise error(f"{file} is not valid JSON ({type(err).__name__}: {err}); {fix}") from None


_REDOWNLOAD = "the file is damaged or incomplete; download it again"


def checkpoint_files(path: PathLike) -> list[Path]:
    """Return ``model.safetensors``, or the shards named by ``model.safetensors.index.json``.

    Raises:
      FileNotFoundError: neither file is there.
      CheckpointError: the index is not JSON, has no ``weight_map`` of tensor names to file
        names, or lists a shard that is not there.
    """
    path = Path(path)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    index = path / INDEX_FILE
    if not index.is_file():
        others = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
        hint = f" (found {others}; only safetensors are read)" if others else ""
        raise FileNotFoundError(f"{path / SINGLE_FILE} not found, and no sharded {INDEX_FILE} either{hint}")
    content = _read_json(index, CheckpointError, _REDOWNLOAD)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()
    ):
        raise CheckpointError(f"{index} has no 'weight_map' object of tensor names to shard file names; {_REDOWNLOAD}")
    files = [path / name for name in dict.fromkeys(weight_map.values())]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"shard {file} listed in {index} not found; download the missing shard")
    return files


@contextlib.contextmanager
def _opened(file: Path) -> Iterator[Any]:
    """Open a safetensors file with numpy; a file safetensors cannot read raises CheckpointError naming it."""
    try:
        with safe_open(file, framework="numpy") as f:
            yield f
    except SafetensorError as err:
        head = file.read_bytes()[:100] if file.is_file() else b""
        lfs = " (it is a Git LFS pointer: run `git lfs pull`)" if head.startswith(b"version https://git-lfs") else ""
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}){lfs}; {_REDOWNLOAD}") from None


def checkpoint_names(files: list[Path]) -> list[str]:
    """Return the tensor names across files, reading headers only.

    Raises:
      CheckpointError: a file is not a readable safetensors file.
    """
    names = []
    for file in files:
        with _opened(file) as f:
            names.extend(f.keys())
    return names


def _tensors(files: list[Path]) -> Iterator[tuple[Path, str, np.ndarray]]:
    for file in files:
        with _opened(file) as f:
            for name in list(f.keys()):
                try:
                    array = f.get_tensor(name)
                except (AttributeError, TypeError) as err:  # a dtype numpy lacks (FP8, FP4) fails this way
                    dtype = f.get_slice(name).get_dtype()
                    raise CheckpointError(
                        f"{file}: tensor {name!r} is stored as {dtype}, which numpy cannot hold ({err}); "
                        "convert the checkpoint to float32, float16 or bfloat16"
                    ) from None
                yield file, name, array


def _check_values(file: Path, name: str, array: np.ndarray, param_dtype: Any) -> None:
    """Refuse a floating tensor holding NaN or Inf, or values beyond what ``param_dtype`` can hold."""
    if not jnp.issubdtype(array.dtype, jnp.inexact) or not array.size:
        return
    values = array if array.dtype.itemsize >= 4 else array.astype(np.float32)
    largest = float(np.abs(values).max())  # one pass: NaN propagates through max, Inf is the max
    if not np.isfinite(largest):
        raise CheckpointError(f"{file}: tensor {name!r} holds NaN or Inf; {_REDOWNLOAD}")
    if jnp.issubdtype(param_dtype, jnp.inexact):
        limit = float(jnp.finfo(param_dtype).max)
        if largest > limit:
            raise CheckpointError(
                f"{file}: tensor {name!r} holds {largest:g}, beyond {np.dtype(param_dtype).name}'s largest value "
                f"{limit:g}; load with param_dtype=jnp.float32 or jnp.bfloat16"
            )


def _check_options(registry: Registry, build: Build, options: Mapping[str, Any]) -> None:
    for option in options:
        if option not in build.options:
            takers = [b.name for arch in registry.architectures for b in arch.builds if option in b.options]
            raise ConfigError(
                f"{option} applies to {' or '.join(takers) or 'no registered architecture'}, not {build.name}"
            )


def build_model(
    architecture: str,
    values: dict[str, Any],
    *,
    scan_layers: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    registry: Registry = ARCHITECTURES,
    **options: Any,
) -> nn.Module:
    """Build the Flax module for ``architecture`` and a ``config.json`` dict.

    Args:
      architecture: a registered architecture name, e.g. ``"LlamaForCausalLM"``.
      values: the ``config.json`` dict.
      scan_layers, dtype, param_dtype: as :func:`from_pretrained`.
      registry: the families to choose from.
      **options: the build's options (:attr:`Build.options`): config fields such as ``num_labels``
        or module fields such as ``pooling`` and ``add_pooler``; None leaves one unset.

    Raises:
      ConfigError: an unknown architecture, a ``model_type`` that does not fit it, an unsupported
        config option, or an option this architecture does not take.
    """
    registry.choose(values, architecture)  # raises on a name the registry lacks
    arch = registry[architecture]
    build = arch.build(architecture)
    if values.get("model_type", arch.model_type) != arch.model_type:
        raise ConfigError(f"architecture {architecture} does not fit model_type {values.get('model_type')!r}")
    options = {name: value for name, value in options.items() if value is not None}
    _check_options(registry, build, options)
    config = arch.config.from_hf(values)
    fields = {field.name for field in dataclasses.fields(config)}
    config = dataclasses.replace(config, **{k: v for k, v in options.items() if k in fields})
    module_options = {k: v for k, v in options.items() if k not in fields}
    return build.module(config, scan_layers=scan_layers, dtype=dtype, param_dtype=param_dtype, **module_options)


def abstract_params(model: nn.Module) -> dict[PathTuple, jax.ShapeDtypeStruct]:
    """Return the shapes and dtypes of ``model``'s params by path, without allocating them."""
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])
    leaves, _ = flatten(shapes)
    return dict(leaves)


def _placement(path: PathTuple, scan: bool) -> tuple[PathTuple, int | None]:
    """Return an unrolled path's (path in the model's layout, layer index or None)."""
    return stack_path(path) if scan else (path, None)


def _init_head(model: nn.Module, path: PathTuple, shape: tuple[int, ...], dtype: Any, key: jax.Array) -> jax.Array:
    """Draw a fresh head leaf as Hugging Face does: kernel ``N(0, range^2)``, bias 0."""
    if path[-1] == "bias":
        return jnp.zeros(shape, dtype)
    key = jax.random.fold_in(key, path_hash(path_str(path)))
    return (model.config.initializer_range * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class _Spelling:
    """Checkpoint names matched to a key map's, with or without the base model's prefix.

    A checkpoint of the bare base model omits the prefix the key map spells (``GPT2Model``'s
    ``h.0...`` for ``transformer.h.0...``); one of a head model carries a prefix the bare base
    model's key map lacks (``bert.encoder...``). Missing names are spelled back the checkpoint's way.
    """

    def __init__(self, names: Mapping[str, Any], prefix: str) -> None:
        self.names, self.prefix = names, prefix
        self.shift = 0  # +1: the checkpoint adds the prefix; -1: it omits it

    def match(self, raw: str) -> str | None:
        """Return the key-map name of checkpoint tensor ``raw``, or None."""
        prefix = self.prefix
        if raw in self.names:
            return raw
        if prefix and raw.startswith(prefix) and raw[len(prefix) :] in self.names:
            self.shift = 1
            return raw[len(prefix) :]
        if prefix and prefix + raw in self.names:
            self.shift = -1
            return prefix + raw
        return None

    def spell(self, name: str) -> str:
        """Return a key-map name as the checkpoint would spell it."""
        if self.shift == 1:
            return self.prefix + name
        if self.shift == -1 and name.startswith(self.prefix):
            return name[len(self.prefix) :]
        return name


def load_params(
    path: PathLike,
    model: nn.Module,
    key: jax.Array | None = None,
    *,
    quantize: str | Nf4 | None = None,
    registry: Registry = ARCHITECTURES,
) -> PyTree:
    """Read the safetensors in ``path`` into ``model``'s param tree.

    Args:
      path: a directory with ``model.safetensors`` or a sharded index.
      model: a module from :func:`build_model` (either layer layout, any param dtype).
      key: draws a task head the checkpoint lacks (default ``key(0)``).
      quantize: ``"nf4"`` or ``"int8"``: store the family's linear kernels quantized
        (:func:`~lora_jax.models.quant_rules`), each as soon as it is read; None for none.
      registry: the families; ``model``'s own gives the key map.

    Returns:
      The param tree, in ``model``'s layer layout and ``param_dtype`` (the logical dtype of quantized kernels).

    Raises:
      FileNotFoundError: no ``model.safetensors`` or index.
      CheckpointError: a damaged file, a shard the index lists but the directory lacks, a tensor
        of another shape or of an integer dtype where a float is needed, or required tensors missing.
    """
    files = checkpoint_files(path)
    arch = registry.of(model)
    mapping = arch.key_map(model)
    scan = bool(getattr(model, "scan_layers", False))
    targets = abstract_params(model)
    rules = () if quantize is None else check_rules(quant_rules(model, quantize, registry=registry))
    assembly = _Assembly(targets, scan, np.dtype(model.param_dtype), rules)
    spelling = _Spelling(mapping, arch.prefix)
    unexpected = []
    seen: dict[str, tuple[Path, str]] = {}  # canonical name -> where it was read
    for file, raw_name, array in _tensors(files):
        name = spelling.match(raw_name)
        if name is None:
            if not arch.is_ignored(raw_name):
                unexpected.append(raw_name)
            continue
        if name in seen:
            # Shards or spellings holding one tensor twice: whichever came last would win, unseen.
            first_file, first_name = seen[name]
            raise CheckpointError(
                f"{file}: tensor {raw_name!r} is the same weight as {first_name!r} in {first_file}; the checkpoint "
                f"holds it twice, so which one is meant is unknown; {_REDOWNLOAD}"
            )
        seen[name] = (file, raw_name)
        _check_values(file, raw_name, array, model.param_dtype)
        if jnp.issubdtype(model.param_dtype, jnp.inexact) and not jnp.issubdtype(array.dtype, jnp.inexact):
            wanted = np.dtype(model.param_dtype)
            raise CheckpointError(
                f"{file}: tensor {raw_name!r} has dtype {array.dtype}, but its params are {wanted}: "
                "a weight must be floating point; the file is damaged or holds another model's weights"
            )
        for tensor in mapping[name]:
            assembly.put(raw_name, array, tensor)
        del array

    params = assembly.params
    missing = [(name, t) for name, ts in mapping.items() for t in ts if t.path not in assembly.done]
    head = [t for _, t in missing if t.path[0] == arch.head]
    if head:
        warnings.warn(f"the checkpoint has no {arch.head}; drawing a new one", stacklevel=2)
        key = jax.random.key(0) if key is None else key
        for t in head:
            leaf = targets[t.path]
            nested_set(params, t.path, _init_head(model, t.path, tuple(leaf.shape), leaf.dtype, key))
        missing = [(name, t) for name, t in missing if t.path[0] != arch.head]
    if missing:
        listed = ", ".join(f"{spelling.spell(name)} -> {path_str(t.path)}" for name, t in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{len(missing)} tensors missing from the checkpoint in {path}: {listed}{more}")
    if unexpected:
        warnings.warn(f"ignored {len(unexpected)} unused checkpoint tensors: {unexpected[:8]}", stacklevel=2)
    return params


class _Assembly:
    """A param tree filled tensor by tensor, in the model's layer layout.

    Scanned params collect their layers in one numpy buffer ``[layers, ...]``
    that moves to JAX as soon as its last layer arrives. A param that a quantize
    rule selects is quantized then, from the checkpoint's values, so only it is
    ever held in full precision.
    """

    def __init__(
        self,
        targets: dict[PathTuple, jax.ShapeDtypeStruct],
        scan: bool,
        dtype: np.dtype,
        rules: Sequence[tuple[Pattern, Format]] = (),
    ) -> None:
        self.targets, self.scan, self.dtype, self.rules = targets, scan, dtype, list(rules)
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
        fmt = self._format(dest)
        if layer is None:
            value = tensor.convert(name, array, shape)
            self._place(dest, value, fmt)
            return
        if dest not in self._buffers:
            # A kernel to quantize is gathered in float32, so it is rounded once, by the quantizer.
            self._buffers[dest] = np.empty(shape, self.dtype if fmt is None else np.float32)
            self._layers[dest] = set()
        self._buffers[dest][layer] = tensor.convert(name, array, shape[1:])
        self._layers[dest].add(layer)
        if len(self._layers[dest]) == shape[0]:
            self._place(dest, self._buffers.pop(dest), fmt)

    def _format(self, dest: PathTuple) -> Format | None:
        """Return the format of the first quantize rule that selects the param at ``dest``, or None."""
        found = matching(self.rules, path_str(dest), self.targets[dest])
        return self.rules[found[0]][1] if found else None

    def _place(self, dest: PathTuple, value: np.ndarray, fmt: Format | None) -> None:
        """Put a complete param into the tree: as an array in the param dtype, or quantized in ``fmt``."""
        if fmt is None:
            nested_set(self.params, dest, jnp.asarray(value.astype(self.dtype, copy=False)))
        else:
            nested_set(self.params, dest, quantize_leaf(path_str(dest), value, fmt, self.dtype))


def from_pretrained(
    path: PathLike,
    *,
    architecture: str | None = None,
    scan_layers: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    key: jax.Array | None = None,
    quantize: str | Nf4 | None = None,
    registry: Registry = ARCHITECTURES,
    **options: Any,
) -> tuple[nn.Module, PyTree]:
    """Load a local Hugging Face model directory.

    Args:
      path: holds ``config.json`` and ``model.safetensors`` (or
        ``model.safetensors.index.json`` with its ``model-*.safetensors`` shards).
      architecture: build this instead of ``config.json``'s ``architectures``,
        e.g. ``"BertForSequenceClassification"`` on a plain encoder.
      scan_layers: stack the layers under ``nn.scan`` (params ``.../layers/...``
        with a leading layer axis) instead of ``layer_0``, ``layer_1``, ...
      dtype: compute dtype; param_dtype: storage dtype of the params.
      key: draws a task head the checkpoint lacks.
      quantize: ``"nf4"`` or ``"int8"``: store the family's linear kernels (attention and MLP, not
        embeddings, norms or the head) quantized (:mod:`lora_jax.quant`), each as soon as it is read, so
        the full-precision model is never held at once; None (the default) for none.
      registry: the families to choose from (default the bundled ones; see :mod:`lora_jax.models.registry`).
      **options: the architecture's own options, None leaving one unset. ``BertForSequenceClassification``:
        ``num_labels`` (classifier width) and ``pooling``, ``"cls"`` (Hugging Face's head) or ``"mean"``
        (see :func:`~lora_jax.models.sentence_pooling` for a sentence-transformers checkpoint's own);
        ``BertModel``: ``add_pooler`` (default: whether the checkpoint has one).

    Returns:
      ``(module, params)``; call ``module.apply({"params": params}, ...)``.

    Raises:
      FileNotFoundError: no ``config.json`` or weights.
      ConfigError: naming ``config.json``: not a JSON object, an unknown architecture, an unsupported
        config, a field of the wrong type, or an option the architecture does not take.
      CheckpointError: naming the file: damaged weights or index, tensors that do not fit the module.
      QuantError: an unknown ``quantize`` format.
    """
    values = read_config(path)
    files = checkpoint_files(path)
    options = {option: value for option, value in options.items() if value is not None}
    with _naming(Path(path) / "config.json", architecture is None):
        name = registry.choose(values, architecture)
    build = registry[name].build(name)
    if build.detect is not None:
        options = {**build.detect(checkpoint_names(files)), **options}
    with _naming(Path(path) / "config.json"):
        model = build_model(
            name, values, scan_layers=scan_layers, dtype=dtype, param_dtype=param_dtype, registry=registry, **options
        )
    return model, load_params(path, model, key=key, quantize=quantize, registry=registry)


@contextlib.contextmanager
def _naming(file: Path, applies: bool = True) -> Iterator[None]:
    """Put ``file`` before the message of a :class:`ConfigError` raised inside (when ``applies``)."""
    try:
        yield
    except ConfigError as err:
        if not applies or str(err).startswith(str(file)):
            raise
        raise ConfigError(f"{file}: {err}") from None


def hf_names(model: nn.Module, registry: Registry = ARCHITECTURES) -> dict[str, tuple[str, Tensor]]:
    """Return, for a registered model, unrolled param path -> (PyTorch tensor name, its :class:`Tensor` layout).

    The table :mod:`lora_jax.io.peft` needs to write and read Hugging Face PEFT adapters. Names are
    spelled as the module's PyTorch class saves them (``bert.`` inside ``BertForSequenceClassification``,
    ``transformer.`` for GPT-2, ``model.`` for Llama).
    """
    mapping: KeyMap = registry.of(model).key_map(model)
    return {path_str(t.path): (name, t) for name, tensors in mapping.items() for t in tensors}
