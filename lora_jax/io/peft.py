"""Hugging Face PEFT folders: adapters to and from ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT stores, per adapted module ``M``, ``base_model.model.M.lora_A.weight [r, in]``
and ``base_model.model.M.lora_B.weight [out, r]`` (PyTorch's ``[out, in]``
convention), a DoRA adapter (``use_dora``) also ``base_model.model.M.lora_magnitude_vector [out]``
(lora_jax's ``m``, one per output column), and fully trainable modules (``modules_to_save``) as their
weights under the same prefix. Here ``A [*stack, *in, r]`` and
``B [*stack, r, *out]`` are flattened in the kernel's own axis order, so a
DenseGeneral ``[D, H, Dh]`` query matches PEFT's ``[H*Dh, D]`` Linear, and a
stacked (``nn.scan``) kernel becomes one module per layer.

Which checkpoint name goes with which param path is the model's business: a
:data:`NameTable` maps each param path (in the unrolled ``layer_{i}`` layout)
to its PyTorch tensor name and an :class:`HfName` layout;
:func:`lora_jax.models.hf_names` gives the table for the bundled models. Both
files are written through :func:`lora_jax.io.atomic.write_atomic`.

The config is read with PEFT's own rules (:mod:`lora_jax.io.peft_config`):
per-module ranks and alphas from ``rank_pattern``/``alpha_pattern``, and
``target_modules`` that must select the modules the spec adapts. Loading
refuses, naming the file, whatever it cannot read or that does not fit: the
spec's rank or scale for a module, DoRA where the spec has plain LoRA (or the
other way round), a tensor's shape or dtype (checked before any reshape), a
NaN or Inf, and an adapter whose weights apply to a base PEFT rewrote at
initialization (PiSSA and its kind, until converted).

PiSSA adapters: one that PEFT converted (``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``), or that
:func:`lora_jax.pissa_to_lora` converted, is plain LoRA of rank ``2r`` and
reads and writes as such; an unconverted one (``init_lora_weights: "pissa"``)
loads with :func:`load_peft_pissa`, which also returns the residual base it
applies to.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from lora_jax._extras import require
from lora_jax.adapters import check_fits
from lora_jax.errors import AdapterMismatchError, CheckpointCorruptError, LoraError, NonFiniteError
from lora_jax.finite import check_finite
from lora_jax.io.atomic import refuse_existing, write_directory_atomic
from lora_jax.io.peft_config import FIX, PeftConfig, make_config, read_config
from lora_jax.paths import PathTuple, flatten, nested_set, path_str, stack_path, unroll_path
from lora_jax.plan import Target, plan
from lora_jax.quant.array import as_array
from lora_jax.spec import LoraSpec
from lora_jax.typing import PathLike, PyTree
from lora_jax.variants import A_KEY, B_KEY, M_KEY, SlicedLowRank

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAGNITUDE = "lora_magnitude_vector"


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


def _layers(target: Target, names: NameTable) -> list[int | None]:
    """Return the layer indices of a stacked target (one leading layer axis), or ``[None]`` for an unstacked one.

    A fully trainable leaf has no layout: it is stacked when the name table holds its layers, not it.
    """
    layout = target.layout
    if layout is None:
        stacked = _unrolled(target.path, None) not in names and _unrolled(target.path, 0) in names
        return list(range(target.shape[0])) if stacked else [None]
    stack = layout.stack
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


def module_names(names: NameTable, *, parents: bool = False, adaptable: bool = False) -> set[str]:
    """Return the PyTorch module names of a model: each tensor's owner, and with ``parents`` its containers too.

    With ``adaptable``, only the owners of a kernel or an embedding table: the modules PEFT can put LoRA on.
    """
    out = set()
    for path, (name, _) in names.items():
        if adaptable and path.rsplit("/", 1)[-1] not in ("kernel", "embedding"):
            continue
        parts = name.split(".")[:-1]
        out.update(".".join(parts[:k]) for k in (range(1, len(parts) + 1) if parents else [len(parts)]))
    return out


def _to_kernel_order(x: np.ndarray, axes: tuple[int, ...], lead: int) -> np.ndarray:
    """Permute the group of axes after ``lead`` leading axes from rule order to kernel order."""
    order = np.argsort(axes)
    return np.transpose(x, [*range(lead), *(lead + int(i) for i in order), *range(lead + len(axes), x.ndim)])


def _from_kernel_order(x: np.ndarray, axes: tuple[int, ...], lead: int) -> np.ndarray:
    """Permute the group of axes after ``lead`` leading axes from kernel order to rule order."""
    order = np.argsort(np.argsort(axes))
    return np.transpose(x, [*range(lead), *(lead + int(i) for i in order), *range(lead + len(axes), x.ndim)])


def to_peft(params: PyTree, lora: PyTree, spec: LoraSpec, names: NameTable) -> tuple[dict[str, np.ndarray], dict]:
    """Return the PEFT tensors and the ``adapter_config.json`` contents for an adapter tree.

    Args:
      params: the base tree ``lora`` was made for.
      lora: the adapter tree (``A [*stack, *in, r]``, ``B [*stack, r, *out]`` and fully trainable leaves).
      spec: the spec ``lora`` was made with; one scaling for all rules.
      names: the model's name table (:func:`lora_jax.models.hf_names`).

    Returns:
      ``(tensors, config)``: float32 ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]`` (and, for DoRA,
      ``lora_magnitude_vector [out]``) and ``modules_to_save`` weights by PEFT name, and the config as a dict.

    Raises:
      AdapterMismatchError: ``lora`` does not fit ``params`` and ``spec``.
      LoraError: a path the name table lacks, part of a fused tensor, more than one stack axis, no adapted
        kernel, mixed scalings or dropout rates, or DoRA beside plain LoRA (PEFT's ``use_dora`` holds for every module).
    """
    targets = list(plan(params, spec))
    leaves = check_fits(tuple(targets), lora)
    check_finite(lora, "adapter leaf", "a PEFT adapter must hold finite numbers; train again from a finite state")
    rules = [t.rule for t in targets if t.layout is not None]
    if not rules:
        raise LoraError("the spec adapts no kernel; PEFT needs at least one LoRA module")
    if len({r.scaling for r in rules}) > 1:
        raise LoraError("PEFT takes one scaling for all modules; the spec mixes standard and rsLoRA")
    dropouts = sorted({r.dropout for r in rules})
    if len(dropouts) > 1:
        # PEFT's lora_dropout holds for every module: writing one would train the others differently on reload.
        raise LoraError(
            f"PEFT takes one lora_dropout for all modules; the spec's rules have {dropouts}: give them one rate"
        )
    modes = sorted({r.mode for r in rules})
    if len(modes) > 1:
        raise LoraError(
            "PEFT's use_dora holds for every module, and the spec mixes mode='dora' and mode='lora'; "
            "export the DoRA and the plain LoRA modules as two adapters, or train them all in one mode"
        )
    tensors: dict[str, np.ndarray] = {}
    adapted: dict[str, tuple[int, float]] = {}
    kept: dict[str, dict[str, np.ndarray]] = {}  # module -> its fully trained tensors by PyTorch name
    for t in targets:
        for layer in _layers(t, names):
            name, layout = _lookup(names, t.path, layer)
            module = name.removesuffix(".weight").removesuffix(".bias")
            if t.layout is None:
                kept.setdefault(module, {})[name] = _torch_tensor(leaves[t.path], layer, layout)
                continue
            a, b, rank, alpha = _factors(t, leaves)
            if layer is not None:
                a, b = a[layer], b[layer]
            a = _to_kernel_order(a, t.layout.inputs, 0).reshape(t.layout.in_size, -1)
            b = _to_kernel_order(b, t.layout.outputs, 1).reshape(-1, t.layout.out_size)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
            if t.rule.mode == "dora":
                m = np.asarray(jnp.asarray(leaves[(*t.path, M_KEY)], jnp.float32))
                m = m if layer is None else m[layer]
                tensors[f"{PREFIX}{module}.{MAGNITUDE}"] = _to_kernel_order(m, t.layout.outputs, 0).reshape(-1)
            adapted[module] = (rank, alpha)
    saved, bias = _kept_modules(kept, adapted, names, tensors)
    settings = make_config(
        adapted,
        saved,
        module_names(names, parents=True),
        rslora=rules[0].scaling == "rslora",
        dropout=rules[0].dropout,
        dora=modes == ["dora"],
    )
    config = {
        "peft_type": "LORA",
        **settings,
        "bias": bias,
        "fan_in_fan_out": any(not names[k][1].transpose for k in names if k.endswith("/kernel")),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return tensors, config


def _torch_tensor(leaf: Any, layer: int | None, layout: HfName) -> np.ndarray:
    """Return a whole leaf (layer ``layer`` of a stacked one) as PyTorch holds it: float32, its shape and order."""
    value = np.asarray(jnp.asarray(leaf, jnp.float32))
    value = value if layer is None else value[layer]
    flat = layout.checkpoint_shape(value.shape)
    value = value.reshape(flat[::-1] if layout.transpose else flat)
    return np.ascontiguousarray(value.T if layout.transpose else value)


def _kept_modules(
    kept: dict[str, dict[str, np.ndarray]],
    adapted: Mapping[str, Any],
    names: NameTable,
    tensors: dict[str, np.ndarray],
) -> tuple[set[str], str]:
    """Write the fully trained tensors into ``tensors``; return the modules kept whole and PEFT's ``bias``.

    A module whose trained tensors are its bias alone is PEFT's trained bias (``bias="lora_only"`` when those are
    exactly the adapted modules' biases, ``"all"`` when they are every bias of the other modules; an adapted module's
    bias lives on its ``base_layer``); any other is kept whole (``modules_to_save``).

    Raises:
      LoraError: trained biases that neither ``bias`` option names.
    """
    with_bias = {name.removesuffix(".bias") for name, _ in names.values() if name.endswith(".bias")}
    saved, biases = set(), set()
    for module, found in kept.items():
        if set(found) == {f"{module}.bias"} and module in with_bias:
            biases.add(module)
            key = f"{module}.base_layer.bias" if module in adapted else f"{module}.bias"
            tensors[PREFIX + key] = found[f"{module}.bias"]
        else:
            saved.add(module)
            tensors.update({PREFIX + name: value for name, value in found.items()})
    if not biases:
        return saved, "none"
    if biases == {m for m in adapted if m in with_bias}:
        return saved, "lora_only"
    if biases == with_bias - saved:
        return saved, "all"
    missing = sorted((with_bias - saved) - biases)
    raise LoraError(
        f"PEFT cannot express this adapter: it trains {len(biases)} biases alone, and PEFT's bias option trains "
        f"either every bias (bias='all'; {missing[0]}'s is frozen here) or the adapted modules' (bias='lora_only'): "
        "train one of those sets, or none"
    )


def _factors(target: Target, leaves: Mapping[PathTuple, Any]) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Return ``A [*stack, *in, R]``, ``B [*stack, R, *out]`` float32 as PEFT holds them, with PEFT's ``r`` and alpha.

    A fused kernel's slice adapters (``Rule.slices``) are one PEFT adapter of rank ``R = n_adapted * r`` on the
    whole module: ``A`` stacked as stored, ``B`` block-placed with zero rows for the slices without an adapter
    (:meth:`SlicedLowRank.expand`), and alpha multiplied so that PEFT's ``alpha / R`` (rsLoRA: ``/ sqrt(R)``)
    is the rule's scale.
    """
    a, b = leaves[(*target.path, A_KEY)], leaves[(*target.path, B_KEY)]
    rank, alpha = target.rule.rank, target.rule.alpha
    if target.slices is not None:
        b = SlicedLowRank.expand(target, b)
        count = len(target.slices.adapted)
        rank, alpha = rank * count, alpha * (count if target.rule.scaling == "standard" else math.sqrt(count))
    return np.asarray(jnp.asarray(a, jnp.float32)), np.asarray(jnp.asarray(b, jnp.float32)), rank, alpha


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
    text = json.dumps(config, indent=2)
    # Both files or neither: a crash never leaves new weights beside an old config.
    files = {WEIGHTS: lambda tmp: save_file(tensors, tmp), CONFIG: lambda tmp: Path(tmp).write_text(text)}
    return write_directory_atomic(directory, files, overwrite=True)


