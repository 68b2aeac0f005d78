"""Param paths: how lora_jax names a leaf of any pytree.

A leaf's path is its key path joined with ``/``, for example
``encoder/layer_0/attention/query/kernel``. Flax NNX wraps arrays in
``Variable`` objects whose key path ends in ``.value``; that suffix is dropped
so linen and NNX trees read the same.

Layered models name their blocks in one of two layouts: unrolled, one
subtree per block (``layer_0``, ``layer_1``, ...), or scanned, one subtree
``layers`` whose leaves carry a leading layer axis (``nn.scan``). The rule
that maps one to the other lives here, so every module asks the same one.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

PathTuple = tuple[str, ...]
Predicate = Callable[[str, jax.ShapeDtypeStruct], bool]
"""``(path, leaf) -> bool``: a pattern written as a function of the ``/``-joined path and the abstract leaf."""
Pattern = str | Predicate
"""A regex that must match the whole ``/``-joined path (``re.fullmatch``), or a :data:`Predicate`."""

STACKED = "layers"
"""The key of the scanned layout's one subtree of blocks."""
UNROLLED = re.compile(r"layer_(\d+)")
"""A key of the unrolled layout: ``layer_{i}``."""
UNROLLED_PATTERN = r"layer_\d+"
"""A regex for any unrolled block key, for rule patterns."""


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def key_path_to_tuple(key_path: Iterable[Any]) -> PathTuple:
    """Turn a JAX key path into a tuple of strings (NNX's trailing ``value`` dropped)."""
    keys = list(key_path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return tuple(_key_name(k) for k in keys)


def path_str(path: PathTuple) -> str:
    """Join a path tuple with ``/``: ``("a", "b", "kernel") -> "a/b/kernel"``."""
    return "/".join(path)


def flatten(tree: Any) -> tuple[list[tuple[PathTuple, Any]], Any]:
    """Return the leaves of ``tree`` with their path tuples, plus the treedef to rebuild it.

    A quantized kernel (:class:`lora_jax.quant.QuantizedArray`) is one leaf, named by its own path.
    """
    from lora_jax.quant.array import is_quantized  # lora_jax.quant imports this module

    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    return [(key_path_to_tuple(kp), leaf) for kp, leaf in leaves_with_paths], treedef


def nested_set(tree: dict, path: PathTuple, value: Any) -> None:
    """Set ``tree[p0][p1]...[pn] = value`` on a dict being built, creating levels."""
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def nested_get(tree: Mapping, path: PathTuple) -> Any:
    """Return ``tree[p0][p1]...[pn]``; raise ``KeyError`` naming the missing level."""
    node: Any = tree
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(path_str(path[: depth + 1]))
        node = node[key]
    return node


def path_hash(name: str) -> int:
    """Hash a path name to a stable non-negative 31-bit integer, for folding into PRNG keys."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def unrolled_key(layer: int) -> str:
    """Return the unrolled key of block ``layer``: ``layer_{layer}``."""
    return f"layer_{layer}"


def layer_index(key: str) -> int | None:
    """Return ``i`` for an unrolled block key ``layer_{i}``, else None."""
    match = UNROLLED.fullmatch(key)
    return int(match.group(1)) if match else None


def unroll_path(path: PathTuple, layer: int | None) -> PathTuple:
    """Return the unrolled path of one block of a scanned leaf: ``.../layers/...`` -> ``.../layer_{i}/...``."""
    if layer is None:
        return path
    return tuple(unrolled_key(layer) if key == STACKED else key for key in path)


def stack_path(path: PathTuple) -> tuple[PathTuple, int | None]:
    """Return an unrolled path in the scanned layout, with its block: ``.../layer_{i}/...`` -> (``.../layers/...``, i).

    A path with no block key comes back as it is, with None.
    """
    for depth, key in enumerate(path):
        layer = layer_index(key)
        if layer is not None:
            return (*path[:depth], STACKED, *path[depth + 1 :]), layer
    return path, None


def check_pattern(pattern: Pattern, label: str) -> None:
    """Check that ``pattern`` is a valid regex or a callable.

    Raises:
      ValueError: a string that is not a valid regex (naming ``label``).
      TypeError: neither a string nor a callable.
    """
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{label}: pattern is not a valid regex: {err}") from None
    elif not callable(pattern):
        raise TypeError(f"{label}: pattern must be a regex string or a predicate")


def matches(pattern: Pattern, name: str, leaf: jax.ShapeDtypeStruct) -> bool:
    """Whether ``pattern`` matches the leaf at ``name``: the one rule matcher of specs and partition rules.

    Args:
      pattern: a regex, matched against the whole path (``re.fullmatch``), or
        a predicate ``(path, leaf) -> bool``.
      name: the leaf's ``/``-joined path, e.g. ``encoder/layer_0/query/kernel``.
      leaf: the leaf's shape and dtype.
    """
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return bool(pattern(name, leaf))
