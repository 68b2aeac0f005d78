"""Hugging Face checkpoint names -> Flax param paths: the machinery each family's key map uses.

A :class:`Tensor` says where one checkpoint tensor (or one part of a fused
tensor) goes in the unrolled param tree and how to reshape it. PyTorch
``Linear`` weights are ``[out, in]`` and are transposed; GPT-2's ``Conv1D``
weights are already ``[in, out]``. A key map is a dict from checkpoint name to
the tensors it fills; the helpers below write the usual entries.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lora_jax.errors import LoraError
from lora_jax.paths import PathTuple, path_str


class CheckpointError(LoraError):
    """Checkpoint tensors that do not fit the model: a wrong shape or missing tensors."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where a checkpoint tensor goes.

    Attributes:
      path: the param path in the unrolled layout.
      transpose: the checkpoint stores ``[out, in]``.
      in_ndim: how many leading axes of the Flax kernel are inputs; None copies
        the tensor as is, 0 flattens the target (a ``[H, Dh]`` bias from ``[H*Dh]``).
      part: ``(index, count)``: take part ``index`` of ``count`` equal parts
        of the checkpoint's last axis (GPT-2's fused ``c_attn``).
    """

    path: PathTuple
    transpose: bool = False
    in_ndim: int | None = None
    part: tuple[int, int] | None = None

    def _flat_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        if self.in_ndim is None:
            return target
        if self.in_ndim == 0:
            return (math.prod(target),)
        return (math.prod(target[: self.in_ndim]), math.prod(target[self.in_ndim :]))

    def checkpoint_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        """Return the shape the checkpoint tensor must have for a param of shape ``target``."""
        shape = self._flat_shape(target)
        if self.transpose:
            shape = shape[::-1]
        if self.part:
            shape = (*shape[:-1], shape[-1] * self.part[1])
        return shape

    def convert(self, name: str, array: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
        """Convert checkpoint tensor ``name`` to an array of shape ``target``.

        Raises:
          CheckpointError: ``array`` does not have the checkpoint shape ``target`` needs.
        """
        expected = self.checkpoint_shape(target)
        if tuple(array.shape) != expected:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {tuple(array.shape)}, but param "
                f"{path_str(self.path)!r} with shape {target} needs a checkpoint shape of {expected}; "
                "check that config.json belongs to these weights"
            )
        if self.part:
            index, count = self.part
            array = np.split(array, count, axis=-1)[index]
        if self.transpose:
            array = array.T
        return np.ascontiguousarray(array).reshape(target)

    def to_checkpoint(self, array: np.ndarray) -> np.ndarray:
        """Return the checkpoint tensor of param ``array`` (for a part, its piece): the inverse of :meth:`convert`.

        Pieces of a fused tensor are joined by :func:`join_parts`.
        """
        array = np.asarray(array)
        value = array.reshape(self._flat_shape(tuple(array.shape)))
        return np.ascontiguousarray(value.T if self.transpose else value)


def join_parts(name: str, tensors: tuple[Tensor, ...], pieces: list[np.ndarray]) -> np.ndarray:
    """Return checkpoint tensor ``name`` from the pieces of its ``tensors`` (:meth:`Tensor.to_checkpoint`).

    One whole tensor comes back as it is; the parts of a fused one are joined along the last axis in part order.

    Raises:
      CheckpointError: parts missing or repeated, or a whole tensor among parts.
    """
    if len(tensors) == 1 and tensors[0].part is None:
        return pieces[0]
    parts = [t.part for t in tensors]
    whole = [p for p in parts if p is not None]
    complete = sorted(p[0] for p in whole) == list(range(len(parts))) and {p[1] for p in whole} == {len(parts)}
    if len(whole) != len(parts) or not complete:
        raise CheckpointError(f"checkpoint tensor {name!r}: its key map parts {parts} do not make one whole tensor")
    ordered = [piece for _, piece in sorted(zip(whole, pieces, strict=True), key=lambda pair: pair[0][0])]
    return np.ascontiguousarray(np.concatenate(ordered, axis=-1))


KeyMap = dict[str, tuple[Tensor, ...]]
"""Checkpoint tensor name -> the tensors it fills (empty: a known tensor the module does not use)."""


def linear_keys(hf: str, path: PathTuple, in_ndim: int, transpose: bool = True, bias: bool = True) -> KeyMap:
    """Map ``hf.weight``/``hf.bias`` to ``path/kernel``/``path/bias``.

    Args:
      hf: the checkpoint module name, e.g. ``"encoder.layer.0.attention.self.query"``.
      path: the Flax module path.
      in_ndim: how many leading axes of the Flax kernel are inputs.
      transpose: the checkpoint stores ``[out, in]`` (PyTorch ``Linear``; not GPT-2's ``Conv1D``).
      bias: the module has a bias.
    """
    keys = {f"{hf}.weight": (Tensor((*path, "kernel"), transpose, in_ndim),)}
    if bias:
        keys[f"{hf}.bias"] = (Tensor((*path, "bias"), in_ndim=0),)
    return keys


def norm_keys(hf: str, path: PathTuple, bias: bool = True) -> KeyMap:
    """Map ``hf.weight``/``hf.bias`` to ``path/scale``/``path/bias`` (no bias for RMSNorm)."""
    keys = {f"{hf}.weight": (Tensor((*path, "scale")),)}
    if bias:
        keys[f"{hf}.bias"] = (Tensor((*path, "bias")),)
    return keys


def embed_keys(hf: str, path: PathTuple) -> KeyMap:
    """Map ``hf.weight`` to ``path/embedding``."""
    return {f"{hf}.weight": (Tensor((*path, "embedding")),)}


def prefixed(keys: KeyMap, name: str, path: PathTuple = ()) -> KeyMap:
    """Return ``keys`` with ``name`` before every checkpoint name and ``path`` before every param path.

    For a base model inside a head model: ``prefixed(encoder, "bert.", ("bert",))``.
    """
    return {
        name + key: tuple(dataclasses.replace(t, path=(*path, *t.path)) for t in tensors)
        for key, tensors in keys.items()
    }
