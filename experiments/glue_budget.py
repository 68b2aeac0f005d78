"""The paper's GLUE claims at budgets that mean something (issue 15): learning rates chosen on a held-out slice
of the training set, learning curves on dev, training until full fine-tuning's dev metric stops improving.

    python -m experiments.glue_budget --tasks rte cola sst2 --seeds 1   # the runs (cached under runs/glue_budget)
    python -m experiments.glue_budget --tasks cola --seeds 3 --name glue_budget_cola
    python -m experiments.glue_budget --tasks cola --seeds 3 --longer 3 --name glue_budget_cola --overwrite
    python -m experiments.glue_budget --smoke                           # seconds, for the tests

The protocol, per task:

1. A fixed slice of the training set (``Budget.heldout`` examples, drawn with a seed of its own) is held out;
   the methods train on the rest (the first ``Budget.train_limit`` of it, shuffled, if set). The learning
   rates are chosen on the held-out slice; dev decides only when full fine-tuning stops (step 3), as the
   issue asks.
2. Every run follows one schedule: AdamW, linear warm-up over 6% of ``Budget.max_steps``, then linear
   decay to zero at ``max_steps``; every ``Budget.eval_every`` steps the merged model is scored on the
   held-out slice and on dev (the learning curves).
3. Full fine-tuning trains at each rate of its grid to ``Budget.select_steps``; the rate with the best
   held-out score there goes on until its dev metric has not improved for ``Budget.patience``
   evaluations (or to ``max_steps``). Where it stops is the task's **budget**.
4. Every other method (LoRA q,v r=8; on SST-2 also r=1) trains each rate of its grid (seed 0) to the
   budget, with no patience; the rate with the best held-out score at the budget is chosen.
5. Further seeds rerun each method at its chosen rate for the budget. Asking for more seeds than a cached
   result holds adds only the missing ones: its search and runs stand.
6. ``--longer K`` (a section apart, not the issue's protocol): every method after full fine-tuning (or those
   named in ``--longer-methods``) reruns at its chosen rate, each seed, for K times the budget on a schedule K
   times as long, against full fine-tuning at its budget. It asks whether a gap at the budget is one of speed
   (the method still learning where full fine-tuning stopped) or of what it reaches.

Only full fine-tuning drops rates early (successive halving), which is what lets it fit two CPU cores: its
budget is not known until its chosen rate stops, and its steps cost about three of LoRA's. The other methods
are chosen where they are scored, at the budget: an earlier version compared them at ``select_steps`` too, and
on CoLA every LoRA rate still predicted the majority class there (MCC about 0), so the choice had nothing to go
on; trained on, the dropped rate 1e-3 reached 22.7 held-out and 15.9 dev against the chosen 3e-4's 5.8 (seed 0).
A run that goes on is exactly the run that would have gone there at once, since the schedule is fixed by
``max_steps``. The table reports each method's dev metric at the budget (mean ± std over seeds) and
checks the issue's goals against it. The rate and the schedule's lengths are numbers in the optimizer
state (:func:`optimizer`), so every run of a method shares one compilation per batch shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import count
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from experiments import assets, report
from experiments.finetune import load_model
from lora_jax import data, models, training
from lora_jax.io.atomic import write_text

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE.parent / "runs" / "glue_budget"
HELDOUT_SEED = 1234  # the held-out slice is the same for every seed and method
PROTOCOL = 2  # in every cache key: 2 chooses the methods after full FT at the budget (1: at select_steps)
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
# Every task's headline metric, computed by one shared evaluation (so its compilations serve every task).
METRICS = ("accuracy", "f1", "matthews_corrcoef")


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of fine-tuning: ``kind`` is a ``lora_jax.models.method_spec`` method; LoRA on q,v."""

    name: str
    kind: str
    rank: int = 8
    alpha: float = 16.0
    learning_rates: tuple[float, ...] = ()

    def spec(self, model: Any) -> lj.LoraSpec:
        return models.method_spec(model, self.kind, "qv", rank=self.rank, alpha=self.alpha)


