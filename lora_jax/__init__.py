"""lora_jax: Low-Rank Adaptation as a pure parameter-tree transform.

spec = lora_jax.LoraSpec([lora_jax.Rule(r".*/(query|value)/kernel", rank=8)])
lora = lora_jax.init(key, params, spec)          # {"...": {"a": A, "b": B}}
p = lora_jax.combine(params, lora, spec)         # W0 + s A@B, inside jit
serving = lora_jax.merge(params, lora, spec)     # plain tree, base dtypes
"""

from lora_jax import checkpoint, distributed, peft, training
from lora_jax.adapters import adapter_count
from lora_jax.checkpoint import CheckpointCorruptError, load_adapter, save_adapter
from lora_jax.combine import combine
from lora_jax.describe import Description, describe
from lora_jax.errors import AdapterMismatchError, LoraError, SpecError
from lora_jax.factored import LowRankKernel, factored
from lora_jax.initializers import init
from lora_jax.merge import merge, unmerge
from lora_jax.optim import adapter_only, trainable_labels
from lora_jax.plan import KernelLayout, Target, plan
from lora_jax.spec import LoraSpec, Rule, freeze, trainable

__version__ = "0.1.0"

__all__ = [
    "checkpoint",
    "distributed",
    "peft",
    "training",
    "AdapterMismatchError",
    "CheckpointCorruptError",
    "Description",
    "KernelLayout",
    "LoraError",
    "LoraSpec",
    "LowRankKernel",
    "Rule",
    "SpecError",
    "Target",
    "adapter_count",
    "adapter_only",
    "combine",
    "describe",
    "factored",
    "freeze",
    "init",
    "load_adapter",
    "merge",
    "plan",
    "save_adapter",
    "trainable",
    "trainable_labels",
    "unmerge",
]