def _check_files(directory: Path) -> None:
    """Refuse a folder without both files, pointing at a pickled ``adapter_model.bin`` if that is what it has."""
    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(
            f"{directory / CONFIG}: missing (a PEFT adapter directory holds {WEIGHTS} and {CONFIG})"
        )
    if (directory / WEIGHTS).is_file():
        return
    pickled = directory / "adapter_model.bin"
    if pickled.is_file():
        raise AdapterMismatchError(
            f"{pickled}: a PyTorch pickle, which lora_jax does not read (unpickling can run code); convert it to "
            f"{WEIGHTS}: in Python with torch and safetensors, safetensors.torch.save_file(torch.load(path, "
            "weights_only=True), 'adapter_model.safetensors'), or save the adapter with save_pretrained(..., "
            "safe_serialization=True)"
        )
    raise FileNotFoundError(f"{directory / WEIGHTS}: missing (a PEFT adapter directory holds {WEIGHTS} and {CONFIG})")


# PEFT's adapter name inside a key, and the ``.weight`` its DoRA module adds on load: both dropped on read.
_SPELLINGS = (
    (re.compile(r"\.(lora_A|lora_B)\.default\."), r".\1."),
    (re.compile(rf"\.{MAGNITUDE}(?:\.default)?(?:\.weight)?$"), f".{MAGNITUDE}"),
)