FULL = Method("full FT", "full", learning_rates=(5e-5, 1.5e-4))
LORA8 = Method("LoRA qv r=8", "lora", rank=8, learning_rates=(1e-3, 3e-3))
LORA1 = Method("LoRA qv r=1", "lora", rank=1, learning_rates=(1e-3, 3e-3))


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one task trains on and how long: the sizes the issue leaves to the machine."""

    task: str
    max_length: int
    heldout: int  # training examples held out to choose learning rates
    eval_every: int
    max_steps: int  # the schedule's length and the cap on every run
    select_steps: int  # every full-FT rate trains this far; the best on held-out goes on
    patience: int = 3  # evaluations without a better full-FT dev score before it stops
    batch_size: int = 32
    train_limit: int | None = None  # train on the first N shuffled examples left after the held-out slice
    eval_limit: int | None = None  # score the first N dev examples (smoke only)
    methods: tuple[Method, ...] = (FULL, LORA8)
    model: str = "minilm"  # or "tiny": a 2-layer BERT of random weights, for the smoke test
    # Padded lengths (up to max_length): fewer than data.DEFAULT_BUCKETS, since on two loaded CPU cores one more
    # shape costs about 40 s of compilation per method, more than the padding it saves over these runs.
    buckets: tuple[int, ...] = (16, 32, 64, 96, 128)


# Sized for two loaded CPU cores (measured while other jobs ran: full FT 4.5 s a step at 32 x 64 tokens, 9.4 s at
# 32 x 128; on CoLA's short sentences about 1 s a step with evaluation, LoRA 0.7 s).
BUDGETS = {
    # CoLA: 8,551 sentences, 8,051 after the held-out slice: 251 steps an epoch.
    # LoRA's grid reaches down to 3e-4: at (1e-3, 3e-3) it stayed at the majority class (MCC 0), while head-only
    # training, whose features do not move, scored above it in glue.md.
    "cola": Budget(
        "cola",
        max_length=64,
        heldout=500,
        eval_every=60,
        max_steps=1000,
        select_steps=240,
        buckets=(16, 32, 64),
        methods=(FULL, dataclasses.replace(LORA8, learning_rates=(3e-4, 1e-3, 3e-3))),
    ),
    # RTE: 2,490 training pairs, 2,240 after the held-out slice: 70 steps an epoch. Its dev set has 277 pairs, so
    # dev accuracy moves by a point or two between evaluations: with patience 3 full fine-tuning stopped at step 175
    # (2.5 epochs; dev 53.1) while its held-out score still rose (50.8, 53.2, 54.8, 53.2, 58.0). Patience 6, up to
    # 10 epochs. Both grids reach one step further than the others: under the first protocol full FT was chosen at
    # the top of (5e-5, 1.5e-4) and LoRA at the bottom of (1e-3, 3e-3).
    "rte": Budget(
        "rte",
        max_length=128,
        heldout=250,
        eval_every=35,
        max_steps=700,
        select_steps=70,
        patience=6,
        buckets=(32, 64, 96, 128),
        methods=(
            dataclasses.replace(FULL, learning_rates=(5e-5, 1.5e-4, 4.5e-4)),
            dataclasses.replace(LORA8, learning_rates=(3e-4, 1e-3, 3e-3)),
        ),
    ),
    # SST-2: 67,349 sentences; the first 16,000 shuffled ones after the held-out slice train (500 steps an epoch).
    # On 4,000 over 500 steps full FT was still improving at the cap, while LoRA at 3e-3 fit the training set
    # (loss 0.04) and gained nothing from 3x the steps: four times the sentences, a cap of two epochs.
    "sst2": Budget(
        "sst2",
        max_length=64,
        heldout=500,
        eval_every=50,
        max_steps=1000,
        select_steps=100,
        train_limit=16000,
        buckets=(16, 32, 64),
        methods=(FULL, LORA8, LORA1),
    ),
}
SMOKE = Budget(
    "rte",
    max_length=16,
    heldout=32,
    eval_every=2,
    max_steps=8,
    select_steps=4,
    patience=1,
    batch_size=8,
    train_limit=64,
    eval_limit=32,
    methods=(
        Method("full FT", "full", learning_rates=(1e-4, 1e-3)),
        Method("LoRA qv r=8", "lora", rank=8, learning_rates=(1e-3, 1e-2)),
    ),
    model="tiny",
)


def _peak_times_schedule(learning_rate: jax.Array, warmup: jax.Array, decay: jax.Array) -> optax.GradientTransformation:
    """Scale by ``-learning_rate`` times linear warm-up over ``warmup`` steps, then linear decay over ``decay``."""

    def schedule(count: Any) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        rise = count / warmup
        fall = jnp.clip(1.0 - (count - warmup) / decay, 0.0, 1.0)
        return -learning_rate * jnp.where(count < warmup, rise, fall)

    return optax.scale_by_schedule(schedule)


def optimizer(max_steps: int, learning_rate: float = 1.0) -> optax.GradientTransformation:
    """Return AdamW on the training loop's schedule, with the rate and the schedule's lengths held in its state.

    Equal to ``optax.adamw(lora_jax.training.learning_rate_schedule(TrainConfig(max_steps, learning_rate)),
    weight_decay=WEIGHT_DECAY)``. The numbers are read from the optimizer state, so a step built with one
    rate and length runs a state made with any other: one compiled step serves every run of a method.
    """
    warmup = max(1, int(WARMUP_RATIO * max_steps))
    decay = max(1, max_steps - warmup)
    return optax.chain(
        optax.scale_by_adam(),
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.inject_hyperparams(_peak_times_schedule)(
            learning_rate=float(learning_rate), warmup=float(warmup), decay=float(decay)
        ),
    )


def subset(encoded: data.Encoded, rows: Sequence[int] | np.ndarray) -> data.Encoded:
    """Return the examples ``rows`` of ``encoded``, in that order."""
    rows = np.asarray(rows, dtype=np.int64)
    return data.Encoded(
        input_ids=tuple(encoded.input_ids[i] for i in rows),
        token_type_ids=tuple(encoded.token_type_ids[i] for i in rows),
        labels=encoded.labels[rows],
        pad_id=encoded.pad_id,
    )


def by_length(encoded: data.Encoded) -> data.Encoded:
    """Return ``encoded`` sorted by length: evaluation batches then pad little (scores ignore the order)."""
    return subset(encoded, np.argsort(encoded.lengths, kind="stable"))


def split_heldout(
    encoded: data.Encoded, heldout: int, train_limit: int | None = None
) -> tuple[data.Encoded, data.Encoded]:
    """Split a training set into (train, held-out) by a permutation fixed by :data:`HELDOUT_SEED`.

    The held-out examples are the permutation's first ``heldout`` (sorted by length); the training
    examples are the rest (the first ``train_limit`` of them, if given). The two never share an example.
    """
    if not 0 < heldout < len(encoded):
        raise ValueError(f"heldout={heldout} must leave examples on both sides of {len(encoded)}")
    permutation = np.random.default_rng(HELDOUT_SEED).permutation(len(encoded))
    rest = permutation[heldout:] if train_limit is None else permutation[heldout : heldout + train_limit]
    return subset(encoded, rest), by_length(subset(encoded, permutation[:heldout]))


@dataclasses.dataclass
class Base:
    """One model for every task: its loss and evaluation, and the compiled steps and merges of each method."""

    model: Any
    tokenizer: Any
    params_for: Callable[[int], Any]  # seed -> params, the classifier head drawn from the seed
    objective: training.Objective
    steps: dict[str, Callable] = dataclasses.field(default_factory=dict)  # method name -> jitted state step
    merges: dict[str, Callable] = dataclasses.field(default_factory=dict)

    def compiled(self, method: Method) -> tuple[Callable, Callable]:
        """Return ``method``'s jitted ``(state, params, batch) -> (state, loss)`` and merge, built once."""
        if method.name not in self.steps:
            step = training.train_step(self.objective.loss, method.spec(self.model), optimizer(1))
            self.steps[method.name] = training.state_step(step)
            self.merges[method.name] = jax.jit(lj.merge, static_argnums=2)
        return self.steps[method.name], self.merges[method.name]


