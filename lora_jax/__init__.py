"""lora_jax: Low-Rank Adaptation as a pure parameter-tree transform.

spec = lora_jax.LoraSpec([lora_jax.Rule(r".*/(query|value)/kernel", rank=8)])
lora = lora_jax.init(key, params, spec)          # {"...": {"a": A, "b": B}}
p = lora_jax.combine(params, lora, spec)         # W0 + s A@B, inside jit
serving = lora_jax.merge(params, lora, spec)     # plain tree, base dtypes
qparams = lora_jax.quantize(params, [(r".*/kernel", "nf4")])   # QLoRA: a 4-bit frozen base

The transform needs jax, numpy and optax only. The subpackages (``io``,
``models``, ``data``, ``training``, ``distributed``, ``serve``) and the adapter-file
functions load on first use, so ``import lora_jax`` stays light and a missing
extra is named when it is needed.
"""

import importlib
from typing import TYPE_CHECKING, Any

from lora_jax import quant, scheduling
from lora_jax.adapters import trainable_count
from lora_jax.combine import combine
from lora_jax.describe import Description, describe
from lora_jax.errors import AdapterMismatchError, CheckpointCorruptError, LoraError, NonFiniteError, SpecError
from lora_jax.factored import LowRankKernel, factored
from lora_jax.initializers import init
from lora_jax.merge import merge, unmerge
from lora_jax.optim import adapter_only, lora_plus, trainable_labels
from lora_jax.pissa import pissa_init, pissa_to_lora
from lora_jax.plan import KernelLayout, Slices, Target, plan
from lora_jax.quant import dequantize, quantize
from lora_jax.spec import LoraSpec, Rule, freeze, trainable

if TYPE_CHECKING:  # what __getattr__ below imports on first use
    from lora_jax import data, distributed, io, models, serve, training
    from lora_jax.io import load_adapter, save_adapter

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself), imported on first access.
_LAZY = {
    "io": ("lora_jax.io", None),
    "models": ("lora_jax.models", None),
    "data": ("lora_jax.data", None),
    "distributed": ("lora_jax.distributed", None),
    "training": ("lora_jax.training", None),
    "serve": ("lora_jax.serve", None),
    "save_adapter": ("lora_jax.io", "save_adapter"),
    "load_adapter": ("lora_jax.io", "load_adapter"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "data",
    "distributed",
    "io",
    "load_adapter",
    "models",
    "quant",
    "scheduling",
    "save_adapter",
    "serve",
    "training",
    "AdapterMismatchError",
    "CheckpointCorruptError",
    "Description",
    "KernelLayout",
    "LoraError",
    "LoraSpec",
    "LowRankKernel",
    "NonFiniteError",
    "Rule",
    "Slices",
    "SpecError",
    "Target",
    "trainable_count",
    "adapter_only",
    "lora_plus",
    "combine",
    "dequantize",
    "describe",
    "factored",
    "freeze",
    "init",
    "merge",
    "pissa_init",
    "pissa_to_lora",
    "plan",
    "quantize",
    "trainable",
    "trainable_labels",
    "unmerge",
]
