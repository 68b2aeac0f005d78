"""Fine-tune the packaged MiniLM on a GLUE-style task with one method; shared by the GLUE experiments.

Methods share one footing, the spec: ``lora`` (rules from
``lora_jax.models.lora_spec``), ``full`` (every leaf trainable), ``bitfit``
(biases) and ``head`` (classifier only). The classifier head always trains.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import lora_jax as lj
from experiments import assets, report
from lora_jax import data, models, training
from lora_jax.io.atomic import write_text
from lora_jax.typing import PyTree

METHODS = ("full", "lora", "bitfit", "head")
# Steps of the --full experiments: what two CPU cores allow for a 36-run grid.
FULL_STEPS = {"sst2": 100, "cola": 300, "rte": 60}
FULL_MAX_LENGTH = {"sst2": 64, "cola": 64, "rte": 96}
# Learning rates per method. At these short budgets LoRA wants a higher rate than the paper's many-epoch
# recipe: on SST-2 (100 steps, seed 0) LoRA scored 80.0 / 81.3 / 82.5 at 1e-3 / 3e-3 / 5e-3, full
# fine-tuning 83.8 / 83.5 at 1e-4 / 2e-4.
LEARNING_RATES = {"full": 1e-4, "lora": 5e-3, "bitfit": 2e-3, "head": 2e-3}
SAVED_METHODS = ("lora", "full")  # their runs keep the trained weights (adapter.safetensors) beside the summary

Prepare = Callable[[Any, PyTree, lj.LoraSpec, training.TrainConfig], tuple[PyTree, lj.LoraSpec, Any, Any]]
"""``(model, params, spec, train_config) -> (params, spec, lora | None, tx | None)``: a variant of a method.