def load_base(name: str) -> Base:
    """Return the packaged MiniLM (``"minilm"``), or a 2-layer BERT of random weights on its vocabulary (``"tiny"``)."""
    if name == "minilm":
        model, _, tokenizer = load_model(2, 0)

        def params_for(seed: int) -> Any:
            return load_model(2, seed)[1]

    elif name == "tiny":
        tokenizer = models.load_tokenizer(assets.minilm_path())
        config = models.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        model = models.BertForSequenceClassification(config, pooling="mean")

        def params_for(seed: int) -> Any:
            ids = jnp.zeros((1, 8), jnp.int32)
            return model.init(jax.random.key(seed), ids, jnp.ones_like(ids), jnp.zeros_like(ids))["params"]

    else:
        raise ValueError(f"unknown model {name!r}: use 'minilm' or 'tiny'")
    objective = training.classification(models.classifier_apply_fn(model), METRICS)
    return Base(model, tokenizer, params_for, objective)


@dataclasses.dataclass
class Setup:
    """One task, loaded once: its budget, data splits and headline metric, on a shared :class:`Base`."""

    budget: Budget
    base: Base
    metric: str
    train: data.Encoded
    heldout: data.Encoded
    dev: data.Encoded

    @property
    def buckets(self) -> tuple[int, ...]:
        return data.buckets_up_to(self.budget.max_length, self.budget.buckets)

    def train_batches(self, seed: int) -> Iterator[data.Batch]:
        for epoch in count():
            yield from data.batches(
                self.train, self.budget.batch_size, seed=seed, epoch=epoch, buckets=self.buckets, group=data.TRAIN_GROUP
            )

    def score(self, params: Any, encoded: data.Encoded) -> float:
        """Return the task's headline metric of ``params`` on ``encoded``, x100."""
        batches = data.batches(
            encoded, 2 * self.budget.batch_size, seed=None, buckets=self.buckets, drop_remainder=False
        )
        return 100 * self.base.objective.evaluate(params, batches)[self.metric]


def load(budget: Budget, base: Base, data_dir: Path | None = None) -> Setup:
    """Load the task's splits: training minus the held-out slice, the held-out slice, dev."""
    data_dir = data_dir or assets.glue_dir()
    kwargs = {"data_dir": data_dir, "download": data_dir is None}
    train_split = data.load_split(budget.task, "train", **kwargs)
    dev_split = data.load_split(budget.task, "validation", **kwargs)
    train_all = data.tokenize(train_split, base.tokenizer, budget.max_length)
    dev = data.tokenize(dev_split, base.tokenizer, budget.max_length)
    if budget.eval_limit is not None:
        dev = subset(dev, np.arange(min(budget.eval_limit, len(dev))))
    train, heldout = split_heldout(train_all, budget.heldout, budget.train_limit)
    return Setup(budget, base, train_split.task.metrics[0], train, heldout, by_length(dev))


