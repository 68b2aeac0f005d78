"""Adapter files: one small safetensors file that knows the spec it came from.

:func:`save_adapter` writes the adapter tree (and fully trainable leaves) with
the signature of the base and spec it was made for (each leaf's shape, mode,
rank and scale) in the file's metadata; :func:`load_adapter` checks the
signature against the base tree and spec before returning anything. Writes go
through :func:`lora_jax.io.atomic.write_atomic`: a failed save leaves the
previous file intact, and an existing file is only replaced when asked.
(Full training state, with optimizer moments, is checkpointed with orbax by
:mod:`lora_jax.training.checkpoints`.)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from lora_jax.adapters import check_fits, signature
from lora_jax.errors import AdapterMismatchError, CheckpointCorruptError
from lora_jax.io.atomic import refuse_existing, write_atomic
from lora_jax.paths import flatten, nested_set, path_str
from lora_jax.plan import plan
from lora_jax.spec import SPEC_METADATA_KEY, LoraSpec
from lora_jax.typing import PathLike, PyTree

FORMAT = "lora_jax.adapter/1"


def save_adapter(path: PathLike, params: PyTree, lora: PyTree, spec: LoraSpec, *, overwrite: bool = False) -> Path:
    """Write the adapter tree ``lora`` to ``path`` (a ``.safetensors`` file), checked against ``params`` and ``spec``.

    Tensors are stored as float32; each leaf's own dtype and the signature of
    ``params`` and ``spec`` go into the file's metadata, and so does the spec
    (``LoraSpec.to_dict``), so that :func:`load_adapter` needs none; a spec with
    a predicate rule cannot be stored, and a warning says the file needs it at load.

    Args:
      path: the file to write.
      params: the base tree ``lora`` was made for (arrays or ``ShapeDtypeStruct``).
      lora: the adapter tree, ``{"a": A [*stack, *in, r], "b": B [*stack, r, *out]}`` at each adapted kernel and a
        copy of each fully trainable leaf.
      spec: the spec ``lora`` was made with.
      overwrite: replace an existing file.

    Returns:
      ``path`` as a ``Path``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      AdapterMismatchError: ``lora`` does not fit ``params`` and ``spec`` (names the leaf).
    """
    path = Path(path)
    refuse_existing([path], overwrite)
    leaves = check_fits(plan(params, spec), lora)
    tensors = {path_str(p): np.asarray(jnp.asarray(x, jnp.float32)) for p, x in leaves.items()}
    dtypes = {path_str(p): str(jnp.asarray(x).dtype) for p, x in leaves.items()}
    metadata = {"format": FORMAT, "signature": json.dumps(signature(params, spec)), "dtypes": json.dumps(dtypes)}
    # The rules too, so that the file loads without the spec (LoraSpec.from_file); predicates cannot be stored.
    if spec.storable:
        metadata[SPEC_METADATA_KEY] = json.dumps(spec.to_dict())
    else:
        warnings.warn(
            f"{path}: the spec has a predicate rule, which cannot be stored; load the file with its spec, "
            "load_adapter(path, params, spec)",
            stacklevel=2,
        )
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


def load_adapter(path: PathLike, params: PyTree, spec: LoraSpec | None = None) -> dict:
    """Read an adapter file written by :func:`save_adapter` for this base tree and spec.

    Args:
      path: the ``.safetensors`` file.
      params: the base tree (arrays or ``ShapeDtypeStruct``).
      spec: the spec to read the adapter under; it must give every leaf the shape, mode, rank and scale it was
        saved with. None reads the spec stored in the file (:meth:`LoraSpec.from_file`).

    Returns:
      The adapter tree, each leaf in the dtype it was saved from.

    Raises:
      FileNotFoundError: no file at ``path``.
      CheckpointCorruptError: the file is not a readable lora_jax adapter, or ``spec`` is None and it
        stores no spec.
      AdapterMismatchError: it was saved for another spec or base (names the leaf).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter checkpoint there")
    if spec is None:
        spec = LoraSpec.from_file(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointCorruptError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{path}: not a lora_jax adapter (format {metadata.get('format')!r})")
    try:
        saved = json.loads(metadata["signature"])
        dtypes = json.loads(metadata["dtypes"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointCorruptError(f"{path}: damaged metadata ({err})") from None
    wanted = signature(params, spec)
    for name, info in wanted.items():
        if name not in saved:
            raise AdapterMismatchError(f"{path} has no adapter leaf {name}; it was saved for another spec or base")
        if saved[name] != info:
            raise AdapterMismatchError(f"{path}: leaf {name} was saved as {saved[name]}, but this spec needs {info}")
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise AdapterMismatchError(f"{path} holds {extra[0]}, which this spec does not adapt")
    lora: dict = {}
    for name in wanted:
        if name not in tensors:
            raise CheckpointCorruptError(f"{path}: tensor {name} is listed but missing")
        nested_set(lora, tuple(name.split("/")), jnp.asarray(tensors[name], dtypes[name]))
    check_fits(plan(params, spec), lora)
    return lora


def adapter_bytes(lora: PyTree) -> int:
    """Return the bytes of the arrays in an adapter tree."""
    return sum(int(np.asarray(x).nbytes) for _, x in flatten(lora)[0])