What :func:`run` trains instead: another base (quantized, PiSSA's residual), spec (DoRA's rules), first
adapters (PiSSA's; None: ``lora_jax.init``'s) or optimizer (LoRA+; None: AdamW on the config's schedule).
"""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    task: str = "sst2"
    method: str = "lora"
    targets: str = "qv"
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    steps: int = 300
    batch_size: int = 32
    max_length: int = 64
    train_limit: int | None = None  # first N shuffled training examples
    eval_limit: int | None = None
    learning_rate: float | None = None  # None: LEARNING_RATES[method]
    data_dir: str | None = None  # None: experiments.assets.glue_dir(), else TFDS download
    factored: bool = True
    pooling: str | None = None  # None: the checkpoint's own (mean for MiniLM)

    def with_defaults(self) -> RunConfig:
        """This configuration with the method's learning rate filled in: what a run's cache key hashes."""
        if self.learning_rate is not None:
            return self
        return dataclasses.replace(self, learning_rate=LEARNING_RATES[self.method])


def method_spec(model: Any, config: RunConfig) -> lj.LoraSpec:
    return models.method_spec(model, config.method, config.targets, rank=config.rank, alpha=config.alpha)


def load_model(num_labels: int, seed: int, pooling: str | None = None) -> tuple[Any, Any, Any]:
    """MiniLM with a fresh classifier head, its params, and its tokenizer.

    ``pooling=None`` pools as the checkpoint was trained (mean over tokens for MiniLM).
    """
    path = assets.minilm_path()
    model, params = models.from_pretrained(
        path,
        architecture="BertForSequenceClassification",
        num_labels=num_labels,
        pooling=pooling or models.sentence_pooling(path),
        key=jax.random.key(seed),
    )
    return model, params, models.load_tokenizer(path)


def load_task(config: RunConfig, tokenizer: Any) -> tuple[Any, data.Encoded, data.Encoded]:
    data_dir = config.data_dir or assets.glue_dir()
    kwargs = {"data_dir": data_dir, "download": data_dir is None}
    train_split = data.load_split(config.task, "train", **kwargs)
    dev_split = data.load_split(config.task, "validation", **kwargs)
    return (
        train_split.task,
        data.tokenize(train_split, tokenizer, config.max_length),
        data.tokenize(dev_split, tokenizer, config.max_length),
    )


def buckets_for(max_length: int) -> tuple[int, ...]:
    return data.buckets_up_to(max_length)


def run(
    config: RunConfig, checkpoint_dir: str | Path | None = None, progress: bool = True, prepare: Prepare | None = None
) -> dict[str, Any]:
    """Train and evaluate one configuration; returns metrics, sizes, timings and the state.

    ``prepare`` trains a variant of the method (:data:`Prepare`); the result's ``params``, ``spec`` and ``tx``
    are then the variant's.
    """
    model, params, tokenizer = load_model(2 if config.task != "stsb" else 1, config.seed, config.pooling)
    task, train_enc, dev_enc = load_task(config, tokenizer)
    spec = method_spec(model, config)
    buckets = buckets_for(config.max_length)
    n_train = len(train_enc.labels) if config.train_limit is None else min(config.train_limit, len(train_enc.labels))
    steps_per_epoch = data.num_batches(n_train, config.batch_size)

    def train_batches(epoch: int):
        return data.batches(
            train_enc,
            config.batch_size,
            seed=config.seed,
            epoch=epoch,
            buckets=buckets,
            limit=config.train_limit,
            group=data.TRAIN_GROUP,
        )

    def eval_batches():
        return data.batches(
            dev_enc, config.batch_size, seed=None, buckets=buckets, drop_remainder=False, limit=config.eval_limit
        )

    train_config = training.TrainConfig(
        steps=config.steps,
        learning_rate=config.with_defaults().learning_rate,
        seed=config.seed,
        factored=config.factored,
        log_every=20,
    )
    lora: PyTree | None = None
    tx: optax.GradientTransformation | None = None
    if prepare is not None:
        params, spec, lora, tx = prepare(model, params, spec, train_config)
    described = lj.describe(params, spec)
    apply_fn = models.classifier_apply_fn(model)
    classify = training.classification(apply_fn, task.metrics)
    start = time.perf_counter()
    state, records = training.fit(
        classify.loss,
        params,
        spec,
        train_config,
        train_batches,
        steps_per_epoch,
        evaluate=classify.evaluate,
        eval_batches=eval_batches,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        lora=lora,
        tx=tx,
    )
    seconds = time.perf_counter() - start
    final = [r for r in records if r["split"] == "eval"][-1]
    rates = [r["examples_per_s"] for r in records if r["split"] == "train"][1:]  # first window compiles
    return {
        "config": config,
        "metric": task.metrics[0],
        "score": final[task.metrics[0]],
        "scores": {k: v for k, v in final.items() if k not in ("step", "split")},
        "trainable": described.trainable_size,
        "base": described.base_size,
        "seconds": seconds,
        "step_ms": 1000 * config.batch_size / float(np.median(rates)) if rates else float("nan"),
        "records": records,
        "state": state,
        "params": params,
        "spec": spec,
        "model": model,
        "apply_fn": apply_fn,
        "eval_batches": eval_batches,
        "loss_fn": classify.loss,
        "tx": training.make_optimizer(train_config) if tx is None else tx,
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a :func:`run` result."""
    return {
        "config": dataclasses.asdict(result["config"].with_defaults()),
        "metric": result["metric"],
        "score": result["score"],
        "scores": result["scores"],
        "trainable": result["trainable"],
        "base": result["base"],
        "seconds": result["seconds"],
        "step_ms": result["step_ms"],
        "peak_rss_mib": report.peak_rss_mib(),
        "losses": [r["loss"] for r in result["records"] if r["split"] == "train"],
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m experiments.finetune --config JSON --out DIR [--overwrite]``: one run, in its own process.

    Writes ``DIR/summary.json`` and, for LoRA and full fine-tuning, ``DIR/adapter.safetensors`` (the trained
    leaves: what experiments.subspace compares); an existing one is replaced only with ``--overwrite``
    (checked before training).
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(description="one fine-tuning run")
    parser.add_argument("--config", required=True, help="RunConfig fields as JSON")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace DIR's adapter.safetensors and summary.json")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    config = RunConfig(**json.loads(args.config))
    adapter, summary = args.out / "adapter.safetensors", args.out / "summary.json"
    saves_weights = config.method in SAVED_METHODS
    report.refuse_existing(parser, [adapter, summary] if saves_weights else [summary], args.overwrite)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(config, progress=args.progress)
    if saves_weights:
        lj.save_adapter(adapter, result["params"], result["state"]["lora"], result["spec"], overwrite=args.overwrite)
    write_text(summary, json.dumps(summarize(result), indent=1), overwrite=args.overwrite)


if __name__ == "__main__":
    main()
