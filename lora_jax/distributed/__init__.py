"""Spread LoRA training over devices and hosts.

- :mod:`~lora_jax.distributed.partition`: partition the base by path rules
  (FSDP, tensor parallel), with checks against the mesh.
- :mod:`~lora_jax.distributed.shardings`: adapter and optimizer-state
  partitions derived from the base's; :class:`TrainShardings`; :func:`sharded_merge`.
- :mod:`~lora_jax.distributed.steps`: :func:`jit_step`, :func:`shard_map_step`,
  :func:`pmap_step` around the one step of :func:`lora_jax.training.train_step`.
- :mod:`~lora_jax.distributed.multihost`: many processes, one mesh; ``pmap``'s device axis.
"""

from lora_jax.distributed.multihost import global_put, process_batch, replicate, split_batch, to_host
from lora_jax.distributed.partition import (
    COLUMN_MODULES,
    ROW_MODULES,
    PartitionFn,
    PartitionRule,
    RuleValue,
    ShardingError,
    axis_sizes,
    check_partition,
    check_partitions,
    column_parallel,
    fsdp,
    fsdp_rules,
    fsdp_tp_rules,
    make_mesh,
    partitions,
    row_parallel,
    shard_dim,
    tensor_parallel_rules,
)
from lora_jax.distributed.shardings import (
    TrainShardings,
    abstract_lora,
    lora_partitions,
    named,
    sharded_merge,
    state_partitions,
    target_partitions,
    train_shardings,
)
from lora_jax.distributed.steps import jit_step, pmap_step, shard_map_step

__all__ = [
    "COLUMN_MODULES",
    "ROW_MODULES",
    "PartitionFn",
    "PartitionRule",
    "RuleValue",
    "ShardingError",
    "TrainShardings",
    "abstract_lora",
    "axis_sizes",
    "check_partition",
    "check_partitions",
    "column_parallel",
    "fsdp",
    "fsdp_rules",
    "fsdp_tp_rules",
    "global_put",
    "jit_step",
    "lora_partitions",
    "make_mesh",
    "named",
    "partitions",
    "pmap_step",
    "process_batch",
    "replicate",
    "row_parallel",
    "shard_dim",
    "shard_map_step",
    "sharded_merge",
    "split_batch",
    "state_partitions",
    "target_partitions",
    "tensor_parallel_rules",
    "to_host",
    "train_shardings",
]
