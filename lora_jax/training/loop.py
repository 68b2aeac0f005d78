"""A small training loop for any task: AdamW with warm-up and decay, JSON-lines log, checkpoints, exact resume.

The loop knows nothing of labels or predictions: it takes the loss
(``loss_fn(params, batch, rng) -> scalar``) and, to report scores, an
evaluation (``evaluate(params, batches) -> {name: value}``), such as the two
objectives of :mod:`lora_jax.training.objectives`. Methods differ only in their spec:
LoRA rules, ``lj.trainable(".*")`` for full fine-tuning,
``lj.trainable(".*bias")`` for BitFit, the head alone for head-only.

The state is ``{"lora", "opt_state", "step", "rng"}``; the base params stay
outside it, frozen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax._extras import require
from lora_jax.adapters import check_fits
from lora_jax.errors import LoraError, NonFiniteError
from lora_jax.finite import nonfinite_paths
from lora_jax.initializers import init
from lora_jax.merge import merge
from lora_jax.plan import plan
from lora_jax.prng import unrolled
from lora_jax.spec import LoraSpec
from lora_jax.training.checkpoints import Checkpoints
from lora_jax.training.heap import release_host_memory
from lora_jax.training.objectives import Batch, Evaluate
from lora_jax.training.step import LossFn, TrainStep, train_step
from lora_jax.typing import PathLike, PyTree

Batches = Callable[[int], Iterable[Batch]]
"""``epoch -> batches``: the same batches in the same order for the same epoch, every time."""

NONFINITE_POLICIES = ("stop", "warn")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe (AdamW, linear warm-up, then linear decay to zero) and the loop's cadence."""

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
    # A NaN or Inf loss: "stop" raises NonFiniteError naming the step; "warn" warns once and trains on.
    # Either way no checkpoint is written of adapters that hold NaN or Inf.
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise LoraError(
                f"TrainConfig.on_nonfinite={self.on_nonfinite!r}: use one of {', '.join(map(repr, NONFINITE_POLICIES))}"
            )
        counts = {"steps": 1, "log_every": 1, "keep_checkpoints": 1, "eval_every": 0, "checkpoint_every": 0, "seed": 0}
        for name, least in counts.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise LoraError(f"TrainConfig.{name}={value!r}: must be an integer of at least {least}")
        ranges = {"learning_rate": (0.0, False), "weight_decay": (0.0, True), "warmup_ratio": (0.0, True)}
        for name, (least, inclusive) in ranges.items():
            value = getattr(self, name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < least or (value == least and not inclusive):
                bound = f"at least {least:g}" if inclusive else f"above {least:g}"
                raise LoraError(f"TrainConfig.{name}={value!r}: must be a finite number {bound}")
        if self.warmup_ratio >= 1:
            raise LoraError(f"TrainConfig.warmup_ratio={self.warmup_ratio!r}: must be below 1 (a share of the steps)")


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Return linear warm-up from 0 over ``warmup_ratio * steps``, then linear decay to 0 at ``steps``."""
    warmup = max(1, int(config.warmup_ratio * config.steps))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, warmup),
            optax.linear_schedule(config.learning_rate, 0.0, max(1, config.steps - warmup)),
        ],
        [warmup],
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Return AdamW on :func:`learning_rate_schedule` with ``config.weight_decay``."""
    return optax.adamw(learning_rate_schedule(config), weight_decay=config.weight_decay)


def init_state(
    key: jax.Array, params: PyTree, spec: LoraSpec, tx: optax.GradientTransformation, lora: PyTree | None = None
) -> dict:
    """Return a fresh state: adapters (``B = 0``, or ``lora``), optimizer state, step 0, an RNG.

    Args:
      key: splits into the adapters' init key and the state's RNG (the same RNG with or without ``lora``).
      params: the frozen base tree.
      spec: the rules.
      tx: the optimizer whose state is initialised.
      lora: adapters to start from instead of :func:`lora_jax.init`'s (e.g. :func:`lora_jax.pissa_init`'s).

    Raises:
      AdapterMismatchError: ``lora`` does not fit ``params`` and ``spec`` (names the leaf).
    """
    init_key, rng = jax.random.split(key)
    start: PyTree
    if lora is None:
        start = init(init_key, params, spec)
    else:
        check_fits(plan(params, spec), lora)
        # A copy: the step donates the state, and the caller may still need these (pissa_to_lora reads them).
        start = jax.tree_util.tree_map(jnp.array, lora)
    return {
        "lora": start,
        "opt_state": tx.init(start),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(rng),
    }


def state_step(step: TrainStep) -> Callable[[dict, PyTree, Batch], tuple[dict, jax.Array]]:
    """Thread :func:`init_state`'s state through ``step``: ``(state, params, batch) -> (state, loss)``, jitted.

    Each call draws a fresh key from the state's RNG, so a resumed run draws
    the keys an unbroken one would. The state passed in is donated.
    """

    def advance(state: dict, params: PyTree, batch: Batch) -> tuple[dict, jax.Array]:
        rng, step_rng = jax.random.split(unrolled(jax.random.wrap_key_data(state["rng"])))
        lora, opt_state, loss = step(params, state["lora"], state["opt_state"], batch, step_rng)
        new_state = {"lora": lora, "opt_state": opt_state, "step": state["step"] + 1, "rng": jax.random.key_data(rng)}
        return new_state, loss

    return jax.jit(advance, donate_argnums=0)


def _epoch_batches(train_batches: Batches, steps_per_epoch: int, start: int) -> Iterator[Batch]:
    """Yield batches from global step ``start`` on, epoch after epoch (the order of an unbroken run)."""
    epoch, skip = divmod(start, steps_per_epoch)
    while True:
        for i, batch in enumerate(train_batches(epoch)):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def _rows(batch: Batch) -> int:
    return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


class _Divergence:
    """The non-finite policy of one run: stop (raise) or warn at the first NaN/Inf loss; never save NaN adapters.

    Args:
      config: gives ``on_nonfinite`` and the learning rate the message names.
      checkpoints: the run's checkpoints, or None; the message names the newest one.
      log_path: the run's log, or None; the message names it.
      record: writes a log record; a stopped run records the step it stopped at.
    """

    def __init__(
        self,
        config: TrainConfig,
        checkpoints: Checkpoints | None,
        log_path: PathLike | None,
        record: Callable[[dict], None],
    ) -> None:
        self.config, self.checkpoints, self.log_path, self.record = config, checkpoints, log_path, record
        self.warned = self.skipped = False  # warn mode: each kind of warning is given once

    def _where(self) -> str:
        parts = []
        if self.checkpoints is not None:
            latest = self.checkpoints.latest_step()
            newest = f"newest checkpoint: step {latest}" if latest is not None else "no checkpoint written"
            parts.append(f"checkpoints in {self.checkpoints.directory} ({newest})")
        if self.log_path is not None:
            parts.append(f"log {self.log_path}")
        return f" [{'; '.join(parts)}]" if parts else ""

    def _fix(self) -> str:
        return (
            f"lower the learning rate (now {self.config.learning_rate:g}), check the data of that step for "
            "NaN/Inf or extreme values, or pass TrainConfig(on_nonfinite='warn') to train on regardless"
        )

    def loss(self, step: int, loss: jax.Array | float) -> bool:
        """Return whether ``loss`` (of step ``step``) is finite; if not, raise (stop) or warn once (warn).

        Raises:
          NonFiniteError: the loss is NaN or Inf and the policy is "stop".
        """
        value = float(loss)
        if math.isfinite(value):
            return True
        message = f"the training loss of step {step} is {value}: the run diverged{self._where()}"
        if self.config.on_nonfinite == "stop":
            self.record({"step": step, "split": "train", "loss": value, "stopped": "non-finite loss"})
            raise NonFiniteError(f"{message}; stopped without checkpointing it; {self._fix()}")
        if not self.warned:
            warnings.warn(f"{message}; training on (on_nonfinite='warn')", stacklevel=3)
            self.warned = True
        return False

    def savable(self, step: int, lora: PyTree) -> bool:
        """Return whether the adapters after step ``step`` may be checkpointed: all their leaves finite.

        Raises:
          NonFiniteError: a leaf holds NaN or Inf and the policy is "stop".
        """
        bad = nonfinite_paths(lora)
        if not bad:
            return True
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        message = f"after step {step} adapter leaf {bad[0]}{more} holds NaN or Inf{self._where()}"
        if self.config.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}; stopped without checkpointing it; {self._fix()}")
        if not self.skipped:
            warnings.warn(f"{message}; not checkpointed, nor any later such state (on_nonfinite='warn')", stacklevel=3)
            self.skipped = True
        return False


