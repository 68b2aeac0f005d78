"""Whether XLA runs a recomputation late enough to save memory: on every backend but XLA:CPU's default scheduler."""

from __future__ import annotations

import os

import jax

MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
"""The ``XLA_FLAGS`` entry under which recomputation (``remat=``, a quantized base dequantized again) saves memory
on CPU.

XLA:CPU orders ops for concurrency by default and then runs a recomputation as early as the forward pass it
repeats, which keeps what it was meant to free live (``experiments/results/bench_remat.md``). The flag is read when
the backend starts: set it in the environment before JAX first runs; ``jax.jit``'s ``compiler_options`` accept it
but do not change the order."""


def recomputation_saves_memory() -> bool:
    """Return whether the default backend schedules a recomputation for the backward pass where it is needed.

    True on GPU and TPU, and on CPU when ``XLA_FLAGS`` holds :data:`MEMORY_SCHEDULER_FLAG`.
    """
    return jax.default_backend() != "cpu" or MEMORY_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", "")
