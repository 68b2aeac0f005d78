"""A TSV folder read straight into Examples: labels inferred, headerless files, macro F1."""

import numpy as np
import pytest

from lora_jax import data
from lora_jax.training import metrics


def _write(directory, train, dev):
    directory.mkdir(exist_ok=True)
    (directory / "train.tsv").write_text(train)
    (directory / "dev.tsv").write_text(dev)
    return [directory / "train.tsv", directory / "dev.tsv"]


def test_infer_labels(tmp_path):
    files = _write(tmp_path / "ints", "text\tlabel\na\t0\nb\t3\nc\t1\nd\t2\n", "text\tlabel\nc\t1\n")
    assert data.infer_labels(files, "label") == (4, None)
    files = _write(tmp_path / "names", "pos\ta\nneg\tb\nneutral\tc\n", "neutral\tc\npos\td\n")
    assert data.infer_labels(files, "0", header=("0", "1")) == (3, ("neg", "neutral", "pos"))
    assert data.positional_header(files[0]) == ("0", "1")
    with pytest.raises(data.DataFileError, match=r"train.tsv:1: no column 'label'"):
        data.infer_labels(files, "label", header=("text", "y"))
    with pytest.raises(data.DataFileError, match="at least two classes"):
        data.infer_labels(_write(tmp_path / "one", "x\ty\na\tpos\n", "x\ty\nb\tpos\n"), "y")
    with pytest.raises(data.DataFileError, match=r"dev.tsv:3: expected 2 tab-separated fields, found 1"):
        data.infer_labels(_write(tmp_path / "short", "x\ty\na\t0\nb\t1\n", "x\ty\nb\t1\nc\n"), "y")
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        data.infer_labels([tmp_path / "missing.tsv"], "y")


def test_read_split_headerless_named_labels(tmp_path):
    _write(tmp_path, "pos\tgood film\tyes\nneg\tbad film\tno\n", "neutral\tok film\tmaybe\n")
    header = ("label", "text", "other")
    task = data.custom_task("mine", ["text", "other"], "label", 3, ["neg", "neutral", "pos"])
    train = data.read_split(task, "train", tmp_path, header)
    assert train.texts == (("good film", "bad film"), ("yes", "no")) and list(train.labels) == [2, 0]
    dev = data.read_split(task, "dev", tmp_path, header)
    assert dev.split == "validation" and list(dev.labels) == [1]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.read_split(task, "train", tmp_path / "nowhere", header)
    assert data.buckets_up_to(40) == (8, 16, 24, 32, 40)
    assert data.buckets_up_to(128) == (8, 16, 24, 32, 48, 64, 96, 128)


def test_macro_f1():
    preds, labels = np.array([0, 1, 2, 2, 1, 0]), np.array([0, 1, 2, 1, 1, 2])
    per_class = [metrics.f1(preds, labels, positive=c) for c in range(3)]
    assert metrics.macro_f1(preds, labels) == pytest.approx(np.mean(per_class))
    assert metrics.macro_f1(preds, labels, weights=np.zeros(6)) == 0.0
    assert "macro_f1" in metrics.METRICS