def stopped(scores: Sequence[float], patience: int) -> bool:
    """Return whether the best of ``scores`` (its first occurrence) is ``patience`` or more evaluations old."""
    return bool(scores) and len(scores) - 1 - int(np.argmax(scores)) >= patience


class Run:
    """One method at one learning rate and seed, trained in stages, scoring held-out and dev as it goes.

    Stages let full fine-tuning's grid drop its losers early: every rate trains to the selection step, and
    only the chosen one goes on. A run that goes on is exactly the run that would have gone there at once.
    """

    def __init__(self, setup: Setup, method: Method, learning_rate: float, seed: int) -> None:
        self.setup, self.method, self.learning_rate, self.seed = setup, method, learning_rate, seed
        base, budget = setup.base, setup.budget
        self.params = base.params_for(seed)  # the classifier head drawn from the seed
        self.spec = method.spec(base.model)
        self.advance, self.merge = base.compiled(method)
        tx = optimizer(budget.max_steps, learning_rate)
        self.state = training.init_state(jax.random.key(seed), self.params, self.spec, tx)
        self.batches = setup.train_batches(seed)
        self.step, self.curve, self.losses = 0, [], []
        self.seconds = self.eval_seconds = 0.0
        self.started = time.perf_counter()
        self.end: str | None = None  # why it ended early: "patience" or "diverged"

    def train(self, until: int, patience: int = 0) -> Run:
        """Train on to step ``until`` (evaluating every ``eval_every`` steps and there), or until ``patience``
        evaluations without a better dev score; return self."""
        start = self.started = time.perf_counter()
        while self.step < until and self.end is None:
            self.state, loss = self.advance(self.state, self.params, next(self.batches))
            self.step += 1
            self.losses.append(loss)
            if self.step % self.setup.budget.eval_every == 0 or self.step == until:
                self.evaluate()
                if patience and stopped([p["dev"] for p in self.curve], patience):
                    self.end = "patience"
        self.seconds += time.perf_counter() - start
        return self

    def evaluate(self) -> None:
        mean_loss = float(jnp.mean(jnp.stack(self.losses)))  # waits for the queued steps: they are not evaluation
        tick = time.perf_counter()
        self.losses = []
        merged = self.merge(self.params, self.state["lora"], self.spec)
        point = {"step": self.step, "loss": mean_loss, "heldout": self.setup.score(merged, self.setup.heldout)}
        point["dev"] = self.setup.score(merged, self.setup.dev)
        self.curve.append(point)
        self.eval_seconds += time.perf_counter() - tick
        if not np.isfinite(mean_loss):
            self.end = "diverged"
        print(
            f"  {self.setup.budget.task} {self.method.name} lr={self.learning_rate:g} seed={self.seed} {point} "
            f"{self.seconds + time.perf_counter() - self.started:.0f}s",
            flush=True,
        )

    def record(self) -> dict:
        """Return ``{"method", "learning_rate", "seed", "steps", "curve": [{"step", "loss", "heldout", "dev"}],
        "end", "diverged", "seconds", "eval_seconds", "trainable"}`` (scores x100, the task's headline metric)."""
        return {
            "method": self.method.name,
            "learning_rate": self.learning_rate,
            "seed": self.seed,
            "steps": self.step,
            "curve": self.curve,
            "end": self.end,
            "diverged": self.end == "diverged",
            "seconds": self.seconds,
            "eval_seconds": self.eval_seconds,
            "trainable": lj.describe(self.params, self.spec).trainable_size,
        }


def final(run: dict, split: str = "dev") -> float:
    """The run's score on ``split`` at its last step."""
    return run["curve"][-1][split]


def heldout_at(run: dict, step: int) -> float:
    """The run's held-out score at ``step`` (its last evaluation up to there)."""
    return [p for p in run["curve"] if p["step"] <= step][-1]["heldout"]


def choose(runs: Sequence[dict], step: int) -> dict:
    """Return the run with the best held-out score at ``step`` (the lower rate on a tie); diverged runs lose."""
    return max(runs, key=lambda r: (not r["diverged"], heldout_at(r, step), -r["learning_rate"]))


def search(setup: Setup, method: Method, select: int, until: int, patience: int = 0) -> tuple[list[dict], dict]:
    """Train each of ``method``'s rates (seed 0) to step ``select``, then the best on held-out on to ``until``.

    Returns:
      Every rate's record (the losers end at ``select``) and the chosen one's.
    """
    runs = [Run(setup, method, lr, 0).train(select) for lr in method.learning_rates]
    records = [run.record() for run in runs]
    index = records.index(choose(records, select))
    for i, run in enumerate(runs):
        if i != index:
            run.state = None  # free the losers' adapters and moments
    chosen = runs[index].train(until, patience).record()
    records[index] = chosen
    return records, chosen


def setup_for(budget: Budget, bases: dict[str, Base]) -> Setup:
    """Return the task's :class:`Setup` on its base model, loading the model into ``bases`` once."""
    if budget.model not in bases:
        bases[budget.model] = load_base(budget.model)
    return load(budget, bases[budget.model])


