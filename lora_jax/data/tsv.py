"""Strict reader for tab-separated classification files (split on tab only, no CSV quoting)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from lora_jax.errors import LoraError


class DataFileError(LoraError):
    """A data file that cannot be read as the task describes; the message starts with ``path:line:``."""

    def __init__(self, path: str | os.PathLike, line: int, message: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        super().__init__(f"{self.path}:{line}: {message}")


@dataclasses.dataclass(frozen=True)
class Rows:
    """Parsed rows of one file: ``texts[k][i]`` is text column ``k`` of row ``i``; ``lines[i]`` its line number."""

    texts: tuple[tuple[str, ...], ...]
    labels: tuple[int, ...]
    lines: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)


def _column_index(header: Sequence[str], name: str, path: str | os.PathLike, line: int) -> int:
    columns = list(header)
    if name not in columns:
        raise DataFileError(path, line, f"no column {name!r} in header {columns!r}; name the task's columns there")
    if columns.count(name) > 1:
        times = columns.count(name)
        raise DataFileError(path, line, f"column {name!r} appears {times} times in the header; rename all but one")
    return columns.index(name)


def _parse_label(field: str, num_classes: int, label_names: Sequence[str] | None) -> int | None:
    if label_names is not None and field in label_names:
        return list(label_names).index(field)
    try:
        value = int(field)
    except ValueError:
        return None
    return value if 0 <= value < num_classes else None


def parse_tsv(
    content: str,
    path: str | os.PathLike,
    text_columns: Sequence[str],
    label_column: str,
    num_classes: int = 2,
    label_names: Sequence[str] | None = None,
    header: Sequence[str] | None = None,
) -> Rows:
    """Parse the text of a TSV file; ``path`` only names the file in errors.

    The first line is the header unless ``header`` gives the column names of a headerless file.
    Every data line must have exactly as many tab-separated fields as the header, and a label
    that is an integer in ``[0, num_classes)`` (or one of ``label_names``). A file must hold at
    least one data row.

    Raises:
      DataFileError: naming ``path:line`` and what to fix.
    """
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.removesuffix("\r") for line in lines]
    first_data_line = 1
    if header is None:
        if not lines:
            raise DataFileError(path, 1, "empty file; expected a header row")
        header = lines[0].split("\t")
        first_data_line = 2
    # A header given by the caller stands in for line 1.
    text_idx = [_column_index(header, name, path, 1) for name in text_columns]
    label_idx = _column_index(header, label_column, path, 1)
    if len(lines) < first_data_line:
        after = "after the header " if first_data_line == 2 else ""
        raise DataFileError(path, len(lines) + 1, f"no data rows {after}(the file ends here); add rows")
    texts: list[list[str]] = [[] for _ in text_columns]
    labels: list[int] = []
    numbers: list[int] = []
    for number, line in enumerate(lines[first_data_line - 1 :], start=first_data_line):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataFileError(path, number, f"expected {len(header)} tab-separated fields, found {len(fields)}")
        label = _parse_label(fields[label_idx], num_classes, label_names)
        if label is None:
            allowed = f"an integer in [0, {num_classes})"
            if label_names is not None:
                allowed += f" or one of {list(label_names)!r}"
            raise DataFileError(
                path, number, f"label {fields[label_idx]!r} in column {label_column!r} is not {allowed}"
            )
        for column, idx in zip(texts, text_idx, strict=True):
            column.append(fields[idx])
        labels.append(label)
        numbers.append(number)
    return Rows(texts=tuple(tuple(c) for c in texts), labels=tuple(labels), lines=tuple(numbers))


def read_tsv(
    path: str | os.PathLike,
    text_columns: Sequence[str],
    label_column: str,
    num_classes: int = 2,
    label_names: Sequence[str] | None = None,
    header: Sequence[str] | None = None,
) -> Rows:
    """Read and parse one TSV file (UTF-8, with or without a byte-order mark).

    Raises:
      FileNotFoundError: no such file, naming it.
      DataFileError: naming ``path:line``: a byte that is not UTF-8, or what :func:`parse_tsv` refuses.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such data file")
    with open(path, "rb") as f:
        data = f.read()
    return parse_tsv(decode_utf8(data, path), path, text_columns, label_column, num_classes, label_names, header)


def decode_utf8(data: bytes, path: str | os.PathLike) -> str:
    """Return ``data`` as UTF-8 text; a byte that is not UTF-8 raises DataFileError with its line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataFileError(
            path,
            line,
            f"byte 0x{data[err.start]:02x} at byte {column} of the line is not UTF-8 ({err.reason}); "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        ) from None
