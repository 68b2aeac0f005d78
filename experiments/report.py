"""Shared by the experiment scripts: machine/version header, markdown tables, plots."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lora_jax.io.atomic import write_atomic, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def refuse_existing(parser: argparse.ArgumentParser, paths: Iterable[Path], overwrite: bool) -> None:
    """Exit with a usage error naming the first of ``paths`` that exists, unless ``overwrite`` (``--overwrite``).

    Called before any work, so that a run never ends by failing to save, nor replaces a user's file unasked.
    """
    for path in paths:
        if path.exists() and not overwrite:
            parser.error(f"{path} exists; pass --overwrite to replace it, or choose another output")


def outputs(
    parser: argparse.ArgumentParser, directory: Path, name: str, suffixes: Sequence[str], overwrite: bool
) -> list[Path]:
    """Return ``directory / (name + suffix)`` for each of ``suffixes``, refusing existing ones first.

    An experiment calls this right after parsing its arguments: see :func:`refuse_existing`.
    """
    paths = [directory / f"{name}{suffix}" for suffix in suffixes]
    refuse_existing(parser, paths, overwrite)
    return paths


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as a PNG atomically (replacing ``path``; callers refuse it first), then close it."""
    import matplotlib.pyplot as plt

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), overwrite=True)
    plt.close(fig)
    return path


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: Linux's ``VmHWM``, else ``ru_maxrss``.

    ``VmHWM`` starts afresh when a process execs; ``ru_maxrss`` keeps the high-water mark of the process that
    forked it, so a worker spawned by a process that had grown larger would report its parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> str:
    """One line naming the machine and the versions that shape the numbers."""
    import flax
    import jax
    import jaxlib
    import optax

    devices = jax.devices()
    kind = f"{len(devices)} x {devices[0].device_kind}"
    return (
        f"{platform.machine()} {os.cpu_count()} CPU cores, {kind}; Python {sys.version.split()[0]}, "
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, optax {optax.__version__}; "
        f"{datetime.date.today().isoformat()}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> str:
    """``"mean ± std (n=k)"`` to one decimal: a metric over seeds."""
    return f"{np.mean(values):.1f} ± {np.std(values):.1f} (n={len(values)})"


def write_markdown(path: Path, title: str, body: str) -> Path:
    """Write ``# title``, the environment line and ``body`` to ``path`` (atomically, replacing it).

    Raises:
      ValueError: ``body`` holds the environment line already (it would appear twice).
    """
    line = environment()
    if line in body:
        raise ValueError(f"{path}: the body repeats the environment line, which write_markdown adds; leave it out")
    return write_text(path, f"# {title}\n\n{line}\n\n{body.rstrip()}\n", overwrite=True)


def plot_lines(path: Path, series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str) -> Path:
    """Save one line per series as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