def cache_path(cache: Path, budget: Budget, seeds: int) -> Path:
    """Return where :func:`cached_task` keeps the results of ``budget`` with ``seeds`` seeds."""
    return cache / f"{budget.task}-{task_key(budget, seeds)}.json"


def read_cached(path: Path, keys: Sequence[str] = ("task", "steps", "search", "chosen", "runs")) -> dict:
    """Return a cached result, refusing one that is not the JSON this module writes (an object with ``keys``)."""
    try:
        result = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a cached result ({err}); delete it to run the task again") from err
    if not isinstance(result, dict) or not set(keys) <= set(result):
        raise ValueError(f"{path}: not a cached result (keys missing); delete it to run the task again")
    return result


def task_key(budget: Budget, seeds: int) -> str:
    """Return the cache name of one task's results: a hash of its budget (methods and grids included) and seeds."""
    fields = {"budget": dataclasses.asdict(budget), "seeds": seeds, "protocol": PROTOCOL}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def run_task(budget: Budget, seeds: int, bases: dict[str, Base] | None = None) -> dict:
    """Run the protocol of the module docstring for one task.

    Args:
      budget: the task's sizes, methods and grids.
      seeds: runs per method at its chosen rate (seed 0 chooses).
      bases: models already loaded, shared by the tasks of one process (filled in here).

    Returns:
      ``{"task", "budget" (as a dict), "metric", "n_train", "steps" (the budget), "select" (each method's
      selection step), "search": {method: [seed-0 records, one per rate]}, "chosen": {method: record},
      "runs": {method: [the chosen rate's records, one per seed]}}``: JSON data.
    """
    setup = setup_for(budget, {} if bases is None else bases)
    full, others = budget.methods[0], budget.methods[1:]
    grid, chosen, select = {}, {}, {}
    select[full.name] = min(budget.select_steps, budget.max_steps)
    grid[full.name], chosen[full.name] = search(setup, full, select[full.name], budget.max_steps, budget.patience)
    steps = chosen[full.name]["steps"]
    for method in others:  # every rate to the budget, chosen there
        select[method.name] = steps
        grid[method.name], chosen[method.name] = search(setup, method, steps, steps)
    result = {
        "task": budget.task,
        "budget": dataclasses.asdict(budget),
        "metric": setup.metric,
        "n_train": len(setup.train),
        "steps": steps,
        "select": select,
        "search": grid,
        "chosen": chosen,
        "runs": {method.name: [chosen[method.name]] for method in budget.methods},
    }
    return add_seeds(result, budget, seeds, setup)


def add_seeds(result: dict, budget: Budget, seeds: int, setup: Setup) -> dict:
    """Return ``result`` with every method rerun at its chosen rate for the budget, for seeds up to ``seeds``.

    The runs a result already holds stay; a seed's run depends only on its seed, so extending a result
    gives what running all seeds at once gives.
    """
    runs = {}
    for method in budget.methods:
        held = result["runs"][method.name]
        lr = result["chosen"][method.name]["learning_rate"]
        more = [Run(setup, method, lr, seed).train(result["steps"]).record() for seed in range(len(held), seeds)]
        runs[method.name] = [*held, *more]
    return {**result, "runs": runs}


def cached_task(budget: Budget, seeds: int, cache: Path, bases: dict[str, Base], cached_only: bool = False) -> dict:
    """Return :func:`run_task`'s result from ``cache/<task>-<key>.json``, running (and storing) it if absent.

    Raises:
      NotCached: ``cached_only`` and the cache lacks it.
    """
    path = cache_path(cache, budget, seeds)
    if path.exists():
        return read_cached(path)
    if cached_only:
        raise NotCached(f"{path} does not exist")
    fewer = [cache_path(cache, budget, n) for n in range(seeds - 1, 0, -1)]
    found = next((f for f in fewer if f.exists()), None)
    if found is None:
        result = run_task(budget, seeds, bases)
    else:  # the same budget with fewer seeds: its search and runs stand, only the missing seeds run
        print(f"{budget.task}: adding seeds to {found}")
        result = add_seeds(read_cached(found), budget, seeds, setup_for(budget, bases))
    result = json.loads(json.dumps(result))  # as a later read gives it: lists, not tuples
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=1), overwrite=True)
    return result


class NotCached(LookupError):
    """A task's results the cache lacks, asked for with ``--cached-only``."""


def longer_runs(
    result: dict, budget: Budget, factor: int, seeds: int, setup: Setup, methods: Sequence[Method]
) -> dict[str, list[dict]]:
    """Rerun ``methods`` (of those after full fine-tuning) at their chosen rates for ``factor`` times the budget.

    The schedule, the cap and the evaluation interval stretch by ``factor`` too, so a run's warm-up and decay
    have the shape of the budget's runs; the rate is the one chosen at the budget (none is searched here).

    Returns:
      ``{method: [records, one per seed]}``.
    """
    stretched = dataclasses.replace(budget, max_steps=factor * budget.max_steps, eval_every=factor * budget.eval_every)
    setup = dataclasses.replace(setup, budget=stretched)
    runs = {}
    for method in methods:
        lr = result["chosen"][method.name]["learning_rate"]
        runs[method.name] = [
            Run(setup, method, lr, seed).train(factor * result["steps"]).record() for seed in range(seeds)
        ]
    return runs