def read_tensors(path: PathLike) -> dict[str, np.ndarray]:
    """Read the tensors of a PEFT ``adapter_model.safetensors``, PEFT's ``.default.`` adapter name dropped
    (and a DoRA magnitude's ``.weight``, which PEFT also reads).

    Raises:
      CheckpointCorruptError: the file is not a readable safetensors file (truncated, damaged, another format,
        a dtype NumPy lacks), or two tensors get the same name.
    """
    path = Path(path)
    try:
        loaded = require("safetensors.numpy", "io").load_file(str(path))
    except Exception as err:  # the parser's errors (SafetensorError, OSError, TypeError, ...) all mean "unreadable"
        raise CheckpointCorruptError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); it is truncated, damaged or "
            f"not a PEFT adapter; {FIX}"
        ) from None
    tensors: dict[str, np.ndarray] = {}
    for key, value in loaded.items():
        name = key
        for pattern, spelling in _SPELLINGS:
            name = pattern.sub(spelling, name)
        if name in tensors:
            raise CheckpointCorruptError(f"{path}: holds {name} twice (once as {key}); {FIX}")
        tensors[name] = value
    return tensors


def _tensor(tensors: dict[str, np.ndarray], file: Path, key: str, shape: tuple[int, ...], why: str) -> np.ndarray:
    """Return ``tensors[key]`` after checking that it is there, floating point, finite and of ``shape``.

    Raises:
      AdapterMismatchError: missing, not floating point, or another shape (named with the shape needed and ``why``).
      NonFiniteError: it holds NaN or Inf.
    """
    if key not in tensors:
        raise AdapterMismatchError(f"{file} has no tensor {key} ({why}); was the adapter made for another model?")
    value = tensors[key]
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise AdapterMismatchError(
            f"{file}: tensor {key} has dtype {value.dtype}; LoRA weights are floating point (float32, float16 or "
            f"bfloat16), so the file is damaged or not a LoRA adapter; {FIX}"
        )
    if tuple(value.shape) != shape:
        hint = " (the shape needed, transposed)" if tuple(value.shape) == shape[::-1] and value.ndim == 2 else ""
        raise AdapterMismatchError(
            f"{file}: tensor {key} has shape {tuple(value.shape)}{hint}, but needs shape {shape}: {why}; "
            "was the adapter made for another model, or its config edited?"
        )
    if not np.all(np.isfinite(value)):
        raise NonFiniteError(f"{file}: tensor {key} holds NaN or Inf; the adapter diverged or the file is damaged")
    return value


