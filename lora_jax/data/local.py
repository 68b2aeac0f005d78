"""A folder of TSV files read straight into :class:`~lora_jax.data.Examples`, with or without a header row.

:func:`~lora_jax.data.load_split` prepares a task as TFDS ArrayRecord first, which pays off for data
read many times; :func:`read_split` reads ``train.tsv`` / ``dev.tsv`` directly with the same strict
reader (:func:`~lora_jax.data.read_tsv`), for one run on a user's folder (the command line's
``train``). :func:`infer_labels` says how many classes the label column holds and whether they are
named, so the task needs no more than its column names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lora_jax.data.builder import SPLIT_FILES
from lora_jax.data.loading import SPLIT_ALIASES, Examples
from lora_jax.data.tasks import Task
from lora_jax.data.tsv import DataFileError, decode_utf8, read_tsv
from lora_jax.errors import LoraError

_INTEGER = re.compile(r"\d+")


def _lines(path: str | os.PathLike) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such data file")
    lines = decode_utf8(Path(path).read_bytes(), path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def positional_header(path: str | os.PathLike) -> tuple[str, ...]:
    """Return ``("0", "1", ...)``, one name per field of the first line: the columns of a headerless file.

    Raises:
      FileNotFoundError: no file at ``path``.
      DataFileError: the file is empty.
    """
    lines = _lines(path)
    if not lines:
        raise DataFileError(path, 1, "empty file")
    return tuple(str(i) for i in range(len(lines[0].split("\t"))))


def infer_labels(
    paths: Sequence[str | os.PathLike], label_column: str, header: Sequence[str] | None = None
) -> tuple[int, tuple[str, ...] | None]:
    """Return the classes of ``label_column`` across ``paths``: ``(num_classes, label_names)``.

    Labels that are all non-negative integers give ``(max + 1, None)``; any other labels are names,
    sorted, which give ``(len(names), names)``. The first file (``train.tsv``) sets the classes: a
    later file holding a class it lacks is refused, as are integer classes that skip a value (a typo
    such as 11 among 0 and 1 would add ten classes), a label with spaces around it, and, in files
    read without a header row, a label equal to the label column's name (a header row read as data).

    Args:
      paths: the files (e.g. ``train.tsv`` and ``dev.tsv``).
      label_column: the label column's name.
      header: the column names of headerless files; None reads each file's first line.

    Raises:
      FileNotFoundError: a file is missing.
      DataFileError: no such column, a line with too few fields, bytes that are not UTF-8, a label
        refused above, or fewer than two classes (names the file and line).
    """
    first_seen: dict[str, tuple[str | os.PathLike, int]] = {}
    for position, path in enumerate(paths):
        lines = _lines(path)
        columns = list(header) if header is not None else (lines[0].split("\t") if lines else [])
        if label_column not in columns:
            raise DataFileError(path, 1, f"no column {label_column!r} in header {columns!r}")
        index = columns.index(label_column)
        first = 1 if header is not None else 2
        for number, line in enumerate(lines[first - 1 :], start=first):
            fields = line.split("\t")
            if len(fields) != len(columns):
                raise DataFileError(path, number, f"expected {len(columns)} tab-separated fields, found {len(fields)}")
            value = fields[index]
            if value != value.strip():
                raise DataFileError(path, number, f"label {value!r} has spaces around it; remove them")
            if header is not None and value == label_column and not _INTEGER.fullmatch(value):
                raise DataFileError(
                    path, number, f"label {value!r} is the label column's name: a header row read as data"
                )
            if value not in first_seen:
                if position > 0:
                    raise DataFileError(
                        path, number, f"label {value!r} never occurs in {paths[0]}, so no example teaches it"
                    )
                first_seen[value] = (path, number)
    values = set(first_seen)
    if all(_INTEGER.fullmatch(value) for value in values):
        count = max((int(value) for value in values), default=-1) + 1
        missing = sorted(set(range(count)) - {int(value) for value in values})
        if missing:
            largest = max(values, key=int)
            raise DataFileError(
                *first_seen[largest],
                f"integer labels skip {', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''} "
                f"below {largest}: {count} classes, {count - len(missing)} of them present; correct the label",
            )
        names = None
    else:
        names = tuple(sorted(values))
        count = len(names)
    if count < 2:
        raise DataFileError(paths[0], 1, f"column {label_column!r} holds {sorted(values)}: at least two classes needed")
    return count, names


def read_split(task: Task, split: str, data_dir: str | os.PathLike, header: Sequence[str] | None = None) -> Examples:
    """Read one split of ``task`` from ``data_dir/train.tsv`` or ``data_dir/dev.tsv``, in file order.

    Args:
      task: the columns and classes (e.g. from :func:`~lora_jax.data.custom_task` and :func:`infer_labels`).
      split: ``"train"`` or ``"validation"`` (alias ``"dev"``).
      data_dir: the folder with the files.
      header: the column names of headerless files; None reads the first line as the header.

    Raises:
      LoraError: an unknown split.
      FileNotFoundError: the folder or file is missing.
      DataFileError: a line that does not fit the task (names the file and line).
    """
    if split not in SPLIT_ALIASES:
        raise LoraError(f"unknown split {split!r}; expected one of {sorted(SPLIT_ALIASES)}")
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data directory")
    split = SPLIT_ALIASES[split]
    rows = read_tsv(
        Path(data_dir) / SPLIT_FILES[split],
        task.text_columns,
        task.label_column,
        task.num_classes,
        task.label_names,
        header,
    )
    return Examples(task=task, split=split, texts=rows.texts, labels=np.asarray(rows.labels, np.int32))