def cached_longer(
    result: dict,
    budget: Budget,
    factor: int,
    seeds: int,
    cache: Path,
    bases: dict[str, Base],
    cached_only: bool,
    names: Sequence[str] | None = None,
) -> dict[str, list[dict]]:
    """Return :func:`longer_runs` of the methods ``names`` (default: all after full fine-tuning), from the cache.

    One file beside the task's own results holds every method run so far at this factor; the methods it lacks
    are run and added (with ``cached_only``, left out).

    Raises:
      NotCached: ``cached_only`` and the cache holds none of them.
    """
    path = cache_path(cache, budget, seeds).with_suffix(f".longer{factor}.json")
    methods = [m for m in budget.methods[1:] if names is None or m.name in names]
    held = read_cached(path, ("runs",))["runs"] if path.exists() else {}
    missing = [m for m in methods if m.name not in held]
    if missing and not cached_only:
        held = {**held, **longer_runs(result, budget, factor, seeds, setup_for(budget, bases), missing)}
        write_text(path, json.dumps({"factor": factor, "runs": held}, indent=1), overwrite=True)
    runs = {m.name: held[m.name] for m in methods if m.name in held}
    if not runs:
        raise NotCached(f"{path} holds none of {[m.name for m in methods]}")
    return runs


def longer_table(results: dict[str, dict], longer: dict[str, dict[str, list[dict]]], factor: int) -> str:
    """Each method after full fine-tuning at ``factor`` times the budget, against full fine-tuning at the budget."""
    rows = []
    for task, runs in longer.items():
        full = dev_scores(results[task], FULL.name)
        for name, records in runs.items():
            scores = np.array([final(r) for r in records])
            at_budget = dev_scores(results[task], name)
            error = difference_error(scores, full)
            rows.append(
                [
                    task,
                    name,
                    f"{records[0]['learning_rate']:g}",
                    f"{factor * results[task]['steps']} ({factor}x {results[task]['steps']})",
                    report.mean_std(scores.tolist()),
                    report.mean_std(at_budget.tolist()),
                    report.mean_std(full.tolist()),
                    f"{scores.mean() - full.mean():+.1f} "
                    + ("(one seed)" if error is None else f"(standard error {error:.1f})"),
                    f"{np.mean([final(r, 'heldout') for r in records]):.1f}",
                ]
            )
    headers = [
        "task",
        "method",
        "lr (chosen at the budget)",
        "steps",
        f"dev at {factor}x the budget",
        "dev at the budget",
        "full FT at the budget",
        f"{factor}x - full FT",
        "held-out (mean)",
    ]
    return report.markdown_table(headers, rows)


# The goals: (task, method, reference method, smallest allowed difference, metric unit).
GOALS = (
    ("sst2", "LoRA qv r=8", "full FT", -1.0, "points"),
    ("rte", "LoRA qv r=8", "full FT", -1.0, "points"),
    ("cola", "LoRA qv r=8", "full FT", -2.0, "MCC points"),
    ("sst2", "LoRA qv r=1", "LoRA qv r=8", -1.0, "points"),
)
RTE_FULL_GOAL = 60.0


def dev_scores(result: dict, method: str) -> np.ndarray:
    return np.array([final(r) for r in result["runs"][method]])


def difference_error(a: np.ndarray, b: np.ndarray) -> float | None:
    """Return the standard error of ``a.mean() - b.mean()`` (scores of independent seeds), None for a single seed.

    With a few seeds a side, it says whether a margin between two methods means anything.
    """
    if min(len(a), len(b)) < 2:
        return None
    return float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def goals(results: dict[str, dict]) -> list[str]:
    """One line per goal of the issue that these results bear on: the measured margin, met or missed."""
    lines = []
    for task, method, reference, allowed, unit in GOALS:
        if task not in results or method not in results[task]["runs"]:
            continue
        a, b = dev_scores(results[task], method), dev_scores(results[task], reference)
        diff = float(a.mean() - b.mean())
        verdict = "met" if diff >= allowed else "missed"
        error = difference_error(a, b)
        if error is not None:
            noise = f"seed std up to {max(a.std(), b.std()):.1f}; standard error of the difference {error:.1f}"
            if abs(diff - allowed) < error:
                noise += ", more than the margin: not resolved by these seeds"
        else:
            noise = "one seed: seed-to-seed spread not measured"
        lines.append(
            f"- {task}: {method} {a.mean():.1f} vs {reference} {b.mean():.1f}: difference {diff:+.1f} {unit} "
            f"(goal ≥ {allowed:+.0f}): **{verdict}** by {abs(diff - allowed):.1f} (n={len(a)}/{len(b)}; {noise})"
        )
    if "rte" in results:
        full = dev_scores(results["rte"], FULL.name)
        verdict = "met" if full.mean() >= RTE_FULL_GOAL else "missed"
        lines.append(
            f"- rte: full FT {full.mean():.1f} (goal ≥ {RTE_FULL_GOAL:.0f}): **{verdict}** by "
            f"{abs(full.mean() - RTE_FULL_GOAL):.1f} (n={len(full)})"
        )
    return lines