def load_peft(directory: PathLike, params: PyTree, spec: LoraSpec, names: NameTable) -> dict:
    """Read a PEFT LoRA adapter folder into an adapter tree for ``params`` and ``spec``.

    Each module gets the rank and alpha PEFT gives it (``r`` and ``lora_alpha``, or the first
    ``rank_pattern``/``alpha_pattern`` key that matches the end of its name; see :mod:`lora_jax.io.peft_config`),
    and ``spec`` must agree module by module. A DoRA adapter (``use_dora``) needs ``mode="dora"`` rules
    (:meth:`lora_jax.LoraSpec.from_peft` makes them) and gives each its magnitude ``m [*stack, *out]``. A rule
    with slices (a fused kernel) reads the one adapter of rank ``n_adapted * r`` that :func:`save_peft` writes
    for the whole module, refusing a ``lora_B`` that reaches outside its slices' blocks. Every tensor is checked
    against the rank and the base kernel before it is laid out.

    Args:
      directory: the folder holding ``adapter_model.safetensors`` and ``adapter_config.json``.
      params: the base tree.
      spec: the spec to read the adapter under; its ranks and scales must be the file's.
      names: the model's name table (:func:`lora_jax.models.hf_names`).

    Returns:
      The adapter tree, ``A``, ``B`` (and ``m``) in each rule's dtype, fully trainable leaves in the base's.

    Raises:
      FileNotFoundError: either file is missing.
      CheckpointCorruptError: a file that cannot be read: not JSON, a config without a positive integer ``r``
        or a numeric ``lora_alpha``, a truncated or damaged safetensors file (names the file).
      AdapterMismatchError: a file that does not fit: not LoRA or using an option lora_jax does not compute,
        ``target_modules`` that select no module of the base or not one the spec adapts, a rank or scale that
        differs from the spec's (names the module and both values), DoRA in the file and not in the spec or
        the other way round, a tensor missing, left over, not floating point or of the wrong shape (names the
        tensor, its shape and the shape needed), a pickled ``.bin``, or weights that apply to a base PEFT
        rewrote at initialization (``init_lora_weights`` PiSSA, OLoRA, CorDA, LoRA-GA or LoftQ; names the way
        to convert it, or :func:`load_peft_pissa` for PiSSA).
      NonFiniteError: a tensor holds NaN or Inf.
      LoraError: a path the name table lacks.
    """
    directory = Path(directory)
    _check_files(directory)
    config = read_config(directory / CONFIG)
    changed = config.changed_base
    if changed is not None:
        how = (
            "load it with lora_jax.io.load_peft_pissa, which returns the residual base with the adapter, or "
            if changed == "pissa"
            else ""
        )
        raise AdapterMismatchError(
            f"{config.file}: init_lora_weights={changed!r}: PEFT subtracted the initial adapter from the base "
            f"weights, so these weights apply to that residual base, not to the original model; {how}convert it "
            "to plain LoRA in PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=<the "
            "adapter saved before training>)"
        )
    lora = _read(directory, config, params, spec, names)
    # The tensors were finite as stored; a rule's narrower dtype can still overflow them.
    check_finite(
        lora,
        f"{directory / WEIGHTS}: in the spec's dtypes, leaf",
        "its values exceed the rule's dtype; read it under rules with dtype='float32'",
    )
    return lora


