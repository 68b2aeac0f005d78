"""LoRA in a ``jax.pmap`` training loop, for code bases built on ``pmap``.

Everything carries a leading device axis: params, adapters and optimizer state
are replicated with :func:`lora_jax.distributed.replicate`, the batch split with
:func:`lora_jax.distributed.split_batch`, and adapter gradients averaged with
``jax.lax.pmean`` inside the step (:func:`lora_jax.training.train_step` with
``axis_name``). New code should prefer ``shard_map`` or ``jit`` with shardings
(see ``shard_map_train.py``).

    python -m experiments.pmap_train --steps 5
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

WIDTH, CLASSES = 16, 4
SPEC = lora_jax.LoraSpec([lora_jax.Rule(r"hidden/kernel", rank=4), lora_jax.trainable(r"head/.*")])


class Model(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, WIDTH] -> logits [B, CLASSES]``."""
        return nn.Dense(CLASSES, name="head")(nn.tanh(nn.Dense(WIDTH, name="hidden")(x)))


def loss_fn(params: Any, batch: dict, rng: jax.Array | None) -> jax.Array:
    logits = Model().apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    n = jax.local_device_count()
    params = Model().init(jax.random.key(0), jnp.zeros((1, WIDTH)))["params"]
    lora = lora_jax.init(jax.random.key(1), params, SPEC)
    tx = optax.sgd(0.1, momentum=0.9)
    one = jax.jit(train_step(loss_fn, SPEC, tx))
    ref, ref_state = lora, tx.init(lora)

    step = dist.pmap_step(train_step(loss_fn, SPEC, tx, axis_name="data"), "data")
    p_params, p_lora, p_state = dist.replicate((params, lora, tx.init(lora)), n)
    losses = []
    for i in range(args.steps):
        rng = np.random.default_rng(i)
        batch = {"x": rng.normal(size=(4 * n, WIDTH)).astype(np.float32), "y": rng.integers(0, CLASSES, 4 * n)}
        p_lora, p_state, loss = step(p_params, p_lora, p_state, dist.split_batch(batch, n), None)
        ref, ref_state, _ = one(params, ref, ref_state, batch, None)
        losses.append(float(loss[0]))

    first = jax.tree.map(lambda x: x[0], p_lora)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(ref)))
    result = {"devices": n, "losses": losses, "gap_to_one_device": gap}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