def table(results: dict[str, dict]) -> str:
    rows = []
    for task, result in results.items():
        epochs = result["steps"] * result["budget"]["batch_size"] / result["n_train"]
        why = "patience" if next(iter(result["chosen"].values()))["end"] == "patience" else "cap"
        for name, chosen in result["chosen"].items():
            at = result["select"][name]
            grid = ", ".join(
                f"{r['learning_rate']:g}: {heldout_at(r, at):.1f}{' (diverged)' if r['diverged'] else ''}"
                for r in result["search"][name]
            )
            rows.append(
                [
                    task,
                    name,
                    f"{chosen['learning_rate']:g}",
                    f"{grid} (step {at})",
                    f"{result['steps']} ({epochs:.1f} ep, {why})",
                    report.mean_std(dev_scores(result, name).tolist()),
                    f"{final(chosen, 'heldout'):.1f}",
                    f"{max(p['dev'] for p in chosen['curve']):.1f}",
                    f"{chosen['trainable']:,}",
                    f"{sum(r['seconds'] for r in result['search'][name]) / 60:.1f}",
                ]
            )
    headers = [
        "task",
        "method",
        "chosen lr",
        "held-out per lr at the selection step (seed 0)",
        "budget steps",
        "dev at budget (x100)",
        "held-out at budget",
        "best dev on seed 0's curve",
        "trainable",
        "minutes (seed 0, all rates)",
    ]
    return report.markdown_table(headers, rows)


