"""``lora-jax train``: fine-tune a BERT-family classifier on any folder with ``train.tsv`` and ``dev.tsv``.

The folder's files may have a header row or not (``--no-header`` numbers the columns, ``--columns``
names them), one or two text columns, and integer or named labels of any number of classes
(:func:`lora_jax.data.infer_labels`). The model is ``BertForSequenceClassification`` with a new head,
pooled as the checkpoint was trained (:func:`lora_jax.models.sentence_pooling`); the method is a spec
(:func:`lora_jax.models.method_spec`); :func:`lora_jax.training.fit` trains it with
:func:`lora_jax.training.classification` (accuracy, macro F1, and MCC for two classes on ``dev.tsv``).
See :mod:`lora_jax.cli.runs` for what goes into the run directory and how a run resumes.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

from lora_jax.cli import runs
from lora_jax.cli.common import load_model, say, split_list, targets_arg
from lora_jax.cli.verbs import TARGETS_HELP, Subparsers
from lora_jax.errors import LoraError
from lora_jax.scheduling import recomputation_saves_memory

ARCHITECTURE = "BertForSequenceClassification"
SPLIT_FILES = ("train.tsv", "dev.tsv")
# Learning rates per method for short budgets, as measured for MiniLM on SST-2 (experiments.finetune).
LEARNING_RATES = {"lora": 5e-3, "full": 1e-4, "bitfit": 2e-3, "head": 2e-3}
DEFAULT_EPOCHS = 3.0
MIN_LENGTH = 8  # [CLS] a [SEP] b [SEP] with room for text
# Arguments that change how a run is watched or saved, not its result: a resumed run may change them.
NOT_COMPARED = ("out", "overwrite", "checkpoint_every", "eval_every", "no_progress", "remat", "verb", "run")


def add_train(sub: Subparsers) -> None:
    from lora_jax.models.presets import METHODS

    parser = sub.add_parser(
        "train",
        help="fine-tune a classifier on a folder with train.tsv and dev.tsv, resumably",
        description=(
            "Fine-tune a BERT-family model (MODEL_DIR, with tokenizer.json) as a classifier on DATA_DIR/train.tsv, "
            "evaluate on DATA_DIR/dev.tsv (accuracy, macro F1, and MCC for two classes) and write RUN_DIR: "
            "adapter.safetensors (self-describing), run.json (arguments, labels, scores), checkpoints/ and "
            "log.jsonl. Run again with the same arguments to resume; other arguments are refused unless --overwrite."
        ),
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a BERT-family model directory with tokenizer.json")
    parser.add_argument("data_dir", metavar="DATA_DIR", help="a folder with train.tsv and dev.tsv (tab-separated)")
    parser.add_argument("--text-columns", default="sentence", help="one or two text columns, comma-separated")
    parser.add_argument("--label-column", default="label", help="the label column (integers or names; default label)")
    header = parser.add_mutually_exclusive_group()
    header.add_argument("--no-header", action="store_true", help="the files have no header row; columns are 0, 1, ...")
    header.add_argument("--columns", help="the files have no header row; these are its column names (label,sentence)")
    parser.add_argument("--method", choices=METHODS, default="lora", help="what trains besides the head (default lora)")
    parser.add_argument("--targets", default="qv", help=f"LoRA targets: {TARGETS_HELP}")
    parser.add_argument(
        "--learning-rate",
        type=float,
        help="peak AdamW rate (default by method: " + ", ".join(f"{k} {v:g}" for k, v in LEARNING_RATES.items()) + ")",
    )
    parser.add_argument("--pooling", choices=("cls", "mean"), help="sentence pooling (default: the checkpoint's)")
    add_run_options(parser, "train.tsv", epochs=DEFAULT_EPOCHS, batch_size=32, max_length=128)
    parser.set_defaults(run=train)


def add_run_options(
    parser: argparse.ArgumentParser, train_file: str, *, epochs: float, batch_size: int, max_length: int
) -> None:
    """Add the options of every training verb: rank and alpha, length, batch, seed, remat and the run directory."""
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha; the scale is alpha / r (default: twice the rank)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help=f"passes over {train_file} (default {epochs:g})")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"examples per step (default {batch_size})")
    parser.add_argument(
        "--max-length", type=int, default=max_length, help=f"tokens per example, truncated (default {max_length})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the adapters, a new head and the data order")
    parser.add_argument(
        "--remat",
        metavar="POLICY",
        help="recompute each block's activations in the backward pass under this jax.checkpoint policy, one of "
        "lora_jax.models.REMAT_POLICIES such as nothing_saveable (less memory, same results; on CPU only with "
        "XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false)",
    )
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory")
    parser.add_argument("--overwrite", action="store_true", help="start afresh, replacing a run in RUN_DIR")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    parser.add_argument(
        "--eval-every", type=int, default=0, help="steps between dev scores in log.jsonl (default 0: at the end)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_arguments(args: argparse.Namespace, epochs: float) -> dict[str, Any]:
    """Return the arguments that decide a run's result, defaults filled in (``epochs``) and paths made absolute."""
    values = {name: value for name, value in vars(args).items() if name not in NOT_COMPARED}
    values["model_dir"] = str(Path(args.model_dir).resolve())
    values["data_dir"] = str(Path(args.data_dir).resolve())
    values["alpha"] = args.alpha if args.alpha is not None else 2.0 * args.rank
    if args.steps is None and args.epochs is None:
        values["epochs"] = epochs
    return values


def arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Return :func:`run_arguments` with the learning rate of the method when none was given."""
    values = run_arguments(args, DEFAULT_EPOCHS)
    values["learning_rate"] = args.learning_rate if args.learning_rate is not None else LEARNING_RATES[args.method]
    return values


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse a count below what can run, and a rate, alpha or epoch count that is not a finite number above 0."""
    for name in ("rank", "batch_size", "steps", "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LoraError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("epochs", "learning_rate", "alpha"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise LoraError(f"--{name.replace('_', '-')} must be a finite number above 0, got {value}")
    if args.eval_every < 0:
        raise LoraError(f"--eval-every must be 0 (at the end only) or a number of steps, got {args.eval_every}")
    if args.seed < 0:
        raise LoraError(f"--seed must be 0 or more, got {args.seed}")


def check_dirs(args: argparse.Namespace, model_files: tuple[str, ...], data_files: tuple[str, ...]) -> list[Path]:
    """Return DATA_DIR's ``data_files``, refusing a missing MODEL_DIR, DATA_DIR or file of either."""
    for name in ("model_dir", "data_dir"):
        if not Path(getattr(args, name)).is_dir():
            raise FileNotFoundError(f"{getattr(args, name)}: no such directory ({name.upper()})")
    for name in model_files:
        if not (Path(args.model_dir) / name).is_file():
            raise FileNotFoundError(f"{Path(args.model_dir) / name} not found: MODEL_DIR needs it to train")
    files = [Path(args.data_dir) / name for name in data_files]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such data file (DATA_DIR holds {' and '.join(data_files)})")
    return files


def check_vocabulary(encoded: dict[str, Any], files: dict[str, Path], vocab: int, tokenizer_file: Path) -> None:
    """Refuse token ids at or past the model's ``vocab``: ``tokenizer_file`` is then another model's tokenizer.

    Args:
      encoded: split -> encodings with ``input_ids`` (one int array per example).
      files: split -> the data file it came from, named in the error.
    """
    for split, found in encoded.items():
        largest = max((int(ids.max()) for ids in found.input_ids if len(ids)), default=-1)
        if largest >= vocab:
            raise LoraError(
                f"{files[split]}: the tokenizer gives id {largest}, outside the model's vocabulary of {vocab}; "
                f"{tokenizer_file} is not this model's tokenizer"
            )


def check_remat(policy: str | None) -> None:
    """Refuse a ``--remat`` that is not one of :data:`lora_jax.models.REMAT_POLICIES`."""
    from lora_jax import models

    if policy is not None and policy not in models.REMAT_POLICIES:
        raise LoraError(f"--remat {policy}: not a policy; use one of {', '.join(models.REMAT_POLICIES)}")


def remat_model(model: Any, policy: str | None) -> Any:
    """Return ``model`` rematerializing each block under ``policy`` (``--remat``), or as it is for None."""
    from lora_jax import models

    if policy is None:
        return model
    if not recomputation_saves_memory():
        say(
            f"--remat {policy}: XLA:CPU's default scheduler keeps every activation live anyway; "
            f"set XLA_FLAGS={models.MEMORY_SCHEDULER_FLAG} for the memory saving"
        )
    return model.clone(remat=policy)


def fit_run(
    args: argparse.Namespace,
    run_dir: Path,
    record: dict[str, Any],
    objective: Any,
    params: Any,
    spec: Any,
    described: Any,
    encoded: dict[str, Any],
    train_file: Path,
    what: str,
) -> int:
    """Train ``objective`` on ``encoded["train"]`` in ``run_dir`` (resuming its checkpoints), score
    ``encoded["validation"]``, and finish the run (:func:`finish_run`); return 0.

    Args:
      args: the verb's arguments (batch size, steps or epochs, seed, lengths, checkpointing, progress).
      record: the run's ``run.json``, whose ``arguments`` hold the learning rate and epochs.
      encoded: ``{"train", "validation"}`` encoded examples (:class:`~lora_jax.data.Encoded` or
        :class:`~lora_jax.data.Completions`).
      train_file: named when it holds fewer examples than a batch.
      what: what trains, for the opening line.
    """
    from lora_jax import data, training

    settings = record["arguments"]
    train_set, dev_set, batch_size = encoded["train"], encoded["validation"], args.batch_size
    steps_per_epoch = data.num_batches(len(train_set), batch_size)
    if steps_per_epoch == 0:
        raise LoraError(f"{train_file}: {len(train_set)} examples, fewer than --batch-size {batch_size}; lower it")
    steps = args.steps or training.steps_for(len(train_set), batch_size, settings["epochs"])
    buckets = data.buckets_up_to(args.max_length)

    def train_batches(epoch: int) -> Any:
        return data.batches(train_set, batch_size, seed=args.seed, epoch=epoch, buckets=buckets, group=data.TRAIN_GROUP)

    def eval_batches() -> Any:
        return data.batches(dev_set, batch_size, seed=None, buckets=buckets, drop_remainder=False)

    checkpoint_dir = run_dir / runs.CHECKPOINTS
    with training.Checkpoints(checkpoint_dir, params, spec) as checkpoints:
        latest = checkpoints.latest_step()
    say(
        f"{what} ({len(train_set)} train, {len(dev_set)} dev examples): "
        f"{described.trainable_size:,} of {described.base_size:,} parameters train; "
        + (f"resuming from step {latest} of {steps}" if latest else f"{steps} steps")
    )
    config = training.TrainConfig(
        steps=steps,
        learning_rate=settings["learning_rate"],
        seed=args.seed,
        log_every=min(10, steps),
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
    )
    state, records = training.fit(
        objective.loss,
        params,
        spec,
        config,
        train_batches,
        steps_per_epoch,
        evaluate=objective.evaluate,
        eval_batches=eval_batches,
        checkpoint_dir=checkpoint_dir,
        log_path=run_dir / runs.LOG_FILE,
        progress=not args.no_progress,
    )
    return finish_run(run_dir, record, records, params, state["lora"], spec, described, steps, latest)


def finish_run(
    run_dir: Path,
    record: dict[str, Any],
    records: list[dict[str, Any]],
    params: Any,
    lora: Any,
    spec: Any,
    described: Any,
    steps: int,
    resumed_from: int | None,
) -> int:
    """Write the adapter and the finished ``run.json`` (with the last dev scores) and say where; return 0."""
    import lora_jax as lj

    scores = {k: v for k, v in [r for r in records if r["split"] == "eval"][-1].items() if k not in ("step", "split")}
    adapter = lj.save_adapter(run_dir / runs.ADAPTER_FILE, params, lora, spec, overwrite=True)
    record.update(
        status="finished",
        steps=steps,
        resumed_from=resumed_from,
        scores=scores,
        trainable=described.trainable_size,
        base=described.base_size,
    )
    runs.write_record(run_dir, record)
    print(f"dev: {', '.join(f'{name} {value:.4f}' for name, value in scores.items())}")
    print(f"wrote {adapter} and {run_dir / runs.RUN_FILE}")
    return 0


def train(args: argparse.Namespace) -> int:
    import jax

    import lora_jax as lj
    from lora_jax import data, models, training

    text_columns = split_list(args.text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise LoraError(f"--text-columns takes one or two columns, got {text_columns}")
    check_numbers(args)
    if args.max_length < MIN_LENGTH:
        raise LoraError(f"--max-length must be at least {MIN_LENGTH}, got {args.max_length}")
    files = check_dirs(args, ("config.json", "tokenizer.json"), SPLIT_FILES)
    check_remat(args.remat)
    model_dir, data_dir, run_dir = Path(args.model_dir), Path(args.data_dir), Path(args.out)
    settings = arguments(args)
    runs.open_run(run_dir, settings, {f.name: runs.digest(f) for f in files}, args.overwrite)

    header = (
        split_list(args.columns) if args.columns else (data.positional_header(files[0]) if args.no_header else None)
    )
    num_classes, names = data.infer_labels(files, args.label_column, header)
    metrics = ("accuracy", "macro_f1", *(("matthews_corrcoef",) if num_classes == 2 else ()))
    task = data.custom_task(data_dir.resolve().name, text_columns, args.label_column, num_classes, names, metrics)
    splits = {split: data.read_split(task, split, data_dir, header) for split in ("train", "validation")}
    pooling = args.pooling or models.sentence_pooling(model_dir)
    record: dict[str, Any] = {
        "arguments": settings,
        "data": {f.name: runs.digest(f) for f in files},
        "examples": {split: len(examples) for split, examples in splits.items()},
        "labels": list(names) if names is not None else [str(i) for i in range(num_classes)],
        "model": {"architecture": ARCHITECTURE, "options": {"num_labels": num_classes, "pooling": pooling}},
        "status": "started",
    }
    runs.write_record(run_dir, record)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the checkpoint has no classifier; drawing a new one")
        model, params = load_model(
            model_dir, architecture=ARCHITECTURE, key=jax.random.key(args.seed), **record["model"]["options"]
        )
    model = remat_model(model, args.remat)
    if args.max_length > model.config.max_position_embeddings:
        raise LoraError(f"--max-length {args.max_length} exceeds the model's {model.config.max_position_embeddings}")
    tokenizer = models.load_tokenizer(model_dir)
    encoded = {split: data.tokenize(examples, tokenizer, args.max_length) for split, examples in splits.items()}
    check_vocabulary(
        encoded, dict(zip(splits, files, strict=True)), model.config.vocab_size, model_dir / "tokenizer.json"
    )
    spec = models.method_spec(model, args.method, targets_arg(args.targets), rank=args.rank, alpha=settings["alpha"])
    described = lj.describe(params, spec)
    objective = training.classification(models.classifier_apply_fn(model), metrics)
    what = f"{args.method} on {num_classes} classes"
    return fit_run(args, run_dir, record, objective, params, spec, described, encoded, files[0], what)