def fit(
    loss_fn: LossFn,
    params: PyTree,
    spec: LoraSpec,
    config: TrainConfig,
    train_batches: Batches,
    steps_per_epoch: int,
    *,
    evaluate: Evaluate | None = None,
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    checkpoint_dir: PathLike | None = None,
    log_path: PathLike | None = None,
    progress: bool = True,
    lora: PyTree | None = None,
    tx: optax.GradientTransformation | None = None,
) -> tuple[dict, list[dict]]:
    """Train ``spec``'s trainable leaves for ``config.steps`` steps; resume if checkpoints exist.

    Args:
      loss_fn: ``(params, batch, rng | None) -> scalar``, a function of a
        plain param tree (e.g. ``lora_jax.training.objectives.classification(apply_fn).loss``).
      params: the frozen base tree.
      spec: which leaves train and how.
      config: optimizer, schedule, logging and checkpoint settings.
      train_batches: ``epoch -> batches``, the same for the same epoch every
        time (so a resumed run sees what an unbroken one would).
      steps_per_epoch: how many batches ``train_batches(epoch)`` yields.
      evaluate: ``(params, batches) -> {name: value}``, run on the merged tree
        every ``config.eval_every`` steps and at the end; with ``eval_batches``.
      eval_batches: ``() -> batches`` for ``evaluate``.
      checkpoint_dir: orbax checkpoints of the state (kept: the last
        ``config.keep_checkpoints``), each with the spec signature; a run
        restarted with the same directory resumes from the newest, and one
        with another spec raises :class:`lora_jax.AdapterMismatchError`.
      log_path: records as JSON lines (appended).
      progress: show a progress bar.
      lora: the adapters to start from (e.g. :func:`lora_jax.pissa_init`'s); default :func:`lora_jax.init`'s.
        A resumed run starts from its checkpoint instead.
      tx: the optimizer (e.g. :func:`lora_jax.lora_plus` on :func:`learning_rate_schedule`); default
        :func:`make_optimizer` of ``config``, whose learning rate and weight decay a given ``tx`` does not read.

    Returns:
      The final state ``{"lora", "opt_state", "step", "rng"}`` and the logged
      records: ``{"step", "split": "train", "loss", "examples_per_s"}`` every
      ``config.log_every`` steps, ``{"step", "split": "eval", **scores}`` per evaluation.

    Raises:
      NonFiniteError: with ``config.on_nonfinite="stop"`` (the default), the
        first NaN/Inf loss, naming its step, the checkpoint directory and the
        log; the newest checkpoint is the last finite state. No checkpoint ever
        holds NaN or Inf adapters ("warn" skips such a save with a warning).
      AdapterMismatchError: ``checkpoint_dir`` was written for another spec or base, or ``lora`` does not fit.
      CheckpointCorruptError: ``checkpoint_dir`` holds a damaged checkpoint.
    """
    tqdm = require("tqdm", "train").tqdm  # the progress bar is the loop's only use of it

    if (evaluate is None) != (eval_batches is None):
        raise LoraError("fit: pass evaluate= and eval_batches= together, or neither")
    tx = make_optimizer(config) if tx is None else tx
    state = init_state(jax.random.key(config.seed), params, spec, tx, lora)
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = Checkpoints(checkpoint_dir, params, spec, keep=config.keep_checkpoints)
    log = open(log_path, "a") if log_path is not None else None  # noqa: SIM115 - closed below
    records: list[dict] = []

    def record(entry: dict) -> None:
        records.append(entry)
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    def run_eval(step: int) -> None:
        if evaluate is not None and eval_batches is not None:
            merged = jax.jit(merge, static_argnums=2)(params, state["lora"], spec)
            record({"step": step, "split": "eval", **evaluate(merged, eval_batches())})
            release_host_memory()  # what compiling the evaluation left

    try:
        if checkpoints is not None:
            restored = checkpoints.restore_latest(state)
            state = restored if restored is not None else state
        advance = state_step(train_step(loss_fn, spec, tx, factored=config.factored))
        divergence = _Divergence(config, checkpoints, log_path, record)
        start = int(state["step"])
        if checkpoints is not None and start > config.steps:
            raise LoraError(
                f"{checkpoints.directory}: its newest checkpoint is at step {start}, past this run's "
                f"{config.steps} steps; set steps >= {start} to resume it, or train into a new checkpoint directory"
            )
        batches = _epoch_batches(train_batches, steps_per_epoch, start)
        bar = tqdm(total=config.steps, initial=start, disable=not progress, mininterval=1.0, desc="train")
        window_loss, window_examples, window_start = [], 0, time.perf_counter()
        # Each loss is checked one step late: once step s is dispatched, reading the loss of step s-1 waits for s-1
        # only, while s keeps the device busy; reading step s's own loss at once would leave an accelerator idle
        # while the host prepares every next step. Measured on 2 CPU cores (tiny BERT, ~1.2 ms a step): no check,
        # this check and a read of every step's own loss all cost the same within noise. The stop comes one step
        # late and names the first bad step; log and checkpoint steps read their own loss, fetched anyway.
        unchecked: tuple[int, jax.Array] | None = None
        compiled: set[tuple] = set()  # batch shapes the step has compiled for
        for step in range(start + 1, config.steps + 1):
            batch = next(batches)
            state, loss = advance(state, params, batch)
            shapes = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(batch))
            if shapes not in compiled:  # this step compiled: hand back the heap the compiler freed
                compiled.add(shapes)
                release_host_memory()
            if unchecked is not None:
                divergence.loss(*unchecked)
            unchecked = (step, loss)
            window_loss.append(loss)
            window_examples += _rows(batch)
            if step % config.log_every == 0 or step == config.steps:
                values = [float(x) for x in window_loss]
                divergence.loss(step, values[-1])
                unchecked = None
                mean = float(np.mean(values))
                rate = window_examples / max(time.perf_counter() - window_start, 1e-9)
                record({"step": step, "split": "train", "loss": mean, "examples_per_s": rate})
                bar.set_postfix(loss=f"{mean:.4f}", ex_s=f"{rate:.0f}")
                window_loss, window_examples, window_start = [], 0, time.perf_counter()
            bar.update(1)
            if checkpoints is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                if unchecked is not None:
                    divergence.loss(*unchecked)
                    unchecked = None
                if divergence.savable(step, state["lora"]):
                    checkpoints.save(step, state)
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                run_eval(step)
        bar.close()
        if checkpoints is not None and divergence.savable(config.steps, state["lora"]):
            checkpoints.save(config.steps, state)
        run_eval(config.steps)
    finally:
        if log is not None:
            log.close()
        if checkpoints is not None:
            checkpoints.close()
    return state, records


def steps_for(examples: int, batch_size: int, epochs: float) -> int:
    """Return the number of optimizer steps for ``epochs`` passes over ``examples``."""
    return max(1, math.ceil(epochs * (examples // batch_size)))
