"""Data layer: TFDS ArrayRecord builders on local GLUE files, tokenization, batching and metrics."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from lora_jax.data import (
    TASKS,
    DataFileError,
    Encoded,
    Examples,
    batches,
    bucket_length,
    load_split,
    num_batches,
    parse_tsv,
    prepare,
    read_tsv,
    tokenize,
)
from lora_jax.data.encoding import truncated_lengths
from lora_jax.errors import LoraError
from lora_jax.training.metrics import accuracy, compute_metrics, f1, matthews_corrcoef

WORDS = [
    "the",
    "a",
    "storm",
    "is",
    "was",
    "in",
    "of",
    "to",
    "and",
    "new",
    "pope",
    "church",
    "iraq",
    "found",
    "weapons",
    "##s",
    "##ing",
    ".",
    ",",
]


def raw_tsv(path: Path) -> list[list[str]]:
    """An independent reading of a GLUE TSV file: data rows split on tab."""
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def rte(tfds_dir: Path, glue_dir: Path) -> dict[str, Examples]:
    return {split: load_split("rte", split, data_dir=glue_dir, tfds_dir=tfds_dir) for split in ("train", "dev")}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- builders -------------------------------------------------------------------------------


def test_rte_counts_and_labels_match_tsv(rte: dict[str, Examples], glue_dir: Path) -> None:
    assert (len(rte["train"]), len(rte["dev"])) == (2490, 277)
    for split, name in (("train", "train.tsv"), ("dev", "dev.tsv")):
        rows = raw_tsv(glue_dir / "RTE" / name)
        ex = rte[split]
        assert ex.labels.dtype == np.int32
        assert set(ex.labels.tolist()) == {0, 1}
        assert ex.labels.tolist() == [int(r[2]) for r in rows]
        assert list(ex.texts[0]) == [r[0] for r in rows]
        assert list(ex.texts[1]) == [r[1] for r in rows]


def test_prepared_data_is_arrayrecord_reused_and_needs_no_tensorflow(
    rte: dict[str, Examples], tfds_dir: Path, glue_dir: Path
) -> None:
    (version_dir,) = (tfds_dir / "tsv_classification").glob("rte_*/1.0.0")
    assert sorted(p.name for p in version_dir.glob("*.array_record-*")) == [
        f"tsv_classification-{split}.array_record-00000-of-00001" for split in ("train", "validation")
    ]
    info = version_dir / "dataset_info.json"
    before = info.stat().st_mtime_ns
    again = load_split("rte", "validation", data_dir=glue_dir, tfds_dir=tfds_dir)
    assert info.stat().st_mtime_ns == before
    assert again.labels.tolist() == rte["dev"].labels.tolist()
    assert "tensorflow" not in sys.modules


def test_registered_tasks_have_metrics() -> None:
    assert TASKS["sst2"].metrics[0] == "accuracy"
    assert TASKS["rte"].metrics[0] == "accuracy"
    assert TASKS["cola"].metrics[0] == "matthews_corrcoef"


def test_custom_task_with_user_named_columns(tmp_path: Path, tfds_dir: Path) -> None:
    header = "id\tclaim\tevidence\tgold"
    write(tmp_path / "nli" / "train.tsv", [header, "1\tcats purr\tcats are animals\t2", "2\tdogs\tbark\t0"])
    write(tmp_path / "nli" / "dev.tsv", [header, '3\t"quoted, text"\tx\t1'])
    kwargs = dict(data_dir=tmp_path / "nli", tfds_dir=tfds_dir, num_classes=3)
    train = load_split("my-nli", "train", text_columns=["evidence", "claim"], label_column="gold", **kwargs)
    assert train.texts == (("cats are animals", "bark"), ("cats purr", "dogs"))
    assert train.labels.tolist() == [2, 0]
    dev = load_split("my-nli", "dev", text_columns=["claim"], label_column="gold", **kwargs)
    assert dev.texts == (('"quoted, text"',),)
    assert dev.labels.tolist() == [1]


@pytest.mark.parametrize(
    ("lines", "line", "fragment"),
    [
        (["text\tlabel", "good\t1", "bad row with no tab"], 3, "expected 2 tab-separated fields, found 1"),
        (["text\tlabel", "good\t1", "fine\t0", "odd\tyes"], 4, "label 'yes'"),
        (["text\tlabel", "good\t2"], 2, "not an integer in [0, 2)"),
        (["sentence\tlabel", "good\t1"], 1, "no column 'text'"),
    ],
)
def test_malformed_file_names_path_and_line(
    tmp_path: Path, tfds_dir: Path, lines: list[str], line: int, fragment: str
) -> None:
    write(tmp_path / "train.tsv", ["text\tlabel", "ok\t0"])
    bad = write(tmp_path / "dev.tsv", lines)
    with pytest.raises(DataFileError) as err:
        load_split("bad", "dev", data_dir=tmp_path, tfds_dir=tfds_dir, text_columns=["text"], label_column="label")
    assert str(err.value).startswith(f"{bad}:{line}: ")
    assert fragment in str(err.value)
    assert (err.value.path, err.value.line) == (str(bad), line)
    assert not list((tfds_dir / "tsv_classification").glob("bad_*/1.0.0")), "nothing half-prepared is kept"


def test_label_names_and_headerless_files(tmp_path: Path) -> None:
    # GLUE's own RTE uses label names; its CoLA has no header row.
    rte = parse_tsv(
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\tc\td\t0\n", "rte.tsv", **_rte_columns()
    )
    assert rte.labels == (1, 0) and rte.texts == (("a", "c"), ("b", "d")) and rte.lines == (2, 3)
    cola = TASKS["cola"]
    rows = parse_tsv(
        "gj04\t1\t\tThe sailors rode.\r\n", "cola.tsv", cola.text_columns, "label", header=cola.remote_header
    )
    assert rows.texts == (("The sailors rode.",),) and rows.labels == (1,) and rows.lines == (1,)


def _rte_columns() -> dict:
    spec = TASKS["rte"]
    return dict(text_columns=spec.text_columns, label_column=spec.label_column, label_names=spec.label_names)


def test_missing_file_names_path(tmp_path: Path, tfds_dir: Path) -> None:
    write(tmp_path / "train.tsv", ["text\tlabel", "ok\t0"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "dev.tsv")):
        load_split("gone", "train", data_dir=tmp_path, tfds_dir=tfds_dir, text_columns=["text"], label_column="label")


def test_missing_data_dir_is_named(tmp_path: Path, tfds_dir: Path) -> None:
    gone = tmp_path / "no-such-glue"
    with pytest.raises(FileNotFoundError, match=f"{gone}: no such data directory for task 'rte'"):
        load_split("rte", "train", data_dir=gone, tfds_dir=tfds_dir)
    assert not (tfds_dir / "tsv_classification" / "rte").exists(), "nothing was downloaded instead"


def test_data_dir_or_download_is_the_callers_choice(tfds_dir: Path) -> None:
    with pytest.raises(LoraError, match="task 'sst2': give data_dir.* or download=True"):
        load_split("sst2", "train", tfds_dir=tfds_dir)
    with pytest.raises(LoraError, match="task 'mine': give data_dir.*dev.tsv$"):
        load_split("mine", "train", tfds_dir=tfds_dir, text_columns=["text"], label_column="label")
    with pytest.raises(LoraError, match="not both"):
        load_split("sst2", "train", data_dir=tfds_dir, tfds_dir=tfds_dir, download=True)


# --- tokenization ---------------------------------------------------------------------------


def examples(texts: tuple[tuple[str, ...], ...], labels: list[int]) -> Examples:
    return Examples(task=TASKS["rte"], split="train", texts=texts, labels=np.asarray(labels, np.int32))


def test_pair_encoding_is_bert_style(tokenizer: Tokenizer) -> None:
    enc = tokenize(examples((("The storm",), ("found weapons",)), [1]), tokenizer, max_length=16)
    vocab = tokenizer.get_vocab()
    expected = [vocab[t] for t in ["[CLS]", "the", "storm", "[SEP]", "found", "weapons", "[SEP]"]]
    assert enc.input_ids[0].tolist() == expected
    assert enc.token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert enc.input_ids[0].dtype == np.int32
    assert enc.labels.tolist() == [1]


def test_truncation_to_max_length(tokenizer: Tokenizer) -> None:
    long = " ".join(["storm"] * 50)
    enc = tokenize(examples(((long, "the"), ("pope", long)), [0, 1]), tokenizer, max_length=10)
    assert enc.lengths.tolist() == [10, 10]
    sep = tokenizer.token_to_id("[SEP]")
    assert enc.input_ids[0][-1] == sep and enc.token_type_ids[0].sum() == 2  # "pope [SEP]" kept whole
    single = tokenize(examples(((long,),), [0]), tokenizer, max_length=8)
    assert single.lengths.tolist() == [8] and single.input_ids[0][-1] == sep
    assert tokenizer.truncation is None  # the caller's tokenizer is left as it was


@pytest.mark.parametrize(("la", "lb", "budget"), [(10, 2, 8), (2, 10, 8), (10, 10, 7), (3, 3, 8), (0, 9, 5)])
def test_truncated_lengths_longest_first(la: int, lb: int, budget: int) -> None:
    ka, kb = truncated_lengths(la, lb, budget)
    assert ka <= la and kb <= lb and ka + kb == min(la + lb, budget)
    if la + lb > budget and ka < la and kb < lb:
        assert abs(ka - kb) <= 1


# --- batching -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rte_encoded(rte: dict[str, Examples], tokenizer: Tokenizer) -> Encoded:
    return tokenize(rte["train"], tokenizer, max_length=128)


def test_shuffle_is_deterministic_by_seed_and_epoch(rte_encoded: Encoded) -> None:
    def first_labels(**kw: int) -> list[int]:
        return [b["input_ids"][:, :8].tolist() for b in batches(rte_encoded, 16, limit=64, **kw)]

    assert first_labels(seed=0, epoch=0) == first_labels(seed=0, epoch=0)
    assert first_labels(seed=0, epoch=0) != first_labels(seed=0, epoch=1)
    assert first_labels(seed=0, epoch=0) != first_labels(seed=1, epoch=0)


def test_buckets_bound_shapes_and_train_drops_remainder(rte_encoded: Encoded) -> None:
    shapes = set()
    count = 0
    for batch in batches(rte_encoded, 32, seed=3, buckets=(32, 64, 128)):
        shapes.add(batch["input_ids"].shape)
        assert {k: v.dtype for k, v in batch.items() if k != "weights"} == dict.fromkeys(
            ("input_ids", "attention_mask", "token_type_ids", "labels"), np.int32
        )
        assert batch["weights"].all()
        count += 1
    assert shapes <= {(32, 32), (32, 64), (32, 128)}
    assert count == num_batches(len(rte_encoded), 32) == 2490 // 32


def test_bucket_length() -> None:
    assert [bucket_length(n, (64, 32, 128)) for n in (1, 32, 33, 128)] == [32, 32, 64, 128]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_length(129, (32, 64, 128))


def test_eval_batches_cover_every_example_once(rte: dict[str, Examples], tokenizer: Tokenizer) -> None:
    enc = tokenize(rte["dev"], tokenizer, max_length=64)
    # Tag each example with its index as the label to see which ones come out.
    tagged = Encoded(enc.input_ids, enc.token_type_ids, np.arange(len(enc), dtype=np.int32), enc.pad_id)
    seen: list[int] = []
    for batch in batches(tagged, 32, seed=None, drop_remainder=False, buckets=(32, 64)):
        assert batch["input_ids"].shape[0] == 32
        live = batch["weights"] > 0
        seen += batch["labels"][live].tolist()
        lengths = tagged.lengths[batch["labels"][live]]
        assert batch["attention_mask"][live].sum(axis=1).tolist() == lengths.tolist()
        assert not batch["attention_mask"][~live].any()
    assert seen == list(range(277))
    assert num_batches(277, 32, drop_remainder=False) == 9


def test_limit_takes_first_examples_after_shuffle(rte_encoded: Encoded) -> None:
    full = [b["labels"] for b in batches(rte_encoded, 8, seed=5)][:2]
    limited = [b["labels"] for b in batches(rte_encoded, 8, seed=5, limit=20)]
    assert len(limited) == 2
    np.testing.assert_array_equal(np.concatenate(full), np.concatenate(limited))


# --- metrics --------------------------------------------------------------------------------


def test_metrics_against_hand_computed_values() -> None:
    # TP=3, FP=1, FN=1, TN=3.
    preds, labels = [1, 1, 0, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0, 1, 0]
    assert accuracy(preds, labels) == pytest.approx(6 / 8)
    assert f1(preds, labels) == pytest.approx(6 / 8)
    assert matthews_corrcoef(preds, labels) == pytest.approx((3 * 3 - 1 * 1) / 16)
    # TP=2, FP=1, FN=1, TN=1: MCC = (2*1 - 1*1) / sqrt(3*3*2*2).
    preds, labels = [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]
    assert accuracy(preds, labels) == pytest.approx(3 / 5)
    assert f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(preds, labels) == pytest.approx(1 / 6)
    assert matthews_corrcoef([0, 0, 0], [0, 1, 0]) == 0.0
    assert matthews_corrcoef([1, 0, 1], [0, 1, 0]) == pytest.approx(-1.0)


def test_weights_drop_padding_rows() -> None:
    preds, labels = [1, 1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 0, 0, 0]
    weights = [1, 1, 1, 1, 1, 0, 0]
    got = compute_metrics(["accuracy", "f1", "matthews_corrcoef"], preds, labels, weights)
    assert got == pytest.approx({"accuracy": 3 / 5, "f1": 2 / 3, "matthews_corrcoef": 1 / 6})


def test_download_path_reads_official_glue_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Official CoLA files are headerless (source, label, annotation, sentence); fake the download offline.
    extracted = tmp_path / "extracted"
    write(
        extracted / "CoLA" / "train.tsv", ["gj04\t1\t\tOur friends won't buy this.", "gj04\t0\t*\tThey drank the pub."]
    )
    write(extracted / "CoLA" / "dev.tsv", ["cj99\t1\t\tThe sailors rode."])
    urls: list[str] = []

    def fake_download(self: object, url: str) -> Path:
        urls.append(url)
        return extracted

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", fake_download)
    builder = prepare(TASKS["cola"], None, tmp_path / "tfds")
    assert urls == [TASKS["cola"].url]
    assert builder.builder_config.name == "cola"
    train = load_split("cola", "train", tfds_dir=tmp_path / "tfds", download=True)  # reuses, no new download
    assert urls == [TASKS["cola"].url]
    assert train.texts == (("Our friends won't buy this.", "They drank the pub."),)
    assert train.labels.tolist() == [1, 0]


# --- damaged and malformed files: each names path:line and the fix ------------------------------


def _tsv(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


DATA_DAMAGE = {
    # name: (file bytes, line named, what the message says)
    "header and no rows": (b"text\tlabel\n", 2, "no data rows after the header"),
    "header and no rows, no newline": (b"text\tlabel", 2, "no data rows after the header"),
    "byte not UTF-8": (b"text\tlabel\ngood\t1\ncaf\xe9\t0\n", 3, r"byte 0xe9 at byte 4 of the line is not UTF-8"),
    "byte not UTF-8 in the header": (b"t\xffxt\tlabel\ngood\t1\n", 1, "byte 0xff at byte 2"),
    "too many fields": (b"text\tlabel\ngood\t1\nbad\t0\textra\n", 3, "expected 2 tab-separated fields, found 3"),
    "blank line": (b"text\tlabel\ngood\t1\n\nfine\t0\n", 3, "expected 2 tab-separated fields, found 1"),
    "label outside the classes": (b"text\tlabel\ngood\t1\nbad\t-1\n", 3, r"label '-1' .*not an integer in \[0, 2\)"),
    "duplicate column": (b"text\tlabel\ttext\ngood\t1\tx\n", 1, "column 'text' appears 2 times"),
}


@pytest.mark.parametrize("kind", sorted(DATA_DAMAGE))
def test_bad_data_file_names_path_and_line(tmp_path, kind):
    data, line, message = DATA_DAMAGE[kind]
    path = _tsv(tmp_path / "train.tsv", data)
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}:{line}: .*{message}") as err:
        read_tsv(path, ["text"], "label")
    assert (err.value.path, err.value.line) == (str(path), line)


COLUMNS = {"text_columns": ["text"], "label_column": "label"}


@pytest.mark.parametrize("kind", ["header and no rows", "byte not UTF-8"])
def test_bad_data_file_through_tfds_names_path_and_line(tmp_path, kind):
    data, line, message = DATA_DAMAGE[kind]
    _tsv(tmp_path / "task" / "dev.tsv", b"text\tlabel\nfine\t0\n")
    path = _tsv(tmp_path / "task" / "train.tsv", data)
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}:{line}: .*{message}"):
        load_split(
            "bad",
            "train",
            data_dir=tmp_path / "task",
            tfds_dir=tmp_path / "tfds",
            text_columns=["text"],
            label_column="label",
        )


_FIELD = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)  # tabs and line ends included
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r"), max_size=8)
_LABEL = st.sampled_from(["0", "1", "2", "-1", "text", "label", "", " 1", "1.0"])
_ROW = st.one_of(
    st.tuples(_TEXT, _LABEL).map(list),  # well formed but for the label
    st.lists(st.one_of(_FIELD, _LABEL), max_size=4),
)


def _tsv_text(rows: list[list[str]]) -> bytes:
    return "\n".join("\t".join(row) for row in [["text", "label"], *rows]).encode("utf-8", "surrogatepass")


def _tsv_text(rows: list[list[str]]) -> bytes:
    return "\n".join("\t".join(row) for row in [["text", "label"], *rows]).encode("utf-8", "surrogatepass")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.one_of(
        st.binary(max_size=80),
        st.lists(_ROW, max_size=5).map(_tsv_text),
    ),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    bom=st.booleans(),
)
def test_any_bytes_are_rows_or_a_data_file_error(tmp_path, raw, newline, bom):
    data = (b"\xef\xbb\xbf" if bom else b"") + raw.replace(b"\n", newline)
    path = _tsv(tmp_path / "any.tsv", data)
    for read in (
        lambda: read_tsv(path, ["text"], "label"),
        lambda: parse_tsv(data.decode("utf-8", "replace"), path, ["text"], "label", num_classes=3),
    ):
        try:
            rows = read()
        except DataFileError as err:
            assert re.match(rf"^{re.escape(str(path))}:[1-9][0-9]*: ", str(err)), str(err)
            continue
        assert len(rows) >= 1 and len(rows.texts[0]) == len(rows.labels) == len(rows.lines)
        assert all(0 <= label < 3 for label in rows.labels)


def test_grouping_by_length_pads_less_and_keeps_the_epoch(rte_encoded: Encoded) -> None:
    def epoch(group: int, seed: int = 3, epoch: int = 0) -> list[dict]:
        return list(batches(rte_encoded, 32, seed=seed, epoch=epoch, group=group))

    plain, grouped = epoch(0), epoch(10)

    # The same examples (by their tokens and labels), the same number of batches, fewer padding tokens.
    def rows(bs):
        return sorted(
            (tuple(b["input_ids"][i][b["attention_mask"][i] == 1]), int(b["labels"][i])) for b in bs for i in range(32)
        )

    assert len(plain) == len(grouped) and rows(plain) == rows(grouped)
    padded = {name: sum(b["input_ids"].size for b in bs) for name, bs in (("plain", plain), ("grouped", grouped))}
    assert padded["grouped"] < 0.8 * padded["plain"]

    # Within a batch, lengths are neighbours: the spread is small next to the ungrouped batches'.
    def spread(bs):
        return np.mean([np.ptp(b["attention_mask"].sum(1)) for b in bs])

    assert spread(grouped) < 0.5 * spread(plain)
    # Seeded: the same seed and epoch give the same batches; another epoch another order.
    again = epoch(10)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped, again))
    other = epoch(10, epoch=1)
    assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped, other))
    # Batch order inside a pool is shuffled, not longest-last.
    lengths = [b["input_ids"].shape[1] for b in grouped[:10]]
    assert lengths != sorted(lengths)


def test_grouping_is_refused_when_negative_and_ignored_in_evaluation(rte_encoded: Encoded) -> None:
    with pytest.raises(ValueError, match="group must be 0"):
        next(batches(rte_encoded, 32, seed=0, group=-1))
    plain = list(batches(rte_encoded, 32, seed=None, drop_remainder=False))
    grouped = list(batches(rte_encoded, 32, seed=None, drop_remainder=False, group=10))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(plain, grouped))