def plot(path: Path, results: dict[str, dict], longer: dict[str, dict[str, list[dict]]] | None = None) -> None:
    """Learning curves: dev (solid) and held-out (dashed) of each method's chosen rate, seed 0; other rates faint;
    seed 0's dev of each ``longer`` run dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (task, result) in zip(axes[0], results.items()):
        for i, (name, chosen) in enumerate(result["chosen"].items()):
            color = f"C{i}"
            for run in result["search"][name]:
                steps = [p["step"] for p in run["curve"]]
                dev = [p["dev"] for p in run["curve"]]
                if run["learning_rate"] != chosen["learning_rate"]:
                    ax.plot(steps, dev, color=color, alpha=0.3, linewidth=1, marker=".")
                    continue
                ax.plot(steps, dev, color=color, label=f"{name} lr={run['learning_rate']:g}: dev")
                held = [p["heldout"] for p in run["curve"]]
                ax.plot(steps, held, color=color, linestyle="--", alpha=0.7, label="held-out (train slice)")
            for run in (longer or {}).get(task, {}).get(name, [])[:1]:
                steps, dev = [p["step"] for p in run["curve"]], [p["dev"] for p in run["curve"]]
                ax.plot(steps, dev, color=color, linestyle=":", marker=".", label=f"{name}, longer schedule: dev")
        ax.axvline(result["steps"], color="grey", linestyle=":", label="budget")
        ax.set_title(f"{task} ({result['metric']}); faint: the other rates")
        ax.set_xlabel("step")
        ax.set_ylabel("score x100")
        ax.legend(fontsize=7)
    fig.tight_layout()
    report.save_figure(fig, path)


def describe_budgets(results: dict[str, dict]) -> str:
    """What was run: the sizes of each task, the grids, the selection step and the seeds."""
    lines = []
    for task, result in results.items():
        b = result["budget"]
        grids = "; ".join(f"{m['name']} {', '.join(f'{lr:g}' for lr in m['learning_rates'])}" for m in b["methods"])
        limit = f" (the first {b['train_limit']:,} shuffled)" if b["train_limit"] else ""
        seeds = len(next(iter(result["runs"].values())))
        lines.append(
            f"- {task}: {result['n_train']:,} training examples{limit}, {b['heldout']:,} held out; "
            f"max_length {b['max_length']}, batch {b['batch_size']}; schedule over {b['max_steps']} steps; "
            f"evaluation every {b['eval_every']} steps; full FT's rates compared at step {b['select_steps']}, the "
            f"other methods' at the budget; full-FT patience {b['patience']} evaluations; learning rates: {grids}; "
            f"{seeds} seed(s)"
        )
    return "\n".join(lines)


def caveats(results: dict[str, dict], asked: list[str]) -> list[str]:
    """What the numbers above do not show: seeds, noise of the held-out choice, tasks not reported."""
    lines = []
    for task, result in results.items():
        seeds = len(next(iter(result["runs"].values())))
        walls = sum(r["seconds"] for runs in result["search"].values() for r in runs)
        walls += sum(r["seconds"] for runs in result["runs"].values() for r in runs[1:])
        unresolved = "; differences below the seed-to-seed spread are not resolved" if seeds < 3 else ""
        lines.append(
            f"- {task}: {seeds} seed(s){unresolved}; "
            f"held-out slice of {result['budget']['heldout']} examples, so a choice between rates scoring within a "
            f"few points of each other is itself noisy; {walls / 60:.0f} minutes of training and evaluation in all"
        )
    edges: dict[str, list[str]] = {"lowest": [], "highest": []}
    for task, result in results.items():
        for name, chosen in result["chosen"].items():
            rates = [r["learning_rate"] for r in result["search"][name]]
            if len(rates) > 1 and chosen["learning_rate"] in (min(rates), max(rates)):
                edge = "lowest" if chosen["learning_rate"] == min(rates) else "highest"
                edges[edge].append(f"{task} {name} ({chosen['learning_rate']:g})")
    for edge, chosen_there in edges.items():
        if chosen_there:
            lines.append(
                f"- Chosen at the {edge} rate of its grid (a rate beyond might do better): {'; '.join(chosen_there)}."
            )
    capped = [t for t, r in results.items() if next(iter(r["chosen"].values()))["end"] != "patience"]
    if capped:
        lines.append(
            f"- {', '.join(capped)}: full fine-tuning was still improving (by the patience rule) at max_steps, so "
            "the budget there is the cap, not a plateau."
        )
    lines.append(
        "- The budget is the step where full fine-tuning's dev metric stopped improving (as the issue asks): dev "
        "set the step count for every method, never a learning rate. The scores are the last evaluation, not "
        "the best point of a curve."
    )
    lines.append(
        "- Full fine-tuning's rates were compared at the selection step only; a rate that starts slower but ends "
        "higher can lose there."
    )
    missing = [t for t in BUDGETS if t not in results] if set(asked) <= set(BUDGETS) else []
    if missing:
        lines.append(f"- Not run here: {', '.join(missing)}; the goals on them are not measured.")
    return lines


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a seconds-scale run of the whole protocol")
    parser.add_argument("--tasks", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--cached-only", action="store_true", help="tabulate the tasks whose runs are all cached")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    parser.add_argument("--name", default=None, help="output file stem (default glue_budget, or glue_budget_smoke)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    parser.add_argument(
        "--longer",
        type=int,
        default=None,
        metavar="K",
        help="also train the methods after full FT for K times the budget, at their chosen rates (a section apart)",
    )
    parser.add_argument(
        "--longer-methods",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the methods --longer trains (default: every one after full FT), e.g. 'LoRA qv r=8'",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give 1 or more")
    if args.longer is not None and args.longer < 2:
        parser.error(f"--longer {args.longer}: give 2 or more (times the budget)")
    budgets = {"smoke": SMOKE} if args.smoke else {task: BUDGETS[task] for task in args.tasks}
    if args.longer_methods is not None:
        known = {m.name for budget in budgets.values() for m in budget.methods[1:]}
        unknown = sorted(set(args.longer_methods) - known)
        if args.longer is None or unknown:
            parser.error(
                f"--longer-methods {unknown or args.longer_methods}: give --longer K with one or more of "
                f"{sorted(known)}"
            )
    name = args.name or ("glue_budget_smoke" if args.smoke else "glue_budget")
    md, png = report.outputs(parser, args.results_dir, name, (".md", ".png"), args.overwrite)
    if not args.smoke:  # later processes reuse this one's compilations (same shapes, same rate-free programs)
        jax.config.update("jax_compilation_cache_dir", str((args.cache / "jax-compilation-cache").resolve()))
    results, bases = {}, {}
    for budget in budgets.values():
        try:
            results[budget.task] = cached_task(budget, args.seeds, args.cache, bases, args.cached_only)
        except NotCached as missing:
            print(f"{budget.task}: left out, {missing}")
            continue
    if not results:
        print("no task to report; nothing written")
        return results
    longer = {}
    for task in results if args.longer else ():
        budget = budgets["smoke" if args.smoke else task]
        try:
            longer[task] = cached_longer(
                results[task], budget, args.longer, args.seeds, args.cache, bases, args.cached_only, args.longer_methods
            )
        except NotCached as missing:
            print(f"{task}: longer runs left out, {missing}")
    sections = []
    if longer:
        sections.append(
            f"## Longer: {args.longer}x the budget\n\nThe same protocol past the issue's budget: each method below, "
            f"at the rate chosen for it at the budget, on a schedule {args.longer} times as long "
            "(warm-up and decay stretched alike); full fine-tuning stays at its budget.\n\n"
            + longer_table(results, longer, args.longer)
        )
    body = "\n\n".join(
        [
            "LoRA against full fine-tuning on MiniLM (all-MiniLM-L6-v2) at budgets set by full fine-tuning's "
            "dev curve; learning rates chosen on a held-out slice of the training set. Protocol: "
            "`experiments/glue_budget.py`'s docstring.",
            "## What was run\n\n" + describe_budgets(results),
            "## Dev at the budget\n\n" + table(results),
            "## The issue's goals\n\n" + "\n".join(goals(results)),
            f"![learning curves]({name}.png)",
            *sections,
            "## Caveats\n\n" + "\n".join(caveats(results, list(budgets))),
        ]
    )
    print(body)
    report.write_markdown(md, "GLUE at budgets set by the learning curves", body)
    plot(png, results, longer)
    return results


if __name__ == "__main__":
    main()
