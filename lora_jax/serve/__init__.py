"""Serving many adapters of one base: adapter sets, one batch with an adapter per row, weighted combinations."""

from lora_jax.serve.adapter_set import (
    GAIN_KEY,
    AdapterSet,
    adapter_set,
    add,
    check_ids,
    empty_set,
    gather_rows,
    remove,
    replace,
    set_spec,
)
from lora_jax.serve.per_example import PerExample, per_example
from lora_jax.serve.weighted import COMBINATIONS, weighted_adapter

__all__ = [
    "COMBINATIONS",
    "GAIN_KEY",
    "AdapterSet",
    "PerExample",
    "add",
    "adapter_set",
    "check_ids",
    "empty_set",
    "gather_rows",
    "per_example",
    "remove",
    "replace",
    "set_spec",
    "weighted_adapter",
]
