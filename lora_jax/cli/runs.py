"""A run directory of ``lora-jax train``: what is in it, and whether a new invocation may continue it.

    RUN_DIR/run.json             the arguments, data digests, labels, model options, status and scores
    RUN_DIR/adapter.safetensors  the trained adapter (self-describing), written at the end
    RUN_DIR/checkpoints/         orbax training state, for resuming (lora_jax.training.Checkpoints)
    RUN_DIR/log.jsonl            the loop's records, appended

``run.json`` is written before training starts, so a directory with checkpoints always says which
arguments made them. An invocation with the same arguments on the same data resumes; one with other
arguments, or on changed data, is refused with what differs, unless ``--overwrite`` starts afresh; an
attempt that stopped before its first checkpoint (a wrong path, say) leaves nothing to protect and is replaced,
while a finished run whose checkpoints were removed is kept (its adapter is the result).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from lora_jax.cli.common import RUN_FILE, run_record
from lora_jax.errors import LoraError
from lora_jax.io.atomic import write_text

ADAPTER_FILE = "adapter.safetensors"
CHECKPOINTS = "checkpoints"
LOG_FILE = "log.jsonl"
OWNED = (RUN_FILE, ADAPTER_FILE, CHECKPOINTS, LOG_FILE)
_SHOWN = 4  # differences named in a refusal


def digest(path: Path) -> str:
    """Return the SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flag(name: str) -> str:
    return name.upper() if name in ("model_dir", "data_dir") else "--" + name.replace("_", "-")


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Return one phrase per argument that differs, e.g. ``--rank 4 then, 8 now``."""
    return [
        f"{_flag(name)} {json.dumps(saved.get(name))} then, {json.dumps(now.get(name))} now"
        for name in sorted(set(saved) | set(now))
        if saved.get(name) != now.get(name)
    ]


def clear(run_dir: Path) -> None:
    """Remove what a run wrote in ``run_dir`` (:data:`OWNED`), and nothing else."""
    for name in OWNED:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def open_run(run_dir: Path, arguments: dict[str, Any], data: dict[str, str], overwrite: bool) -> dict[str, Any]:
    """Check that a run with ``arguments`` on files with digests ``data`` may use ``run_dir``.

    Args:
      run_dir: the run directory (``--out``).
      arguments: the arguments that decide the result.
      data: file name -> :func:`digest` of the data files.
      overwrite: start afresh: remove an earlier run's files first.

    Returns:
      The earlier run's ``run.json`` when this one continues it (it has checkpoints), else ``{}``.

    Raises:
      FileExistsError: ``run_dir`` is a file, or a directory with files but no ``run.json``.
      LoraError: an earlier run there had other arguments or data (names what differs), or finished and has
        no checkpoints left.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file; --out names a run directory")
    if overwrite:
        clear(run_dir)
        return {}
    record = run_record(run_dir / ADAPTER_FILE)
    checkpoints = run_dir / CHECKPOINTS
    if record and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        if record.get("status") == "started" and not (run_dir / ADAPTER_FILE).exists():
            clear(run_dir)  # an attempt that stopped before its first checkpoint: nothing to resume or to lose
            return {}
        raise LoraError(
            f"{run_dir}: the run there finished ({ADAPTER_FILE}) and its {CHECKPOINTS}/ is gone, so it can be "
            "neither resumed nor replaced unasked; choose another --out, or pass --overwrite to start afresh"
        )
    if not record:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise FileExistsError(
                f"{run_dir} exists and holds no {RUN_FILE}, so it is not a run of lora-jax train; "
                "choose another --out or pass --overwrite"
            )
        return {}
    changed = differences(record.get("arguments", {}), arguments)
    changed += [f"{name} changed" for name in sorted(data) if record.get("data", {}).get(name) != data[name]]
    if changed:
        shown = "; ".join(changed[:_SHOWN]) + (f"; and {len(changed) - _SHOWN} more" if len(changed) > _SHOWN else "")
        raise LoraError(
            f"{run_dir / RUN_FILE}: the run there was started differently ({shown}); run with its arguments to "
            "resume it, choose another --out, or pass --overwrite to start afresh"
        )
    return record


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``run_dir/run.json`` (atomically; the directory is created)."""
    write_text(run_dir / RUN_FILE, json.dumps(record, indent=2) + "\n", overwrite=True)
