"""Train adapters: the one train step, a task-agnostic loop, two objectives, and checkpoints.

- :mod:`~lora_jax.training.step`: :func:`train_step`, the step that ``jit``,
  ``shard_map`` and ``pmap`` wrap (see :mod:`lora_jax.distributed`).
- :mod:`~lora_jax.training.loop`: :func:`fit`, AdamW with warm-up and decay,
  JSON-lines log, checkpoints, exact resume; it takes the loss and evaluation.
- :mod:`~lora_jax.training.objectives`: :func:`classification` and :func:`causal_lm`.
- :mod:`~lora_jax.training.checkpoints`: :class:`Checkpoints`, orbax with the spec signature.
- :mod:`~lora_jax.training.metrics`: accuracy, F1, MCC on numpy predictions.
- :mod:`~lora_jax.training.heap`: :func:`release_host_memory`, the heap compiling left, back to the OS.

orbax and tqdm are imported when a checkpoint is opened or a loop runs, not here.
"""

from lora_jax.training.checkpoints import Checkpoints, signature_differences
from lora_jax.training.heap import release_host_memory
from lora_jax.training.loop import (
    TrainConfig,
    fit,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    state_step,
    steps_for,
)
from lora_jax.training.metrics import METRICS, compute_metrics
from lora_jax.training.objectives import (
    Objective,
    causal_lm,
    causal_lm_loss,
    chunked_next_token_nll,
    classification,
    classification_loss,
    completion_mask,
    next_token_nll,
)
from lora_jax.training.step import LossFn, TrainStep, train_step

__all__ = [
    "METRICS",
    "Checkpoints",
    "LossFn",
    "Objective",
    "TrainConfig",
    "TrainStep",
    "causal_lm",
    "causal_lm_loss",
    "chunked_next_token_nll",
    "classification",
    "classification_loss",
    "completion_mask",
    "compute_metrics",
    "fit",
    "init_state",
    "learning_rate_schedule",
    "make_optimizer",
    "next_token_nll",
    "release_host_memory",
    "signature_differences",
    "state_step",
    "steps_for",
    "train_step",
]