def load_peft_pissa(directory: PathLike, params: PyTree, spec: LoraSpec, names: NameTable) -> tuple[PyTree, dict]:
    """Read an unconverted PEFT PiSSA adapter (``init_lora_weights: "pissa"``) with the residual base it applies to.

    PEFT loads such a folder by running PiSSA's SVD on the original base again and training on the residual;
    so does this: the residual is :func:`lora_jax.pissa_init`'s for ``params`` (the top-``r`` part of a kernel
    does not depend on the SVD's signs, so it is PEFT's to float32 rounding).

    Args:
      directory: the PEFT folder.
      params: the ORIGINAL base tree.
      spec: the spec to read the adapter under, as for :func:`load_peft`.
      names: the model's name table.

    Returns:
      ``(residual, lora)``: ``merge(residual, lora, spec)`` is the model PEFT computes. To export against the
      original base, ``lora_jax.pissa_to_lora(params, lora, spec, lora_jax.pissa_init(params, spec)[1])``.

    Raises:
      AdapterMismatchError: the folder is not an unconverted exact-SVD PiSSA adapter (``pissa_niter_K`` used a
        randomized SVD whose residual cannot be recomputed: convert it in PEFT), and all :func:`load_peft` raises.
    """
    from lora_jax.pissa import pissa_init  # core, but only this reader needs it

    directory = Path(directory)
    _check_files(directory)
    config = read_config(directory / CONFIG)
    if config.init != "pissa":
        what = (
            "a randomized SVD (pissa_niter_K), whose residual cannot be recomputed exactly; convert the adapter in "
            "PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=...) and use load_peft"
            if isinstance(config.init, str) and config.init.startswith("pissa")
            else "not an unconverted PiSSA adapter; load it with load_peft"
        )
        raise AdapterMismatchError(f"{config.file}: init_lora_weights={config.init!r} is {what}")
    residual, _ = pissa_init(params, spec)
    return residual, _read(directory, config, residual, spec, names)


