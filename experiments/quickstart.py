"""Quickstart: teach a small Flax model one task, then adapt it to a second with LoRA.

    python -m experiments.quickstart            # full size, about a minute on 2 CPU cores
    python -m experiments.quickstart --smoke    # seconds

Prints the trainable parameter count, the loss going down, and that the merged
tree gives the same outputs as base + adapters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from tqdm import trange

import lora_jax as lj
from experiments import report
from lora_jax.training import train_step


class Classifier(nn.Module):
    hidden: int = 128
    classes: int = 4

    @nn.compact
    def __call__(self, x):  # x [B, 16] -> logits [B, classes]
        for i in range(3):
            x = nn.gelu(nn.Dense(self.hidden, name=f"dense_{i}")(x))
        return nn.Dense(self.classes, name="head")(x)


def make_task(key: jax.Array, n: int, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inputs ``[n, 16]`` and labels ``argmax(tanh(x @ teacher))``."""
    x = jax.random.normal(key, (n, 16))
    return x, jnp.argmax(jnp.tanh(x @ teacher) @ jnp.eye(teacher.shape[1]), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def fit(
    loss_fn, params, lora, spec: lj.LoraSpec, batch, steps: int, lr: float, desc: str
) -> tuple[object, list[float]]:
    """Train ``lora`` for ``steps`` Adam steps of ``loss_fn(params, batch, rng)`` on one batch."""
    tx = optax.adam(lr)
    step = jax.jit(train_step(loss_fn, spec, tx))
    state = tx.init(lora)
    losses = []
    with trange(steps, desc=desc, leave=False, mininterval=1.0) as bar:
        for _ in bar:
            lora, state, loss = step(params, lora, state, batch, None)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return lora, losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = parser.parse_args(argv)
    name = "quickstart_smoke" if args.smoke else "quickstart"
    md, png = report.outputs(parser, args.results_dir, name, (".md", ".png"), args.overwrite)
    steps, n = (60, 512) if args.smoke else (600, 4096)

    keys = jax.random.split(jax.random.key(0), 6)
    model = Classifier()
    x1, y1 = make_task(keys[0], n, jax.random.normal(keys[1], (16, 4)))
    x2, y2 = make_task(keys[2], n, jax.random.normal(keys[3], (16, 4)))
    params = model.init(keys[4], x1)["params"]

    def loss_fn(p, batch, rng):
        x, y = batch
        return cross_entropy(model.apply({"params": p}, x), y)

    # Task 1 trains every weight: full training is the spec that makes every leaf trainable.
    everything = lj.LoraSpec([lj.trainable(".*")])
    full = lj.init(keys[4], params, everything)  # a trainable copy of every leaf
    full, _ = fit(loss_fn, params, full, everything, (x1, y1), steps, 3e-3, "task 1, full training")
    params = lj.merge(params, full, everything)

    spec = lj.LoraSpec([lj.Rule(r"dense_\d/kernel", rank=4, alpha=8), lj.trainable("head/.*")])
    print(lj.describe(params, spec))
    lora = lj.init(keys[5], params, spec)
    lora, losses = fit(loss_fn, params, lora, spec, (x2, y2), steps, 3e-3, "task 2, LoRA")
    merged = lj.merge(params, lora, spec)
    combined_logits = model.apply({"params": lj.combine(params, lora, spec)}, x2)
    merged_logits = model.apply({"params": merged}, x2)
    gap = float(jnp.max(jnp.abs(merged_logits - combined_logits)))
    accuracy = float(jnp.mean(jnp.argmax(merged_logits, -1) == y2))
    base_accuracy = float(jnp.mean(jnp.argmax(model.apply({"params": params}, x2), -1) == y2))
    summary = lj.describe(params, spec)

    print(f"task 2 loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} LoRA steps")
    print(f"task 2 accuracy: base {base_accuracy:.3f}, adapted {accuracy:.3f}")
    print(f"merged vs unmerged logits: max |diff| = {gap:.2e}")

    rows = [
        ["trainable parameters", f"{summary.trainable_size:,} of {summary.base_size:,}"],
        ["task 2 loss, first / last LoRA step", f"{losses[0]:.4f} / {losses[-1]:.4f}"],
        ["task 2 accuracy, base / adapted", f"{base_accuracy:.3f} / {accuracy:.3f}"],
        ["merged vs unmerged, max abs diff", f"{gap:.2e}"],
    ]
    report.write_markdown(md, "Quickstart", report.markdown_table(["", ""], rows))
    report.plot_lines(png, {"LoRA on task 2": losses}, "step", "cross-entropy", "Quickstart")
    return {"losses": losses, "gap": gap, "accuracy": accuracy, "base_accuracy": base_accuracy}


if __name__ == "__main__":
    main()
