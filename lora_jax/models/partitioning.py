"""Partition rules for registered model families, read off each family's linear maps.

Each :class:`~lora_jax.models.Linear` of a family says whether it is column
parallel (its first output axis split: the heads of ``[D, H, Dh]``) or row
parallel (its first input axis split: the heads of ``[H, Dh, D]``), so one
function gives Megatron tensor parallelism for every family in a registry,
with FSDP over the remaining axes.
"""

from __future__ import annotations

from lora_jax.distributed.partition import PartitionRule, column_parallel, fsdp_tp_rules, row_parallel
from lora_jax.models.bundled import ARCHITECTURES
from lora_jax.models.registry import Registry
from lora_jax.paths import STACKED, UNROLLED_PATTERN


def tensor_parallel_rules(axis: str = "model", *, registry: Registry = ARCHITECTURES) -> list[PartitionRule]:
    """Return Megatron tensor-parallel rules for the linear maps of every family in ``registry``.

    A column-parallel map splits its kernel's and bias's first output axis over
    ``axis``; a row-parallel map splits its kernel's first input axis and keeps
    its bias whole, so each pair needs one all-reduce. Rules match both layer
    layouts (``layer_{i}`` and scanned ``layers``, whose leading layer axis is
    counted past: the rules count axes from the end).
    """
    rules: list[PartitionRule] = []
    seen: set[str] = set()
    for arch in registry.architectures:
        for linear in arch.linears:
            module = rf"(.*/)?{arch.stack}/({STACKED}|{UNROLLED_PATTERN})/{linear.path}"
            if module in seen:
                continue
            seen.add(module)
            if linear.parallel == "column":
                rules.append((rf"{module}/(kernel|bias)", column_parallel(axis, out_ndim=linear.split_axes)))
            else:
                rules.append(
                    (rf"{module}/kernel", row_parallel(axis, in_ndim=linear.in_axes, out_ndim=linear.out_axes))
                )
    return rules


def partition_rules(
    fsdp_axis: str | None = "data",
    tp_axis: str | None = "model",
    *,
    min_size: int = 0,
    registry: Registry = ARCHITECTURES,
) -> list[PartitionRule]:
    """Return partition rules for the families in ``registry``, unrolled or scanned.

    Tensor parallel over ``tp_axis`` (:func:`tensor_parallel_rules`; the axis
    must divide the key/value heads, Llama's grouped heads included), then FSDP
    over ``fsdp_axis`` on the largest remaining dimension of every leaf, never
    on the layer axis of scanned params. Either axis may be None to leave that
    kind out.

    Use with :func:`lora_jax.distributed.partitions`:
    ``partitions(params, models.partition_rules(), mesh)``.
    """
    tp = tensor_parallel_rules(tp_axis, registry=registry) if tp_axis is not None else []
    if fsdp_axis is None:
        return tp
    return fsdp_tp_rules(fsdp_axis, tp=tp, stacked=rf".*/{STACKED}/.*", min_size=min_size)