_COPIES = (".modules_to_save.bias", ".original_module.bias")
"""What PEFT's ``bias="all"`` also saves of a module kept whole: its trained bias again, and the base's."""


def _bias_copies(
    tensors: dict[str, np.ndarray], file: Path, config: PeftConfig, params: PyTree, names: NameTable
) -> set[str]:
    """Return the keys of the copies ``bias="all"`` saves of a kept module's bias, after checking each is a copy.

    Raises:
      AdapterMismatchError: a copy that differs from the module's saved bias (``modules_to_save``) or from the
        base's (``original_module``), naming the tensor: the file is not what PEFT writes for this base.
    """
    if config.bias != "all":
        return set()
    base = {name: (path, layout) for path, (name, layout) in names.items()}
    leaves = {path_str(path): leaf for path, leaf in flatten(params)[0]}
    found = set()
    for key in sorted(tensors):
        copy = next((c for c in _COPIES if key.endswith(c)), None)
        if copy is None or not key.startswith(PREFIX):
            continue
        module = key[len(PREFIX) : -len(copy)]
        if not config.saves(module) or f"{module}.bias" not in base:
            continue
        path, layout = base[f"{module}.bias"]
        if copy == _COPIES[0]:
            want = tensors.get(PREFIX + module + ".bias")
        else:  # the base's bias, in PyTorch's layout; one layer of a stacked leaf in a scanned model
            stacked, layer = stack_path(tuple(path.split("/")))
            leaf = leaves.get(path, leaves.get(path_str(stacked)) if layer is not None else None)
            layer = None if path in leaves else layer
            want = None if leaf is None else _torch_tensor(as_array(leaf), layer, layout)
        if want is None or not _same(np.asarray(tensors[key]), np.asarray(want)):
            what = f"{module}'s saved bias" if copy == _COPIES[0] else f"the base's {path}"
            raise AdapterMismatchError(
                f"{file}: tensor {key} differs from {what}; under bias='all' PEFT saves it as a copy. Load the "
                "adapter onto the model it was made for"
            )
        found.add(key)
    return found


def _same(saved: np.ndarray, want: np.ndarray) -> bool:
    """Return whether ``saved`` is ``want`` up to the rounding of the coarser of their dtypes (bfloat16: 2**-8)."""
    if saved.shape != want.shape:
        return False
    eps = max(float(jnp.finfo(x.dtype).eps) for x in (saved, want) if jnp.issubdtype(x.dtype, jnp.floating))
    a, b = saved.astype(np.float32), want.astype(np.float32)
    return bool(np.all(np.abs(a - b) <= eps * np.maximum(np.abs(a), np.abs(b)) + 1e-30))


