"""Run fine-tuning configurations once each, in their own processes, and cache what they measured.

A run's directory under the cache is named by a hash of its :class:`RunConfig`,
so experiments that share a configuration (the GLUE grid, the rank sweep and
the subspace study all train LoRA qv r=8 on SST-2) train it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from experiments.finetune import RunConfig

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE.parent / "runs" / "cache"


def run_dir(config: RunConfig, cache: Path) -> Path:
    # Resolved, so that changing a method's default learning rate changes the key.
    key = json.dumps(dataclasses.asdict(config.with_defaults()), sort_keys=True)
    return cache / hashlib.sha256(key.encode()).hexdigest()[:16]


def run_cached(config: RunConfig, cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """The summary of ``config``'s run, training it first if the cache lacks it."""
    out = run_dir(config, cache)
    summary = out / "summary.json"
    if not summary.exists():
        command = [
            sys.executable,
            "-m",
            "experiments.finetune",
            "--config",
            json.dumps(dataclasses.asdict(config)),
            "--out",
            str(out.resolve()),  # the run's process starts in the repository root
            "--overwrite",  # a run directory without summary.json is this cache's own, left by an interrupted run
        ]
        # Runs of one grid share shapes: a persistent compilation cache spares most of each run's compile time.
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache.resolve() / "jax-compilation-cache")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent)
        if done.returncode != 0:
            raise RuntimeError(f"run {config} failed:\n{done.stderr[-4000:]}")
    result = json.loads(summary.read_text())
    result["dir"] = str(out)
    return result


def run_all(
    configs: list[RunConfig], cache: Path = DEFAULT_CACHE, desc: str = "runs", cached_only: bool = False
) -> list[dict[str, Any]]:
    """Summaries of ``configs`` in order; ``cached_only`` skips (and does not train) what the cache lacks."""
    results = []
    with tqdm(configs, desc=desc) as bar:
        for config in bar:
            if cached_only and not (run_dir(config, cache) / "summary.json").exists():
                continue
            bar.set_postfix_str(f"{config.task} {config.method} {config.targets} r{config.rank} s{config.seed}")
            results.append(run_cached(config, cache))
    return results


def group(results: list[dict[str, Any]], *fields: str) -> dict[tuple, list[dict[str, Any]]]:
    """Runs keyed by the values of the named config ``fields``, in first-seen order (seeds fall together)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(tuple(r["config"][f] for f in fields), []).append(r)
    return groups
