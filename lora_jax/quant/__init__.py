"""A quantized frozen base (QLoRA): kernels stored in NF4 or int8, dequantized where they are used.

    qparams = lora_jax.quant.quantize(params, [(r".*/kernel", "nf4")])
    lora = lora_jax.init(key, qparams, spec)
    step = lora_jax.training.train_step(loss_fn, spec, tx)      # factored or combine, on qparams
    serving = lora_jax.merge(qparams, lora, spec, dtype=jnp.bfloat16)   # a plain tree
    lora_jax.quant.nbytes(qparams) / lora_jax.quant.nbytes(params)

- ``array``: :class:`QuantizedArray`, the pytree node that stands for one array; :func:`as_array`, where
  a quantized leaf is read as an array; :func:`recompute_dequantized`, the ``jax.checkpoint`` policy under
  which the backward pass dequantizes those again instead of keeping them (the factored path applies it by
  itself).
- ``product``: :func:`~lora_jax.quant.product.quantized_dot`, the factored path's product of an activation
  and a quantized kernel: it keeps the codes for the backward pass and dequantizes next to the product in each
  pass.
- ``nf4``: :class:`Nf4` (blocks of 64, the 16 NormalFloat levels, block absmax double-quantized to 8 bits
  in blocks of 256, as bitsandbytes) and :class:`Nf4Array`.
- ``int8``: :class:`Int8` (symmetric, a scale per output channel) and :class:`Int8Array`.
- ``tree``: :func:`quantize`, :func:`dequantize`, :func:`nbytes` on whole param trees.

Needs jax and numpy only, like the core.
"""

from lora_jax.quant.array import QuantizedArray, as_array, is_quantized, recompute_dequantized
from lora_jax.quant.errors import QuantError
from lora_jax.quant.int8 import Int8, Int8Array
from lora_jax.quant.nf4 import NF4_LEVELS, Nf4, Nf4Array, absmax_code
from lora_jax.quant.tree import FORMATS, Format, QuantRules, as_format, dequantize, nbytes, quantize, quantize_array

__all__ = [
    "FORMATS",
    "NF4_LEVELS",
    "Format",
    "Int8",
    "Int8Array",
    "Nf4",
    "Nf4Array",
    "QuantError",
    "QuantRules",
    "QuantizedArray",
    "absmax_code",
    "as_array",
    "as_format",
    "dequantize",
    "is_quantized",
    "nbytes",
    "quantize",
    "quantize_array",
    "recompute_dequantized",
]
