"""TFDS builder for TSV classification tasks, stored as ArrayRecord and read back without TensorFlow."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lora_jax.data.tasks import TASKS, Task
from lora_jax.data.tsv import read_tsv
from lora_jax.errors import LoraError

FILE_FORMAT = "array_record"
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}


@dataclasses.dataclass(eq=False)
class TsvConfig(tfds.core.BuilderConfig):
    """A builder config carrying the task whose files it reads."""

    task: Task | None = None


def _registered_configs() -> list[TsvConfig]:
    return [
        TsvConfig(name=spec.name, task=spec, description=f"GLUE {spec.subdir}, downloaded from {spec.url}")
        for spec in TASKS.values()
    ]


def _manual_dir(dl_manager: tfds.download.DownloadManager) -> Path | None:
    # The public property raises when no manual dir was given; that is the download case here.
    try:
        return Path(os.fspath(dl_manager.manual_dir))
    except AssertionError:
        return None


class TsvClassification(tfds.core.GeneratorBasedBuilder):
    """Text classification from ``train.tsv`` and ``dev.tsv``, one or two text columns and a label.

    The registered configs (``sst2``, ``rte``, ``cola``) download the official GLUE archive; any other
    config (see :func:`local_config`) reads the manual dir given as ``DownloadConfig(manual_dir=...)``.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = _registered_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put train.tsv and dev.tsv (tab-separated, header row, the task's text and label columns) in the manual dir."
    )

    @tfds.core.utils.classproperty  # pyright: ignore[reportAttributeAccessIssue]  (TFDS's own decorator)
    @classmethod
    def code_path(cls) -> None:  # pyright: ignore[reportIncompatibleMethodOverride, reportIncompatibleVariableOverride]
        """No source folder: TFDS would look for a checksums file next to the code, which needs
        the optional ``importlib_resources`` package, and this builder records no checksums."""
        return None

    @property
    def tsv_config(self) -> TsvConfig:
        """The builder's config, which names the task."""
        config = self.builder_config
        assert isinstance(config, TsvConfig), "the builder needs a TsvConfig"
        return config

    @property
    def task(self) -> Task:
        """The task this builder reads."""
        task = self.tsv_config.task
        assert task is not None, "TsvConfig needs a task"
        return task

    def _info(self) -> tfds.core.DatasetInfo:
        task = self.task
        labels = (
            tfds.features.ClassLabel(names=list(task.label_names))
            if task.label_names is not None
            else tfds.features.ClassLabel(num_classes=task.num_classes)
        )
        features: dict[str, tfds.features.FeatureConnector] = {
            f"text_{k}": tfds.features.Text() for k in range(len(task.text_columns))
        }
        features.update(label=labels, idx=tfds.features.Scalar(dtype=np.int32))
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{task.name}: text columns {list(task.text_columns)}, label column {task.label_column!r}",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        task = self.task
        header = None
        if self.tsv_config.name in TASKS:
            # Registered configs always download, even if TFDS's default manual dir holds other files.
            source = Path(os.fspath(dl_manager.download_and_extract(task.url))) / task.subdir
            header = task.remote_header
        else:
            source = _manual_dir(dl_manager)
            if source is None:
                raise FileNotFoundError(f"task {task.name!r}: give the directory with its train.tsv and dev.tsv")
        return {split: self._generate_examples(source / name, header) for split, name in SPLIT_FILES.items()}

    def _generate_examples(self, path: Path, header: tuple[str, ...] | None) -> Iterator[tuple[int, dict]]:
        task = self.task
        rows = read_tsv(path, task.text_columns, task.label_column, task.num_classes, task.label_names, header)
        for i, label in enumerate(rows.labels):
            example: dict[str, Any] = {f"text_{k}": column[i] for k, column in enumerate(rows.texts)}
            example.update(label=label, idx=i)
            yield i, example


def task_dir(task: Task, data_dir: str | os.PathLike) -> Path:
    """The folder holding the task's files: ``data_dir/<subdir>`` for a GLUE-style root, else ``data_dir``."""
    root = Path(data_dir).expanduser()
    nested = root / task.subdir
    return nested if task.subdir and nested.is_dir() else root


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "task"


def local_config(task: Task, source: Path) -> TsvConfig:
    """A config named after the task and a hash of its column spec and file contents.

    Hashing the contents means edited files are prepared afresh while identical ones are reused.
    """
    digest = hashlib.sha256(repr((task.text_columns, task.label_column, task.num_classes, task.label_names)).encode())
    for name in SPLIT_FILES.values():
        path = source / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        digest.update(path.read_bytes())
    return TsvConfig(name=f"{_slug(task.name)}_{digest.hexdigest()[:12]}", task=task, description=f"from {source}")


def prepare(
    task: Task,
    data_dir: str | os.PathLike | None,
    tfds_dir: str | os.PathLike | None = None,
) -> TsvClassification:
    """Prepares the task as ArrayRecord under ``tfds_dir`` (reusing an earlier preparation) and returns the builder.

    Args:
        task: The task to prepare.
        data_dir: Local folder with the task's TSV files (or a GLUE-style root holding ``task.subdir``);
            ``None`` downloads a registered GLUE task.
        tfds_dir: TFDS data dir; ``None`` means TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    """
    tfds_dir = None if tfds_dir is None else os.fspath(Path(tfds_dir).expanduser())
    if data_dir is None:
        if TASKS.get(task.name) != task:
            raise LoraError(f"task {task.name!r} is not a registered GLUE task; give data_dir with its TSV files")
        builder = TsvClassification(config=task.name, data_dir=tfds_dir, file_format=FILE_FORMAT)
        builder.download_and_prepare()
        return builder
    source = task_dir(task, data_dir)
    config = local_config(task, source)
    builder = TsvClassification(config=config, data_dir=tfds_dir, file_format=FILE_FORMAT)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source)))
    return builder
