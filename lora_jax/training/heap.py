"""Give the heap that compiling left behind back to the operating system.

XLA compiles on several threads, and glibc's malloc keeps what each thread freed in that thread's arena, in
the process's resident memory, until the process exits. A training step allocates its buffers afresh, so a
run's peak RSS is the step's own plus that leftover: measured here on MiniLM (batch 32 x 64, dropout off),
``malloc_trim`` after compiling lowered the peak of a LoRA step from 996 to 904 MiB and of full fine-tuning
from 1480 to 1326 MiB. :func:`lora_jax.training.fit` calls :func:`release_host_memory` after each step that
compiled (a new batch shape) and after each evaluation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_host_memory() -> bool:
    """Return the heap pages malloc holds free to the operating system; return whether any were released.

    Nothing in use is touched: only memory already freed, which malloc would otherwise keep for later
    allocations of the thread that freed it. Does nothing and returns False without glibc.
    """
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
