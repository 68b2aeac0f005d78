"""Adapter files: one small safetensors file that knows the spec it came from, and whether it is whole.

:func:`save_adapter` writes the adapter tree (and fully trainable leaves) as
float32 tensors. The file's metadata holds:

- ``format``: :data:`FORMAT`;
- ``signature``: the base and spec it was made for (each leaf's shape, mode,
  rank and scale, :func:`lora_jax.adapters.signature`), as JSON;
- ``dtypes``: each leaf's own dtype, as JSON;
- ``sha256``: checksums, as JSON: ``{"metadata": digest of the format,
  signature and dtypes entries, "tensors": {name: digest of the name, stored
  dtype, shape, own dtype and bytes}}``.

:func:`load_adapter` checks, before returning anything, that the file parses,
that every checksum matches (a flipped bit in a tensor, or a header dtype
changed so the bytes read as other numbers, is :class:`CheckpointCorruptError`
naming the tensor), and that the signature is that of the base and spec it is
read under (:class:`AdapterMismatchError` naming what differs). A format-1 file
(no checksums, written before them) still loads, with a ``UserWarning`` that
it cannot be verified.

Non-finite adapters are never saved (:class:`NonFiniteError` naming the leaf).
Writes go through :func:`lora_jax.io.atomic.write_atomic`. (Full training
state, with optimizer moments, is checkpointed with orbax by
:mod:`lora_jax.training.checkpoints`.)
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lora_jax.adapters import check_fits, signature, signature_differences
from lora_jax.errors import AdapterMismatchError, CheckpointCorruptError, LoraError
from lora_jax.finite import check_finite
from lora_jax.io.atomic import refuse_existing, write_atomic
from lora_jax.paths import flatten, nested_set, path_str
from lora_jax.plan import plan
from lora_jax.spec import SPEC_METADATA_KEY, LoraSpec
from lora_jax.typing import PathLike, PyTree

FORMAT = "lora_jax.adapter/2"
"""The format :func:`save_adapter` writes: format 1 with checksums (``sha256``)."""

FORMAT_1 = "lora_jax.adapter/1"
"""The format before checksums; :func:`load_adapter` reads it, with a warning."""

_SHOWN = 3  # signature differences named in an error message


def _tensor_digest(name: str, array: np.ndarray, dtype: str) -> str:
    """Return the sha256 of a tensor's name, stored dtype, shape, own dtype ``dtype`` and (little-endian) bytes."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    digest = hashlib.sha256(json.dumps([name, array.dtype.name, list(array.shape), dtype]).encode())
    digest.update(b"\n")
    digest.update(array.tobytes())
    return digest.hexdigest()


