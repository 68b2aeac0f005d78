"""The one way lora_jax writes a file: complete or not at all, and never over a user's file unless asked.

The content goes to a temporary file in the target's directory, which then
replaces the target in one ``os.replace``; a failure at any point leaves the
previous file, if any, as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from lora_jax.typing import PathLike


def refuse_existing(paths: Iterable[PathLike], overwrite: bool) -> None:
    """Raise ``FileExistsError`` naming the first of ``paths`` that exists, unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def write_atomic(path: PathLike, write: Callable[[str], object], *, overwrite: bool = False) -> Path:
    """Write ``path`` through ``write(temporary_path)``, then move the result into place.

    Args:
      path: the file to write; its directory is created if missing.
      write: writes the complete content to the path it is given.
      overwrite: replace an existing file; otherwise an existing file is an error.

    Returns:
      ``path`` as a ``Path``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    refuse_existing([path], overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path: PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def write_bytes(path: PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; see :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)
