"""The factored path: ``x W0 + s * dropout(x) A B``, never forming ``W0 + A @ B``.

``factored(fn, spec)`` turns a function of a param tree into one of ``(params, lora, *args)``. Its parts:

- ``kernel``: :class:`LowRankKernel`, the value carried for an adapted kernel (``W0``, ``A``, ``B``, axis roles).
- ``interpret``: the interpreter that re-evaluates ``fn``'s jaxpr and the ``factored`` wrapper.
- ``handlers``: one handler per primitive (``dot_general``, ``conv_general_dilated``, ``gather``, ``scan``,
  ``cond``, ``checkpoint``, ``jit``, casts and transposes) in ``DEFAULT_HANDLERS``. A new primitive is one
  added handler, passed as ``factored(fn, spec, handlers={"name": handler})``.
"""

from lora_jax.factored.handlers import DEFAULT_HANDLERS, Handler
from lora_jax.factored.interpret import Factored, Interpreter, factored, handler_table
from lora_jax.factored.kernel import LowRankKernel, low_rank_kernel

__all__ = [
    "DEFAULT_HANDLERS",
    "Factored",
    "Handler",
    "Interpreter",
    "LowRankKernel",
    "factored",
    "handler_table",
    "low_rank_kernel",
]
