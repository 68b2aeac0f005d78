"""Errors raised by lora_jax; each message names the offending path and the fix."""


class LoraError(ValueError):
    """Base class for input that lora_jax cannot use."""


class SpecError(LoraError):
    """A rule does not fit the base tree: no match, bad rank, missing axes, non-float kernel."""


class AdapterMismatchError(LoraError):
    """An adapter tree whose paths, shapes or dtypes do not fit the base tree and spec."""


class NonFiniteError(LoraError):
    """A NaN or Inf where a finite number is required: an adapter to save or merge, a merged kernel, a loss."""


class CheckpointCorruptError(LoraError):
    """A file lora_jax wrote that cannot be read back: damaged, truncated or not its format."""
