"""Numbers, labels, run records and tokenizers that would change a result without a word are refused."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import lora_jax as lj
from lora_jax import data, models, training
from lora_jax.cli import runs
from lora_jax.cli.common import model_options
from lora_jax.cli.train import check_vocabulary
from lora_jax.errors import CheckpointCorruptError, LoraError
from tests.test_cli import refused


def _files(directory: Path, train: str, dev: str) -> list[Path]:
    directory.mkdir()
    (directory / "train.tsv").write_bytes(train.encode() if isinstance(train, str) else train)
    (directory / "dev.tsv").write_text(dev)
    return [directory / "train.tsv", directory / "dev.tsv"]


def test_labels_that_would_add_classes_are_refused_naming_the_line(tmp_path):
    # A header row read as data: its label would train as a class of its own.
    files = _files(tmp_path / "header", "label\tsentence\n1\tgood\n0\tbad\n", "0\tfine\n1\tok\n")
    with pytest.raises(data.DataFileError, match=r"train.tsv:1: label 'label' is the label column's name"):
        data.infer_labels(files, "label", header=("label", "sentence"))
    # A trailing space, a class only dev holds, and an integer typo each refused at their line.
    files = _files(tmp_path / "space", "x\ty\na\t0\nb\t1 \n", "x\ty\nc\t1\n")
    with pytest.raises(data.DataFileError, match=r"train.tsv:3: label '1 ' has spaces around it"):
        data.infer_labels(files, "y")
    files = _files(tmp_path / "dev_only", "x\ty\na\tpos\nb\tneg\n", "x\ty\nc\tpos\nd\tneutral\n")
    with pytest.raises(data.DataFileError, match=r"dev.tsv:3: label 'neutral' never occurs in .*train.tsv"):
        data.infer_labels(files, "y")
    files = _files(tmp_path / "typo", "x\ty\na\t0\nb\t1\nc\t11\nd\t0\n", "x\ty\ne\t1\n")
    with pytest.raises(data.DataFileError, match=r"train.tsv:4: integer labels skip 2, 3, 4, 5, 6 \.\.\. below 11"):
        data.infer_labels(files, "y")
    # Bytes that are not UTF-8 are named by line before any label is read.
    files = _files(tmp_path / "latin", b"x\ty\ncaf\xe9\t1\nb\t0\n", "x\ty\nc\t1\n")
    with pytest.raises(data.DataFileError, match=r"train.tsv:2: byte 0xe9 .* save the file as UTF-8"):
        data.infer_labels(files, "y")
    latin = _files(tmp_path / "latin_headerless", b"caf\xe9\t1\nb\t0\n", "c\t1\n")
    with pytest.raises(data.DataFileError, match=r"train.tsv:1: byte 0xe9"):
        data.positional_header(latin[0])
    # Headerless integer labels equal to the positional column names are labels, not a header.
    files = _files(tmp_path / "positional", "1\tgood\n0\tbad\n", "0\tfine\n")
    assert data.infer_labels(files, "0", header=data.positional_header(files[0])) == (2, None)


def test_a_text_column_that_is_the_label_or_repeated_is_refused():
    with pytest.raises(LoraError, match="'label' is both a text column and the label column"):
        data.custom_task("mine", ["sentence1", "label"], "label")
    with pytest.raises(LoraError, match="name one column twice"):
        data.custom_task("mine", ["sentence1", "sentence1"], "label")


@pytest.mark.parametrize("alpha", [0, 0.0, math.nan, math.inf, "8", True])
def test_alpha_that_is_zero_or_not_a_finite_number_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        lj.Rule("kernel", alpha=alpha)
    assert lj.Rule("kernel", alpha=np.float32(4.0)).scale == 0.5  # numpy scalars are numbers


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": 0}, "steps=0: must be an integer of at least 1"),
        ({"steps": 2.0}, "steps=2.0: must be an integer"),
        ({"learning_rate": -1e-3}, "learning_rate=-0.001: must be a finite number above 0"),
        ({"learning_rate": 0.0}, "learning_rate=0.0: must be a finite number above 0"),
        ({"learning_rate": math.nan}, "learning_rate=nan"),
        ({"weight_decay": math.inf}, "weight_decay=inf"),
        ({"warmup_ratio": 1.0}, "warmup_ratio=1.0: must be below 1"),
        ({"seed": -1}, "seed=-1: must be an integer of at least 0"),
        ({"log_every": 0}, "log_every=0"),
    ],
)
def test_train_config_refuses_numbers_that_cannot_train(options, message):
    with pytest.raises(LoraError, match=message.replace("(", r"\(").replace(".", r"\.")):
        training.TrainConfig(**{"steps": 4, **options})


def _record(run_dir: Path, **record) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runs.RUN_FILE).write_text(json.dumps(record))


def test_a_finished_run_without_checkpoints_is_kept(tmp_path):
    run_dir = tmp_path / "run"
    _record(run_dir, arguments={"rank": 8}, data={}, status="finished")
    (run_dir / runs.ADAPTER_FILE).write_bytes(b"the result")
    for arguments in ({"rank": 8}, {"rank": 4}):
        with pytest.raises(LoraError, match=r"run: the run there finished .* checkpoints/ is gone.*--overwrite"):
            runs.open_run(run_dir, arguments, {}, overwrite=False)
    assert (run_dir / runs.ADAPTER_FILE).read_bytes() == b"the result"
    # An attempt that stopped before its first checkpoint has nothing to lose and is replaced.
    _record(tmp_path / "stopped", arguments={"rank": 8}, data={}, status="started")
    assert runs.open_run(tmp_path / "stopped", {"rank": 4}, {}, overwrite=False) == {}
    assert not (tmp_path / "stopped" / runs.RUN_FILE).exists()


@pytest.mark.parametrize(
    "record, message",
    [
        (["rank", 8], "the file is list .* expected an object"),
        ({"arguments": ["rank", 8]}, '"arguments" is list .* expected an object'),
        ({"model": {"options": ["num_labels", 2]}}, '"model.options" is list'),
        ({"model": {"options": {"num_labels": "2"}}}, '"model.options.num_labels" is str "2", expected an integer'),
        ({"model": {"options": {"num_labels": True}}}, '"model.options.num_labels" is bool'),
        ({"status": 1}, '"status" is int'),
    ],
)
def test_a_run_record_of_the_wrong_shape_is_refused_naming_the_field(tmp_path, record, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runs.RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(LoraError, match=f"run.json: {message}.*restore the file"):
        model_options(run_dir / runs.ADAPTER_FILE, None, None)
    with pytest.raises(LoraError, match="run.json"):
        runs.open_run(run_dir, {"rank": 8}, {}, overwrite=False)


def test_a_tokenizer_that_is_not_one_or_not_the_models_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    with pytest.raises(LoraError, match=r"tokenizer.json: not a tokenizer the tokenizers library reads"):
        models.load_tokenizer(tmp_path)
    encoded = {"train": data.Encoded((np.array([2, 5, 3]), np.array([2, 99, 3])), (), np.zeros(2), 0)}
    check_vocabulary(encoded, {"train": tmp_path / "train.tsv"}, 100, tmp_path / "tokenizer.json")
    with pytest.raises(LoraError, match=r"train.tsv: the tokenizer gives id 99, outside the model's vocabulary of 99"):
        check_vocabulary(encoded, {"train": tmp_path / "train.tsv"}, 99, tmp_path / "tokenizer.json")


def test_command_line_numbers_are_refused_before_anything_loads(tmp_path):
    base = ["train", tmp_path / "model", tmp_path / "data", "--out", tmp_path / "run"]
    for option, value, message in [
        ("--learning-rate", "-0.005", "--learning-rate must be a finite number above 0, got -0.005"),
        ("--alpha", "0", "--alpha must be a finite number above 0, got 0.0"),
        ("--epochs", "nan", "--epochs must be a finite number above 0, got nan"),
        ("--seed", "-1", "--seed must be 0 or more, got -1"),
    ]:
        assert message in refused(*base, option, value)
    assert "--learning-rate must be a finite number above 0, got inf" in refused(
        "train-lm", tmp_path / "model", tmp_path / "data", "--learning-rate", "inf", "--out", tmp_path / "run"
    )
    assert not (tmp_path / "run").exists()


def test_completions_files_read_like_tsv_files(tmp_path):
    # A byte-order mark is dropped (as in TSV files); a byte that is not UTF-8 is named by line.
    file = tmp_path / "train.jsonl"
    file.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": " b"}\n')
    assert len(data.read_completions(file)) == 1
    file.write_bytes(b'{"prompt": "a", "completion": " b"}\n{"prompt": "caf\xe9", "completion": " b"}\n')
    with pytest.raises(data.DataFileError, match=r"train.jsonl:2: byte 0xe9 .* save the file as UTF-8"):
        data.read_completions(file)


def test_a_stored_spec_too_deep_or_too_long_to_parse_is_a_damaged_file(tmp_path):
    from safetensors.numpy import save_file

    from lora_jax.spec import SPEC_METADATA_KEY

    for damaged in ("[" * 100_000, '{"rules": [' + "1" * 5000 + "]}"):
        path = tmp_path / "a.safetensors"
        save_file({"x": np.zeros(1, np.float32)}, path, metadata={SPEC_METADATA_KEY: damaged})
        with pytest.raises(CheckpointCorruptError, match=r"a.safetensors: damaged spec in the metadata"):
            lj.LoraSpec.from_file(path)
