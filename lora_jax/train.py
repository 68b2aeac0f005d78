"""A small, readable training loop: AdamW with warm-up and decay, metrics, checkpoints, resume.

The trainable state is ``{"trainable", "opt_state", "step", "rng"}``; the base
params stay outside it, frozen. Methods differ only in their spec: LoRA rules,
``lj.trainable(".*")`` for full fine-tuning, ``lj.trainable(".*bias")`` for BitFit, the
head alone for head-only.

``apply_fn(params, batch, rng)`` returns logits ``[B, classes]``; it runs the
model with dropout when ``rng`` is a key and without when it is ``None``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax._extras import require
from lora_jax.combine import combine
from lora_jax.factored import factored
from lora_jax.initializers import init
from lora_jax.merge import merge
from lora_jax.spec import LoraSpec

ApplyFn = Callable[[Any, dict[str, jax.Array], jax.Array | None], jax.Array]
Batches = Callable[[int], Iterable[dict[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe: AdamW, linear warm-up, then linear decay to zero."""

    steps: int
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    seed: int = 0
    factored: bool = True  # False: materialize W0 + s*A@B with combine
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 0  # 0: checkpoint at the end only
    keep_checkpoints: int = 2


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_ratio * steps``, then linear decay to 0 at ``steps``."""
    warmup = max(1, int(config.warmup_ratio * config.steps))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, warmup),
            optax.linear_schedule(config.learning_rate, 0.0, max(1, config.steps - warmup)),
        ],
        [warmup],
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.adamw(learning_rate_schedule(config), weight_decay=config.weight_decay)


def classification_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean cross-entropy; ``logits [B, C]``, ``labels [B]``, ``weights [B]``."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def init_state(key: jax.Array, params: Any, spec: LoraSpec, tx: optax.GradientTransformation) -> dict:
    """Fresh trainable state: adapters (``B = 0``), optimizer state, step 0, an RNG."""
    init_key, rng = jax.random.split(key)
    trainable = init(init_key, params, spec)
    return {
        "trainable": trainable,
        "opt_state": tx.init(trainable),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(rng),
    }


def forward(apply_fn: ApplyFn, spec: LoraSpec, use_factored: bool) -> Callable[..., jax.Array]:
    """``(params, trainable, batch, model_rng, lora_rng) -> logits`` on the chosen path."""
    if use_factored:
        fast = factored(apply_fn, spec)

        def run(params, trainable, batch, model_rng, lora_rng):
            return fast(params, trainable, batch, model_rng, dropout_rng=lora_rng)

        return run

    def run_materialized(params, trainable, batch, model_rng, lora_rng):
        return apply_fn(combine(params, trainable, spec), batch, model_rng)

    return run_materialized


def batch_classification_loss(logits: jax.Array, batch: dict) -> jax.Array:
    return classification_loss(logits, batch["labels"], batch["weights"])


def make_train_step(
    apply_fn: ApplyFn,
    spec: LoraSpec,
    tx: optax.GradientTransformation,
    use_factored: bool = True,
    loss: Callable[[jax.Array, dict], jax.Array] = batch_classification_loss,
) -> Callable[[dict, Any, dict], tuple[dict, dict]]:
    """A jitted ``step(state, params, batch) -> (state, {"loss"})``; only ``trainable`` gets gradients.

    ``loss(model_output, batch)`` defaults to weighted cross-entropy on ``batch["labels"]``.
    Leaves that ``spec`` makes fully trainable are never read from ``params``,
    so they may be ``jax.ShapeDtypeStruct`` there (full fine-tuning then holds one copy).
    """
    run = forward(apply_fn, spec, use_factored)

    def step(state: dict, params: Any, batch: dict) -> tuple[dict, dict]:
        rng = jax.random.wrap_key_data(state["rng"])
        rng, model_rng, lora_rng = jax.random.split(rng, 3)

        def loss_fn(trainable):
            return loss(run(params, trainable, batch, model_rng, lora_rng), batch)

        value, grads = jax.value_and_grad(loss_fn)(state["trainable"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        new_state = {
            "trainable": optax.apply_updates(state["trainable"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": jax.random.key_data(rng),
        }
        return new_state, {"loss": value}

    return jax.jit(step, donate_argnums=0)


def predict(apply_fn: ApplyFn, serving_params: Any, batches: Iterable[dict]) -> tuple[np.ndarray, ...]:
    """Predictions, labels and weights over ``batches`` with a plain (merged) param tree."""
    logits_fn = jax.jit(lambda p, b: apply_fn(p, b, None))
    preds, labels, weights = [], [], []
    for batch in batches:
        preds.append(np.asarray(jnp.argmax(logits_fn(serving_params, batch), axis=-1)))
        labels.append(batch["labels"])
        weights.append(batch["weights"])
    return np.concatenate(preds), np.concatenate(labels), np.concatenate(weights)


def evaluate(
    apply_fn: ApplyFn, params: Any, trainable: Any, spec: LoraSpec, batches: Iterable[dict], metrics: Iterable[str]
) -> dict[str, float]:
    """Metrics of the merged model (the serving path) on ``batches``."""
    from lora_jax.data.metrics import compute_metrics  # the data package pulls in TFDS: load it on use

    merged = jax.jit(merge, static_argnums=2)(params, trainable, spec)
    preds, labels, weights = predict(apply_fn, merged, batches)
    return compute_metrics(tuple(metrics), preds, labels, weights)


def _checkpoints(directory: Path, keep: int) -> Any:
    ocp = require("orbax.checkpoint", "train")  # heavy; only runs that checkpoint need it

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.resolve(), options=options)


def restore_latest(directory: Path, template: dict) -> dict | None:
    """The newest checkpoint in ``directory`` shaped like ``template``, or None."""
    if not directory.exists():
        return None
    ocp = require("orbax.checkpoint", "train")

    with _checkpoints(directory, keep=1) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _epoch_batches(train_batches: Batches, steps_per_epoch: int, start: int) -> Iterator[dict]:
    """Batches from global step ``start`` on, epoch after epoch (same order as an unbroken run)."""
    epoch, skip = divmod(start, steps_per_epoch)
    while True:
        for i, batch in enumerate(train_batches(epoch)):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def fit(
    apply_fn: ApplyFn,
    params: Any,
    spec: LoraSpec,
    config: TrainConfig,
    train_batches: Batches,
    steps_per_epoch: int,
    eval_batches: Callable[[], Iterable[dict]] | None = None,
    metrics: Iterable[str] = ("accuracy",),
    checkpoint_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Train ``spec``'s trainable leaves for ``config.steps`` steps; resume if checkpoints exist.

    Args:
      apply_fn: ``(params, batch, rng | None) -> logits [B, C]``.
      params: the frozen base tree.
      spec: which leaves train and how.
      config: optimizer, schedule, logging and checkpoint settings.
      train_batches: ``epoch -> batches``, the same for the same epoch every time
        (so a resumed run sees what an unbroken one would).
      steps_per_epoch: how many batches ``train_batches(epoch)`` yields.
      eval_batches: ``() -> batches`` for evaluation, or None.
      metrics: names from :data:`lora_jax.data.METRICS`.
      checkpoint_dir: orbax checkpoints of the trainable state (kept: the last
        ``config.keep_checkpoints``); a run restarted with the same directory
        resumes from the newest.
      log_path: metrics as JSON lines (appended).

    Returns:
      The final state and the list of logged records.
    """
    tx = make_optimizer(config)
    state = init_state(jax.random.key(config.seed), params, spec, tx)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if directory is not None:
        restored = restore_latest(directory, state)
        state = restored if restored is not None else state
    step_fn = make_train_step(apply_fn, spec, tx, config.factored)
    start = int(state["step"])
    log = open(log_path, "a") if log_path is not None else None  # noqa: SIM115
    manager = _checkpoints(directory, config.keep_checkpoints) if directory is not None else None
    records: list[dict] = []

    def record(entry: dict) -> None:
        records.append(entry)
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    def checkpoint(step: int) -> None:
        ocp = require("orbax.checkpoint", "train")

        if manager is not None and step not in manager.all_steps():
            manager.save(step, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()

    def run_eval(step: int) -> None:
        if eval_batches is not None:
            scores = evaluate(apply_fn, params, state["trainable"], spec, eval_batches(), metrics)
            record({"step": step, "split": "eval", **scores})

    try:
        batches = _epoch_batches(train_batches, steps_per_epoch, start)
        tqdm = require("tqdm", "train").tqdm
        bar = tqdm(total=config.steps, initial=start, disable=not progress, mininterval=1.0, desc="train")
        window_loss, window_examples, window_start = [], 0, time.perf_counter()
        for step in range(start + 1, config.steps + 1):
            batch = next(batches)
            state, out = step_fn(state, params, batch)
            window_loss.append(out["loss"])
            window_examples += int(np.sum(batch["weights"]))
            if step % config.log_every == 0 or step == config.steps:
                loss = float(np.mean([float(x) for x in window_loss]))
                rate = window_examples / max(time.perf_counter() - window_start, 1e-9)
                record({"step": step, "split": "train", "loss": loss, "examples_per_s": rate})
                bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.0f}")
                window_loss, window_examples, window_start = [], 0, time.perf_counter()
            bar.update(1)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint(step)
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                run_eval(step)
        bar.close()
        checkpoint(config.steps)
        run_eval(config.steps)
    finally:
        if log is not None:
            log.close()
        if manager is not None:
            manager.close()
    return state, records


def steps_for(examples: int, batch_size: int, epochs: float) -> int:
    """Number of optimizer steps for ``epochs`` passes over ``examples``."""
    return max(1, math.ceil(epochs * (examples // batch_size)))