def _read(directory: Path, config: PeftConfig, params: PyTree, spec: LoraSpec, names: NameTable) -> dict:
    """Read the adapter of a checked folder (see :func:`load_peft`)."""
    file = directory / WEIGHTS
    tensors = read_tensors(file)
    config.check_targets(module_names(names, adaptable=True))
    lora: dict = {}
    used = set()
    for t in plan(params, spec):
        layers = _layers(t, names)
        if t.layout is None:
            parts = []
            for layer in layers:
                name, layout = _lookup(names, t.path, layer)
                shape = t.shape[1:] if layer is not None else t.shape
                module = name.rsplit(".", 1)[0]
                if config.saves(module):
                    key = PREFIX + name
                elif name.endswith(".bias") and config.trains_bias(module):
                    key = PREFIX + config.bias_key(module)
                else:
                    bias = f" and bias={config.bias!r} does not train its bias" if name.endswith(".bias") else ""
                    raise AdapterMismatchError(
                        f"{config.file}: modules_to_save {list(config.modules_to_save)} does not keep {module}{bias}, "
                        f"which {t.rule.label} trains ({t.name}); PEFT would not load it"
                    )
                value = _tensor(tensors, file, key, layout.checkpoint_shape(shape), f"trainable {t.name} {shape}")
                parts.append((value.T if layout.transpose else value).reshape(shape))
                used.add(key)
            nested_set(lora, t.path, jnp.asarray(np.stack(parts) if layers != [None] else parts[0], t.dtype))
            continue
        dora = t.rule.mode == "dora"
        # A fused kernel's slice adapters are one PEFT adapter of rank n_adapted * r (see _factors).
        count = 1 if t.slices is None else len(t.slices.adapted)
        a_parts, b_parts, m_parts, b_keys = [], [], [], []
        for layer in layers:
            module = _lookup(names, t.path, layer)[0].removesuffix(".weight")
            if not config.adapts(module):
                raise AdapterMismatchError(
                    f"{config.file}: target_modules {config.targets_text} do not select {module}, which "
                    f"{t.rule.label} adapts ({t.name}); PEFT would not load its LoRA weights"
                )
            if dora != config.dora:
                kind = "DoRA" if config.dora else "plain LoRA"
                raise AdapterMismatchError(
                    f"{config.file}: use_dora={str(config.dora).lower()} makes {module} {kind}, and {t.rule.label} "
                    f"has mode={t.rule.mode!r} for {t.name}; read it under mode={'dora' if config.dora else 'lora'!r} "
                    "rules (LoraSpec.from_peft makes them)"
                )
            rank, scale = config.rank_of(module)[0], config.scale_of(module)
            if rank != count * t.rule.rank or not math.isclose(scale, t.rule.scale, rel_tol=1e-6):
                ranks = f"r={t.rule.rank}"
                if count > 1:
                    ranks += f" on each of {count} slices (PEFT r={count * t.rule.rank})"
                raise AdapterMismatchError(
                    f"{module}: the PEFT file has {config.describe(module)} ({config.file}); {t.rule.label} has "
                    f"{ranks}, alpha={t.rule.alpha:g}, scale {t.rule.scale:g} ({t.rule.scaling}) for "
                    f"{t.name}; build the spec with the file's values"
                )
            key_a, key_b = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
            layout = t.layout
            sizes = f"r={rank} from {CONFIG}'s {config.rank_of(module)[1]}, in={layout.in_size} and out="
            sizes += f"{layout.out_size} from the base kernel {t.name} {t.shape}"
            a = _tensor(tensors, file, key_a, (rank, layout.in_size), f"lora_A [r, in] ({sizes})")
            b = _tensor(tensors, file, key_b, (layout.out_size, rank), f"lora_B [out, r] ({sizes})")
            used.update((key_a, key_b))
            b_keys.append(key_b)
            a = a.T.reshape(*(t.shape[i] for i in sorted(layout.inputs)), rank)
            b = b.T.reshape(rank, *(t.shape[i] for i in sorted(layout.outputs)))
            a_parts.append(_from_kernel_order(a, layout.inputs, 0))
            b_parts.append(_from_kernel_order(b, layout.outputs, 1))
            if dora:
                key_m = f"{PREFIX}{module}.{MAGNITUDE}"
                why = f"the DoRA magnitude [out], one per output column (use_dora in {CONFIG}; out={layout.out_size}"
                m = _tensor(tensors, file, key_m, (layout.out_size,), f"{why} from the base kernel {t.name} {t.shape})")
                used.add(key_m)
                m_parts.append(
                    _from_kernel_order(m.reshape(*(t.shape[i] for i in sorted(layout.outputs))), layout.outputs, 0)
                )
        stack = (lambda xs: np.stack(xs)) if layers != [None] else (lambda xs: xs[0])
        b = stack(b_parts)
        if t.slices is not None:
            b, stray = SlicedLowRank.contract(t, b)
            if stray is not None:
                key_b = b_keys[stray[0] if layers != [None] else 0]
                adapted = ", ".join(t.slices.names[i] for i in t.slices.adapted)
                raise AdapterMismatchError(
                    f"{file}: tensor {key_b} reaches outputs of {t.name} outside the blocks of its slices "
                    f"({adapted}: rank block j on slice j only), so it is not {count} slice adapters of rank "
                    f"{t.rule.rank}; read it under a rule without slices (LoraSpec.from_peft makes one)"
                )
        nested_set(lora, (*t.path, A_KEY), jnp.asarray(stack(a_parts), t.rule.dtype))
        nested_set(lora, (*t.path, B_KEY), jnp.asarray(b, t.rule.dtype))
        if dora:
            nested_set(lora, (*t.path, M_KEY), jnp.asarray(stack(m_parts), t.rule.dtype))
    used |= _bias_copies(tensors, file, config, params, names)
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterMismatchError(
            f"{file} holds {extra[0]} ({len(extra)} tensors in all), which the spec does not cover; "
            "add a rule for its module, or load the adapter onto the model it was made for"
        )
    check_fits(plan(params, spec), lora)
    return lora
