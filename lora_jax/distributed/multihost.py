"""Host-side data movement: many processes feeding one mesh, and the leading device axis of ``pmap``."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from lora_jax.errors import LoraError
from lora_jax.typing import PyTree


def global_put(tree: PyTree, shardings: PyTree) -> PyTree:
    """Place host values that every process holds in full onto (possibly multi-process) shardings.

    Each process copies only the slices its own devices hold, so this works
    where ``jax.device_put`` of a host array to non-addressable devices does not.
    """

    def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def process_batch(local_batch: PyTree, sharding: NamedSharding) -> PyTree:
    """Assemble the global batch from each process's slice of it.

    Args:
      local_batch: this process's rows, ``[B / process_count, ...]`` per leaf,
        process ``i`` holding rows ``i * B / n`` onwards.
      sharding: the batch sharding, leading dimension over the data axes.

    Returns:
      Global arrays ``[B, ...]``.
    """
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def to_host(tree: PyTree) -> PyTree:
    """Return full numpy values of (possibly multi-process) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def replicate(tree: PyTree, devices: int) -> PyTree:
    """Stack ``devices`` copies of each leaf on a new leading axis (for ``pmap``)."""
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (devices, *np.shape(x))), tree)


def split_batch(batch: PyTree, devices: int) -> PyTree:
    """Reshape each leaf ``[B, ...] -> [devices, B / devices, ...]`` (for ``pmap``).

    Raises:
      LoraError: ``B`` is not a multiple of ``devices``.
    """

    def split(x: Any) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[0] % devices:
            raise LoraError(
                f"batch size {x.shape[0]} is not divisible by {devices} devices; "
                "use a batch size that is a multiple of the device count"
            )
        return x.reshape(devices, x.shape[0] // devices, *x.shape[1:])

    return jax.tree_util.tree_map(split, batch)
