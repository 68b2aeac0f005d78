"""LoRA training across processes: one process per host, as on a TPU pod slice.

Each process runs this same script. JAX joins them into one runtime
(``jax.distributed.initialize``), the mesh spans every process's devices, the
base is FSDP-sharded over all of them, and each process feeds only its own
slice of the global batch. The jitted step is the single-device step
(:func:`lora_jax.training.train_step`); the shardings make it data parallel.

Two processes on one machine (CPU, gloo collectives):

    python -m experiments.multiprocess_train --num-processes 2 --process-id 0 --coordinator 127.0.0.1:12355 &
    python -m experiments.multiprocess_train --num-processes 2 --process-id 1 --coordinator 127.0.0.1:12355

On a Cloud TPU pod slice, run it on every host with no flags
(``gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...``):
``jax.distributed.initialize()`` finds the coordinator and process ids itself.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from experiments import report
from lora_jax import distributed as dist
from lora_jax.training import train_step

WIDTH, HIDDEN, CLASSES, GLOBAL_BATCH = 16, 32, 4, 8
SPEC = lora_jax.LoraSpec([lora_jax.Rule(r"(fc1|fc2)/kernel", rank=4), lora_jax.trainable(r"head/.*")])


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, WIDTH] -> logits [B, CLASSES]``."""
        h = nn.gelu(nn.Dense(HIDDEN, name="fc1")(x))
        h = nn.gelu(nn.Dense(WIDTH, name="fc2")(h))
        return nn.Dense(CLASSES, name="head")(h)


def loss_fn(params: Any, batch: dict, rng: jax.Array | None) -> jax.Array:
    logits = Classifier().apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def global_batch(step: int) -> dict[str, np.ndarray]:
    """The same batch on every process; each then keeps only its rows."""
    rng = np.random.default_rng(step)
    return {
        "x": rng.normal(size=(GLOBAL_BATCH, WIDTH)).astype(np.float32),
        "y": rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32),
    }


def run(steps: int = 3, devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Train for ``steps`` steps on ``devices`` (default: all, across processes).

    Returns:
      ``{"lora": {path: array}, "losses": [...]}`` with full values on every process.
    """
    devices = jax.devices() if devices is None else devices
    mesh = dist.make_mesh((len(devices),), ("data",), devices=devices)
    # Every process computes the same initial values on its own CPU, then keeps its slices.
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        host_params = jax.device_get(jax.jit(Classifier().init)(jax.random.key(0), jnp.zeros((1, WIDTH)))["params"])
        host_lora = jax.device_get(jax.jit(lora_jax.init, static_argnums=2)(jax.random.key(1), host_params, SPEC))
    tx = optax.adamw(1e-2)

    base_partitions = dist.partitions(host_params, dist.fsdp_rules("data"), mesh)
    sh = dist.train_shardings(host_params, SPEC, base_partitions, mesh, tx)
    params = dist.global_put(host_params, sh.params)
    lora = dist.global_put(host_lora, sh.lora)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(lora)
    step = dist.jit_step(train_step(loss_fn, SPEC, tx), sh)

    # With one device per process, process i's devices hold rows i*B/n onwards of the global batch.
    rows = GLOBAL_BATCH // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    losses = []
    for i in range(steps):
        local = {k: v[mine] for k, v in global_batch(i).items()}
        batch = dist.process_batch(local, sh.batch)
        lora, opt_state, loss = step(params, lora, opt_state, batch, None)
        losses.append(float(dist.to_host(loss)))
    flat = lora_jax.paths.flatten(dist.to_host(lora))[0]
    return {"lora": {lora_jax.paths.path_str(p): np.asarray(v) for p, v in flat}, "losses": losses}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", help="host:port of process 0; omit on Cloud TPU")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, help="process 0 writes the adapters here (.npz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    out = None
    if args.out is not None:  # np.savez adds .npz to a name without it
        out = args.out if args.out.suffix == ".npz" else args.out.with_name(args.out.name + ".npz")
        report.refuse_existing(parser, [out], args.overwrite)

    if args.num_processes is None or args.num_processes > 1:
        # CPU processes reduce through gloo; TPU and GPU ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=120,
        )
    result = run(args.steps)
    if jax.process_index() == 0:
        print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(), "losses": result["losses"]}))
        if out is not None:
            np.savez(out, losses=np.array(result["losses"]), **result["lora"])
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    return result


if __name__ == "__main__":
    main()
