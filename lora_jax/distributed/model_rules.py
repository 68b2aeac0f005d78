"""Partition rules for the bundled BERT, GPT-2 and Llama models (:mod:`lora_jax.models`), unrolled or scanned."""

from __future__ import annotations

from lora_jax.distributed.partition import PartitionRule, column_parallel, fsdp_tp_rules, row_parallel


def model_rules(
    fsdp_axis: str | None = "data",
    tp_axis: str | None = "model",
    *,
    stacked: str = r".*/layers/.*",
    min_size: int = 0,
) -> list[PartitionRule]:
    """Return partition rules for the bundled models.

    Tensor parallel over ``tp_axis``: ``attention/{query,key,value}`` kernels
    ``[D, H, Dh]`` and biases split the heads, ``attention/out`` ``[H, Dh, D]``
    splits its input heads, ``mlp/{intermediate,fc,gate,up}`` split their
    outputs and ``mlp/{output,proj,down}`` their inputs. ``tp_axis`` must
    divide the key/value heads (Llama's grouped heads included). Then FSDP
    over ``fsdp_axis`` everywhere, never on the layer axis of ``stacked``
    params. Either axis may be ``None`` to leave that kind out.
    """
    tp: list[PartitionRule] = []
    if tp_axis is not None:
        tp = [
            (r"(.*/)?attention/(query|key|value)/(kernel|bias)", column_parallel(tp_axis, out_ndim=2)),
            (r"(.*/)?attention/out/kernel", row_parallel(tp_axis, in_ndim=2)),
            (r"(.*/)?mlp/(intermediate|fc|gate|up)/(kernel|bias)", column_parallel(tp_axis)),
            (r"(.*/)?mlp/(output|proj|down)/kernel", row_parallel(tp_axis)),
        ]
    if fsdp_axis is None:
        return tp
    return fsdp_tp_rules(fsdp_axis, tp=tp, stacked=stacked, min_size=min_size)


MODEL_RULES = model_rules()
"""FSDP over ``data`` and tensor parallel over ``model`` for :mod:`lora_jax.models`."""
