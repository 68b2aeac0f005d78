"""The error of the quantized base."""

from lora_jax.errors import LoraError


class QuantError(LoraError):
    """Quantization rules or formats that do not fit the tree: an unknown format, a non-float or 1-dim leaf."""
