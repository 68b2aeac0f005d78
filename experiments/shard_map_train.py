"""Three ways to spread one LoRA training step over devices, and the same adapters from each.

1. ``shard_map`` data parallelism: base and adapters replicated, batch split,
   adapter gradients averaged with ``jax.lax.pmean``.
2. ``jax.jit`` with shardings on a ``(data, model)`` mesh: base FSDP-sharded over
   ``data`` and tensor-parallel over ``model``, adapters and optimizer state
   sharded like their kernels (:func:`lora_jax.distributed.train_shardings`).
3. One device, for reference.

All three run the one step of :func:`lora_jax.training.train_step`.

Then the adapters are merged into the sharded base without moving a weight.
Run on a CPU with fake devices (the script sets 8 unless ``XLA_FLAGS`` is set):

    python -m experiments.shard_map_train --steps 5
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import distributed as dist  # noqa: E402
from lora_jax.training import train_step  # noqa: E402

WIDTH, HIDDEN, CLASSES = 16, 64, 4
SPEC = lora_jax.LoraSpec([lora_jax.Rule(r"mlp/(up_proj|down_proj)/kernel", rank=4), lora_jax.trainable(r"mlp/head/.*")])


class Model(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, WIDTH] -> logits [B, CLASSES]``; ``up_proj``/``down_proj`` are a Megatron pair."""
        h = nn.gelu(nn.Dense(HIDDEN, name="up_proj")(x))
        x = x + nn.Dense(WIDTH, name="down_proj")(h)
        return nn.Dense(CLASSES, name="head")(x)


class Wrapped(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Model(name="mlp")(x)


def loss_fn(params: Any, batch: dict, rng: jax.Array | None) -> jax.Array:
    logits = Wrapped().apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_batch(step: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "x": rng.normal(size=(size, WIDTH)).astype(np.float32),
        "y": rng.integers(0, CLASSES, size).astype(np.int32),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    n = jax.device_count()
    params = Wrapped().init(jax.random.key(0), jnp.zeros((1, WIDTH)))["params"]
    lora0 = lora_jax.init(jax.random.key(1), params, SPEC)
    tx = optax.adam(1e-2)
    batches = [make_batch(i, 2 * n) for i in range(args.steps)]

    # 3. one device
    one = jax.jit(train_step(loss_fn, SPEC, tx))
    ref, ref_state = lora0, tx.init(lora0)
    for batch in batches:
        ref, ref_state, _ = one(params, ref, ref_state, batch, None)

    # 1. shard_map data parallel over every device
    mesh = dist.make_mesh((n,), ("data",))
    dp = dist.shard_map_step(train_step(loss_fn, SPEC, tx, axis_name="data"), mesh, "data")
    # The step donates its adapter and optimizer buffers, so it gets its own copies.
    lora, state = jax.tree.map(jnp.copy, lora0), tx.init(lora0)
    for batch in batches:
        lora, state, _ = dp(params, lora, state, batch, None)
    dp_gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(ref)))

    # 2. FSDP x tensor parallel with jit and shardings
    model = 2 if n % 2 == 0 else 1
    mesh2 = dist.make_mesh((n // model, model), ("data", "model"))
    base_partitions = dist.partitions(params, dist.fsdp_tp_rules("data", "model"), mesh2)
    sh = dist.train_shardings(params, SPEC, base_partitions, mesh2, tx)
    step = dist.jit_step(train_step(loss_fn, SPEC, tx), sh)
    sharded_params = jax.device_put(params, sh.params)
    lora2 = jax.device_put(lora0, sh.lora)
    state2 = jax.jit(tx.init, out_shardings=sh.opt_state)(lora2)
    for batch in batches:
        lora2, state2, _ = step(sharded_params, lora2, state2, batch, None)
    tp_gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(lora2), jax.tree.leaves(ref)))

    merged = dist.sharded_merge(sharded_params, lora2, SPEC)
    kept = all(
        m.sharding.is_equivalent_to(p.sharding, p.ndim)
        for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(sharded_params))
    )
    result = {
        "devices": n,
        "shard_map_gap": dp_gap,
        "fsdp_tp_gap": tp_gap,
        "merge_keeps_shardings": kept,
        "up_proj_sharding": str(sharded_params["mlp"]["up_proj"]["kernel"].sharding.spec),
        "up_proj_b_sharding": str(lora2["mlp"]["up_proj"]["kernel"]["b"].sharding.spec),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
