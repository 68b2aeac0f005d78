"""Registry of text-classification tasks: where their TSV files live and how to score them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lora_jax.errors import LoraError


@dataclasses.dataclass(frozen=True)
class Task:
    """How to read and score one classification task laid out as ``train.tsv`` and ``dev.tsv``.

    Attributes:
        name: Short identifier (``"rte"``); also the TFDS config name when the data is downloaded.
        text_columns: One or two header names of the text columns, in model input order.
        label_column: Header name of the label column.
        num_classes: Labels are integers in ``[0, num_classes)``.
        label_names: Optional names for labels; a label field may also hold one of these names.
        metrics: Metric names (keys of ``lora_jax.training.metrics.METRICS``); the first is the headline one.
        subdir: Folder of this task under a GLUE-style root directory (``"RTE"``); empty for custom tasks.
        url: Official archive to download when no local files are given; ``None`` for custom tasks.
        remote_header: Column names for downloaded files that have no header row (GLUE's CoLA).
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    num_classes: int = 2
    label_names: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    subdir: str = ""
    url: str | None = None
    remote_header: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.text_columns) not in (1, 2):
            raise LoraError(f"task {self.name!r}: expected one or two text columns, got {self.text_columns!r}")
        if len(set(self.text_columns)) != len(self.text_columns):
            raise LoraError(f"task {self.name!r}: text columns {self.text_columns!r} name one column twice")
        if self.label_column in self.text_columns:
            raise LoraError(
                f"task {self.name!r}: {self.label_column!r} is both a text column and the label column; "
                "the model would read the answer"
            )
        if self.num_classes < 2:
            raise LoraError(f"task {self.name!r}: num_classes must be at least 2, got {self.num_classes}")
        if self.label_names is not None and len(self.label_names) != self.num_classes:
            raise LoraError(f"task {self.name!r}: {len(self.label_names)} label names for {self.num_classes} classes")


_GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/{}.zip"

TASKS: dict[str, Task] = {
    "sst2": Task(
        name="sst2",
        text_columns=("sentence",),
        label_column="label",
        label_names=("negative", "positive"),
        metrics=("accuracy", "f1"),
        subdir="SST-2",
        url=_GLUE_URL.format("SST-2"),
    ),
    "rte": Task(
        name="rte",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        label_names=("entailment", "not_entailment"),
        metrics=("accuracy",),
        subdir="RTE",
        url=_GLUE_URL.format("RTE"),
    ),
    "cola": Task(
        name="cola",
        text_columns=("sentence",),
        label_column="label",
        label_names=("unacceptable", "acceptable"),
        metrics=("matthews_corrcoef", "accuracy"),
        subdir="CoLA",
        url=_GLUE_URL.format("CoLA"),
        # GLUE's own CoLA files are headerless: source, label, original annotation, sentence.
        remote_header=("source", "label", "annotation", "sentence"),
    ),
}


def custom_task(
    name: str,
    text_columns: Sequence[str],
    label_column: str,
    num_classes: int = 2,
    label_names: Sequence[str] | None = None,
    metrics: Sequence[str] = ("accuracy",),
) -> Task:
    """Describes a user's own task: a directory with ``train.tsv`` and ``dev.tsv`` using these column names."""
    return Task(
        name=name,
        text_columns=tuple(text_columns),
        label_column=label_column,
        num_classes=num_classes,
        label_names=None if label_names is None else tuple(label_names),
        metrics=tuple(metrics),
    )


def get_task(task: str | Task) -> Task:
    """Returns the spec for a registered task name, or ``task`` itself when it is already a spec."""
    if isinstance(task, Task):
        return task
    key = task.lower().replace("-", "")
    if key not in TASKS:
        raise KeyError(
            f"unknown task {task!r}; registered tasks are {sorted(TASKS)}; "
            "for your own data pass text_columns= and label_column= (or a Task from custom_task)"
        )
    return TASKS[key]
