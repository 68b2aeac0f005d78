"""A tiny fit of a plain function (an adapter and a trainable head), in-process or as its own process.

python tests/_fit_job.py CHECKPOINT_DIR [--rank R] [--alpha A] [--width W] [--steps N] [--lr LR]

The tests that read what a failed run prints (stderr) start it as a process; the others import it.
"""

import argparse

import jax
import jax.numpy as jnp

import lora_jax as lj
from lora_jax import training


def problem(width: int = 16):
    """Return ``(params, batch, loss_fn)``: ``w [8, width]`` and ``head [width, 1]`` fitted to a sine."""
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(keys[0], (8, width)) / 3, "head": jax.random.normal(keys[1], (width, 1)) / 4}
    x = jax.random.normal(keys[2], (32, 8))
    batch = {"x": x, "y": jnp.sin(x.sum(axis=1, keepdims=True))}

    def loss_fn(p, b, rng):
        h = jnp.tanh(b["x"] @ p["w"])
        return jnp.mean((h @ p["head"] - b["y"]) ** 2)

    return params, batch, loss_fn


def spec(rank: int = 2, alpha: float = 4.0, head: bool = True) -> lj.LoraSpec:
    return lj.LoraSpec([lj.Rule("w", rank=rank, alpha=alpha), *([lj.trainable("head")] if head else [])])


def fit(directory, lora_spec=None, width=16, steps=4, lr=1e-2, batches=None, loss_fn=None, log_path=None, **config):
    """Run ``training.fit`` on the problem; ``batches(epoch)`` and ``loss_fn`` replace the problem's own."""
    params, batch, default_loss = problem(width)
    config = training.TrainConfig(steps=steps, learning_rate=lr, **{"log_every": 1, "checkpoint_every": 1, **config})
    return training.fit(
        loss_fn or default_loss,
        params,
        lora_spec or spec(),
        config,
        batches or (lambda epoch: [batch]),
        1,
        checkpoint_dir=directory,
        log_path=log_path,
        progress=False,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    fit(args.checkpoint_dir, spec(args.rank, args.alpha), args.width, args.steps, args.lr)


if __name__ == "__main__":
    main()
