"""Train adapters: the one train step, a task-agnostic loop, two tasks, and checkpoints."""

from lora_jax.training.step import LossFn, TrainStep, train_step

__all__ = ["LossFn", "TrainStep", "train_step"]