def _metadata_digest(format_: str, signature_json: str, dtypes_json: str, spec_json: str | None) -> str:
    """Return the sha256 of the metadata entries the tensors' meaning depends on, as they are stored."""
    entries = [format_, signature_json, dtypes_json] + ([] if spec_json is None else [spec_json])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def save_adapter(path: PathLike, params: PyTree, lora: PyTree, spec: LoraSpec, *, overwrite: bool = False) -> Path:
    """Write the adapter tree ``lora`` to ``path`` (a ``.safetensors`` file), checked against ``params`` and ``spec``.

    Tensors are stored as float32; each leaf's own dtype, the signature of
    ``params`` and ``spec``, and checksums go into the file's metadata, and so
    does the spec (``LoraSpec.to_dict``), so that :func:`load_adapter` needs
    none; a spec with a predicate rule cannot be stored, and a warning says the
    file needs it at load.

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
      NonFiniteError: a leaf holds NaN or Inf, or a value float32 cannot hold (names the leaf); nothing is written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: an adapter file is safetensors; give a name ending in .safetensors")
    refuse_existing([path], overwrite)
    leaves = check_fits(plan(params, spec), lora)
    tensors = {path_str(p): np.asarray(jnp.asarray(x, jnp.float32)) for p, x in leaves.items()}
    check_finite(
        tensors,
        "adapter leaf",
        f"nothing was written to {path}. Training diverged: find the first step whose loss is NaN or Inf "
        "(lora_jax.finite.nonfinite_paths(lora) after each step names the leaves), then lower the learning rate "
        "or resume from a checkpoint before that step",
    )
    dtypes = {path_str(p): str(jnp.asarray(x).dtype) for p, x in leaves.items()}
    signature_json, dtypes_json = json.dumps(signature(params, spec)), json.dumps(dtypes)
    # The rules too, so that the file loads without the spec (LoraSpec.from_file); predicates cannot be stored.
    spec_json = json.dumps(spec.to_dict()) if spec.storable else None
    if spec_json is None:
        warnings.warn(
            f"{path}: the spec has a predicate rule, which cannot be stored; load the file with its spec, "
            "load_adapter(path, params, spec)",
            stacklevel=2,
        )
    checksums = {
        "metadata": _metadata_digest(FORMAT, signature_json, dtypes_json, spec_json),
        "tensors": {name: _tensor_digest(name, array, dtypes[name]) for name, array in tensors.items()},
    }
    metadata = {"format": FORMAT, "signature": signature_json, "dtypes": dtypes_json, "sha256": json.dumps(checksums)}
    if spec_json is not None:
        metadata[SPEC_METADATA_KEY] = spec_json
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
      CheckpointCorruptError: the file is not a readable lora_jax adapter, or does not match its checksums
        (names the file, and the tensor or metadata entry).
      CheckpointCorruptError: also when ``spec`` is None and the file stores no spec.
      AdapterMismatchError: it was saved for another spec or base (names the file and what differs).

    Warns:
      UserWarning: the file has no checksums (format 1), so its numbers cannot be verified.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointCorruptError(
            f"{path} is a folder, not an adapter file: give the .safetensors file save_adapter wrote "
            "(a PEFT folder is read by lora_jax.io.load_peft)"
        )
    if not path.exists():
        raise FileNotFoundError(f"{path}: no adapter file there")
    if spec is None:
        spec = LoraSpec.from_file(path)
    metadata, tensors = _read(path)
    format_ = metadata.get("format")
    if format_ not in (FORMAT, FORMAT_1):
        raise CheckpointCorruptError(
            f"{path}: not a lora_jax adapter (format {format_!r}, expected {FORMAT!r}); "
            "a PEFT adapter is read by lora_jax.io.load_peft"
        )
    saved = _json_entry(path, metadata, "signature")
    dtypes = _json_entry(path, metadata, "dtypes")
    if not all(isinstance(info, dict) for info in saved.values()):
        raise CheckpointCorruptError(f"{path}: metadata entry 'signature' is not a map of leaf -> settings")
    _verify(path, format_, metadata, tensors, dtypes)

    differences = signature_differences(saved, signature(params, spec), saved_in="the file")
    if differences:
        shown = "; ".join(differences[:_SHOWN])
        more = f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else ""
        raise AdapterMismatchError(
            f"{path} was saved for another spec or base: {shown}{more}. "
            "Load it under the spec and base it was saved with"
        )
    lora: dict = {}
    for name, info in saved.items():
        if name not in tensors:
            raise CheckpointCorruptError(f"{path}: tensor {name} is listed but missing")
        array = tensors[name]
        if array.dtype != np.float32:
            raise CheckpointCorruptError(f"{path}: tensor {name} is stored as {array.dtype}; adapters are float32")
        if list(array.shape) != info.get("shape"):
            raise CheckpointCorruptError(
                f"{path}: tensor {name} has shape {list(array.shape)}, "
                f"but the file's signature says {info.get('shape')}; the file is damaged"
            )
        nested_set(lora, tuple(name.split("/")), jnp.asarray(array, _leaf_dtype(path, name, dtypes)))
    try:
        check_fits(plan(params, spec), lora)
    except AdapterMismatchError as err:
        raise AdapterMismatchError(f"{path}: {err}") from None
    # Only a format-1 file can get here with one: save_adapter refuses them, and the checksums any change.
    check_finite(lora, "adapter leaf", f"{path} was saved from a run that diverged; load an earlier adapter")
    return lora


def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Return the metadata and tensors of a safetensors file, or raise ``CheckpointCorruptError`` naming it."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    # safetensors raises SafetensorError for most damage, but OSError, TypeError or AttributeError for some
    # header dtypes numpy lacks; all of them mean the same here.
    except Exception as err:
        raise CheckpointCorruptError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); it is damaged or truncated"
        ) from err
    return metadata, tensors


def _json_entry(path: Path, metadata: dict[str, str], key: str) -> dict[str, Any]:
    """Return the metadata entry ``key`` parsed as a JSON object, or raise ``CheckpointCorruptError`` naming it."""
    if key not in metadata:
        raise CheckpointCorruptError(f"{path}: the metadata has no {key!r} entry; the file is damaged")
    try:
        value = json.loads(metadata[key])
    # JSONDecodeError; ValueError for an integer too long to convert; RecursionError for nesting too deep.
    except (ValueError, RecursionError) as err:
        message = f"{path}: metadata entry {key!r} is not JSON ({err}); the file is damaged"
        raise CheckpointCorruptError(message) from None
    if not isinstance(value, dict):
        raise CheckpointCorruptError(f"{path}: metadata entry {key!r} is not a JSON object; the file is damaged")
    return value


def _verify(
    path: Path, format_: str, metadata: dict[str, str], tensors: dict[str, np.ndarray], dtypes: dict[str, Any]
) -> None:
    """Check the file's checksums, or warn that a file without them (format 1) cannot be verified."""
    if "sha256" not in metadata:
        if format_ == FORMAT:
            raise CheckpointCorruptError(f"{path}: the metadata has no 'sha256' entry, which {FORMAT} files carry")
        warnings.warn(
            f"{path} has no checksums (written in {FORMAT_1} by an earlier lora_jax): its numbers cannot be "
            "verified; save it again with save_adapter to add them",
            UserWarning,
            stacklevel=3,
        )
        return
    checksums = _json_entry(path, metadata, "sha256")
    listed = checksums.get("tensors")
    if not isinstance(listed, dict):
        raise CheckpointCorruptError(f"{path}: metadata entry 'sha256' has no map of tensor checksums")
    stored = _metadata_digest(format_, metadata["signature"], metadata["dtypes"], metadata.get(SPEC_METADATA_KEY))
    if checksums.get("metadata") != stored:
        raise CheckpointCorruptError(
            f"{path}: the metadata (format, signature, dtypes) does not match its checksum; the file is damaged"
        )
    for name in sorted(set(listed) | set(tensors)):
        if name not in tensors:
            raise CheckpointCorruptError(f"{path}: tensor {name} is listed but missing")
        if name not in listed:
            raise CheckpointCorruptError(f"{path}: tensor {name} has no checksum; the file is damaged")
        _leaf_dtype(path, name, dtypes)
        array = tensors[name]
        if _tensor_digest(name, array, dtypes[name]) != listed[name]:
            raise CheckpointCorruptError(
                f"{path}: tensor {name} ({array.dtype}, shape {list(array.shape)}) does not match its checksum: "
                "its bytes, dtype or shape changed since it was saved; restore the file from a copy or save it again"
            )


def _leaf_dtype(path: Path, name: str, dtypes: dict[str, Any]) -> np.dtype:
    """Return the floating dtype ``dtypes`` records for leaf ``name``, or raise ``CheckpointCorruptError``."""
    if name not in dtypes:
        raise CheckpointCorruptError(f"{path}: metadata entry 'dtypes' has no dtype for tensor {name}")
    recorded = dtypes[name]
    try:
        # save_adapter records dtype names ("float32", "bfloat16"); numpy's other spellings are not from it.
        dtype = jnp.dtype(recorded) if isinstance(recorded, str) else None
    except (TypeError, ValueError, SyntaxError):  # numpy parses "a,b" strings as Python and can raise SyntaxError
        dtype = None
    if dtype is None or str(dtype) != recorded or not jnp.issubdtype(dtype, jnp.floating):
        raise CheckpointCorruptError(
            f"{path}: metadata entry 'dtypes' gives tensor {name} the dtype {recorded!r}, "
            "which is not a floating-point dtype name; the file is damaged"
        )
    return dtype


def adapter_bytes(lora: PyTree) -> int:
    """Return the bytes of the arrays in an adapter tree."""
    return sum(int(np.asarray(x).nbytes) for _, x in flatten(lora)[0])
