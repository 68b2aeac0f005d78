"""Load one split of a task as plain Python texts and numpy labels, via the TFDS ArrayRecord builder."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lora_jax.data.builder import prepare
from lora_jax.data.tasks import Task, custom_task, get_task
from lora_jax.errors import LoraError

SPLIT_ALIASES = {"train": "train", "validation": "validation", "dev": "validation", "eval": "validation"}


@dataclasses.dataclass(frozen=True)
class Examples:
    """One split in file order: ``texts[k][i]`` is text column ``k`` of example ``i``."""

    task: Task
    split: str
    texts: tuple[tuple[str, ...], ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def task_for(
    task: str | Task,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    num_classes: int = 2,
    label_names: Sequence[str] | None = None,
) -> Task:
    """A registered task by name, or a custom one when the caller names its columns."""
    if text_columns is None and label_column is None:
        return get_task(task)
    if text_columns is None or label_column is None:
        raise LoraError("a custom task needs both text_columns and label_column")
    name = task.name if isinstance(task, Task) else task
    return custom_task(name, text_columns, label_column, num_classes, label_names)


def load_split(
    task: str | Task,
    split: str,
    data_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    num_classes: int = 2,
    label_names: Sequence[str] | None = None,
    download: bool = False,
) -> Examples:
    """Prepares (or reuses) the task under ``tfds_dir`` and returns one split in file order.

    Args:
        task: A registered name (``"sst2"``, ``"rte"``, ``"cola"``), a ``Task``, or any name
            for a custom task together with ``text_columns`` and ``label_column``.
        split: ``"train"`` or ``"validation"`` (alias ``"dev"``), read from ``train.tsv`` / ``dev.tsv``.
        data_dir: Folder with ``train.tsv`` and ``dev.tsv``, or a GLUE-style root with one folder per task.
            Required unless ``download`` is set.
        tfds_dir: Where prepared data goes; ``None`` is TFDS's default (``~/tensorflow_datasets``).
        text_columns: Header names of one or two text columns (custom tasks).
        label_column: Header name of the label column (custom tasks).
        num_classes: Number of classes of a custom task.
        label_names: Optional class names of a custom task; label fields may hold these names.
        download: Fetch a registered task's official GLUE files instead of reading local ones.

    Raises:
        LoraError: neither ``data_dir`` nor ``download`` is given, or both are; an unknown split.
        FileNotFoundError: ``data_dir`` (or a file the task needs in it) does not exist.
        DataFileError: ``path:line`` of a file that cannot be read as the task says: no data rows,
            a byte that is not UTF-8, a row with another number of fields, a label outside the classes.
    """
    spec = task_for(task, text_columns, label_column, num_classes, label_names)
    if split not in SPLIT_ALIASES:
        raise LoraError(f"unknown split {split!r}; expected one of {sorted(SPLIT_ALIASES)}")
    if download:
        if data_dir is not None:
            raise LoraError("give either data_dir or download=True, not both")
    elif data_dir is None:
        fetch = " or download=True" if spec.url is not None else ""
        raise LoraError(f"task {spec.name!r}: give data_dir, the folder with its train.tsv and dev.tsv{fetch}")
    elif not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data directory for task {spec.name!r}")
    builder = prepare(spec, data_dir, tfds_dir)
    source = builder.as_data_source(split=SPLIT_ALIASES[split])  # pyright: ignore[reportCallIssue]  (TFDS's stubs lack split)
    records = source.__getitems__(list(range(len(source))))
    # ArrayRecord files are shuffled at preparation; the stored row index restores file order.
    records = sorted(records, key=lambda r: int(r["idx"]))
    texts = tuple(tuple(r[f"text_{k}"].decode("utf-8") for r in records) for k in range(len(spec.text_columns)))
    labels = np.fromiter((int(r["label"]) for r in records), dtype=np.int32, count=len(records))
    return Examples(task=spec, split=SPLIT_ALIASES[split], texts=texts, labels=labels)
