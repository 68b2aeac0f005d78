"""Quantize rules for a registered family: its linear kernels in NF4 or int8, nothing else.

``quant_rules(model, "nf4")`` selects the kernels of the entry's :attr:`~lora_jax.models.registry.Architecture.linears`
in every block (attention and MLP), never embeddings, norms, biases or the task head; int8 gets a scale
per output channel from each linear's output axes (and per layer in the scanned layout).
:func:`~lora_jax.models.from_pretrained` applies them tensor by tensor while loading (``quantize="nf4"``).
"""

from __future__ import annotations

from typing import Any

from lora_jax.models.bundled import ARCHITECTURES
from lora_jax.models.presets import is_scanned, kernel_pattern
from lora_jax.models.registry import Linear, Registry
from lora_jax.quant import Format, Int8, Nf4, QuantError, as_format


def _format(fmt: Format, linear: Linear, scan: bool) -> Format:
    if isinstance(fmt, Nf4):
        return fmt
    outputs = tuple(range(-linear.out_axes, 0))
    return Int8(channel_axes=((0,) if scan else ()) + outputs)


def quant_rules(
    model_or_config: Any,
    fmt: str | Nf4 = "nf4",
    *,
    scan_layers: bool | None = None,
    registry: Registry = ARCHITECTURES,
) -> tuple[tuple[str, Format], ...]:
    """Return ``lora_jax.quant.quantize`` rules for the linear kernels of a registered module or config.

    Args:
      model_or_config: a module (its ``scan_layers`` picks the layout) or a config.
      fmt: ``"nf4"`` (or an :class:`~lora_jax.quant.Nf4` with other block sizes) or ``"int8"``; int8's
        channel axes are each kernel's output axes, read off the registry entry.
      scan_layers: the layout; defaults to the module's, else unrolled.
      registry: the families.

    Raises:
      QuantError: an unknown format, or an ``Int8(...)`` (its channel axes come from the registry: give ``"int8"``).
      ConfigError: no registered family builds the module or uses the config.
    """
    if isinstance(fmt, Int8):
        raise QuantError("quant_rules: give 'int8'; each kernel's channel axes come from the registry entry")
    chosen = as_format(fmt)
    arch = registry.of(model_or_config)
    scan = is_scanned(model_or_config, scan_layers)
    present = arch.linears_for(getattr(model_or_config, "config", model_or_config))  # this layout's kernels only
    return tuple((kernel_pattern(arch, linear, scan), _format(chosen, linear, scan)) for linear in present)
