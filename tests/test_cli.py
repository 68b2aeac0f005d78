"""The ``lora-jax`` command line: each verb as a subprocess (``python -m lora_jax``) on the tiny fixtures and MiniLM."""

import json
import random
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import lora_jax as lj
from lora_jax import cli, models
from lora_jax.io import peft
from lora_jax.paths import flatten, path_str

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
WORDS = {
    "pos": ["great", "wonderful", "lovely", "excellent"],
    "neg": ["awful", "terrible", "bad", "horrible"],
    "neutral": ["okay", "average", "plain", "ordinary"],
}
VERBS = ("describe", "train", "train-lm", "merge", "export-peft", "import-peft", "generate")


def lora_jax_cli(*args, expect=0):
    """Run ``python -m lora_jax ARGS`` from the repository root; check the exit status; return the result."""
    done = subprocess.run([sys.executable, "-m", "lora_jax", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def refused(*args):
    """Run a command that must be refused: exit 2, one ``lora-jax: error:`` line, no traceback; return that line."""
    done = lora_jax_cli(*args, expect=2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("lora-jax: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def _leaves(tree):
    return {path_str(p): np.asarray(x) for p, x in flatten(tree)[0]}


def _assert_same(a, b):
    a, b = _leaves(a), _leaves(b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _tensors_and_metadata(path):
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), metadata


def _sentences(n, seed, labels=("neg", "neutral", "pos")):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = WORDS[label] if label in WORDS else WORDS[("neg", "pos")[int(label) % 2]]
        rows.append((label, f"the film was {rng.choice(words)} and {rng.choice(words)}"))
    return rows


def _headerless_task(directory):
    """Three classes with named labels, no header: ``label<TAB>sentence``."""
    directory.mkdir()
    for name, n, seed in (("train.tsv", 48, 0), ("dev.tsv", 12, 1)):
        (directory / name).write_text("".join(f"{label}\t{text}\n" for label, text in _sentences(n, seed)))
    return directory


def _pair_task(directory):
    """Two text columns, integer labels, a header row with an extra column."""
    directory.mkdir()
    for name, n, seed in (("train.tsv", 24, 2), ("dev.tsv", 8, 3)):
        rows = _sentences(n, seed, labels=("0", "1"))
        lines = ["id\tsentence1\tsentence2\tlabel"] + [f"{i}\t{t}\tthe plot\t{lab}" for i, (lab, t) in enumerate(rows)]
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory


def _tiny_tokenizer(directory):
    """Write a small WordPiece ``tokenizer.json`` (under 96 tokens, the tiny models' vocabulary) into ``directory``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers import models as token_models

    words = ["the", "film", "was", "and", "plot", *(w for ws in WORDS.values() for w in ws)]
    vocab = {
        token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words, *"abcdefghijklmnopqrstuvwxyz"])
    }
    tokenizer = Tokenizer(token_models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def _tiny_encoder(directory):
    """tiny_bert_cls's encoder as a BertModel checkpoint (no head) with a small WordPiece tokenizer.json."""
    with pytest.warns(UserWarning, match="ignored 2 unused checkpoint tensors"):  # the classifier
        model, params = models.from_pretrained(FIXTURES / "tiny_bert_cls", architecture="BertModel")
    models.save_pretrained(directory, model, params)
    return _tiny_tokenizer(directory)


def test_help_for_every_verb(capsys):
    for verb in VERBS:
        with pytest.raises(SystemExit) as done:
            cli.main([verb, "--help"])
        assert done.value.code == 0
        assert f"usage: lora-jax {verb}" in capsys.readouterr().out
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lora-jax": "lora_jax.cli:main"}
    out = lora_jax_cli("--help").stdout
    assert all(verb in out for verb in VERBS)


def test_describe(minilm_dir):
    out = lora_jax_cli("describe", minilm_dir, "--targets", "qv", "--rank", "8").stdout
    assert "encoder/layer_5/attention/value/kernel" in out and "query" in out
    assert "adapters 73,728" in out  # 6 layers x 2 kernels x (384 + 384) x 8


def test_train_headerless_named_labels_then_merge(tmp_path, minilm_dir):
    task = _headerless_task(tmp_path / "task")
    run = tmp_path / "run"
    args = ["train", minilm_dir, task, "--columns", "label,sentence", "--text-columns", "sentence"]
    args += ["--label-column", "label", "--steps", "4", "--batch-size", "8", "--max-length", "32", "--out", run]
    out = lora_jax_cli(*args).stdout
    assert "dev: accuracy" in out and "macro_f1" in out and "matthews" not in out  # MCC for two classes only
    record = json.loads((run / "run.json").read_text())
    assert record["labels"] == ["neg", "neutral", "pos"] and record["status"] == "finished"
    assert record["model"]["options"] == {"num_labels": 3, "pooling": "mean"}
    assert set(record["scores"]) == {"accuracy", "macro_f1"}
    spec = lj.LoraSpec.from_file(run / "adapter.safetensors")  # self-describing
    assert {rule.name for rule in spec.rules} == {"attention.query", "attention.value", "classifier"}

    merged_dir = tmp_path / "merged"
    lora_jax_cli("merge", minilm_dir, run / "adapter.safetensors", "--out", merged_dir)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert (merged_dir / "tokenizer.json").is_file()
    with pytest.warns(UserWarning, match="drawing a new one"):
        model, params = models.from_pretrained(
            minilm_dir, architecture="BertForSequenceClassification", num_labels=3, pooling="mean"
        )
    expected = lj.merge(params, lj.load_adapter(run / "adapter.safetensors", params), spec)
    _, back = models.from_pretrained(merged_dir, pooling=models.sentence_pooling(merged_dir))
    _assert_same(back, expected)


def test_train_resumes_and_refuses_other_arguments(tmp_path):
    model_dir, task = _tiny_encoder(tmp_path / "encoder"), _pair_task(tmp_path / "task")
    run = tmp_path / "run"
    args = ["train", model_dir, task, "--text-columns", "sentence1,sentence2", "--steps", "6", "--batch-size", "4"]
    args += ["--max-length", "16", "--checkpoint-every", "3", "--no-progress", "--out", run]
    # An attempt that fails before its first checkpoint leaves nothing to resume: the corrected one is not refused.
    assert "--max-length 64 exceeds the model's 32" in refused(*args, "--max-length", "64")
    assert (run / "run.json").is_file()
    out = lora_jax_cli(*args).stdout
    assert "matthews_corrcoef" in out
    unbroken = _tensors_and_metadata(run / "adapter.safetensors")
    scores = json.loads((run / "run.json").read_text())["scores"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "6"]

    # Rematerialized blocks recompute the same activations: the same adapters, and a word on XLA:CPU's scheduler.
    assert "not a policy" in refused(*args[:-1], tmp_path / "remat", "--remat", "everything")
    rematted = lora_jax_cli(*args[:-1], tmp_path / "remat", "--remat", "nothing_saveable")
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in rematted.stderr
    for key, value in _tensors_and_metadata(tmp_path / "remat" / "adapter.safetensors")[0].items():
        np.testing.assert_allclose(value, unbroken[0][key], atol=1e-6, err_msg=key)

    # A run stopped after step 3 continues from there and ends where the unbroken one did.
    shutil.rmtree(run / "checkpoints" / "6")
    (run / "adapter.safetensors").unlink()
    done = lora_jax_cli(*args)
    assert "resuming from step 3 of 6" in done.stderr
    resumed = _tensors_and_metadata(run / "adapter.safetensors")
    assert resumed[1] == unbroken[1] and sorted(resumed[0]) == sorted(unbroken[0])
    for key, value in unbroken[0].items():
        np.testing.assert_array_equal(resumed[0][key], value, err_msg=key)
    record = json.loads((run / "run.json").read_text())
    assert record["scores"] == scores and record["resumed_from"] == 3
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [6, 6, 6, 6]  # train and eval records of both runs, the second window from step 4

    message = refused(*args[:-2], "--rank", "4", "--learning-rate", "0.01", "--out", run)
    assert str(run / "run.json") in message and "--rank 8 then, 4 now" in message and "--learning-rate" in message
    assert "--overwrite" in message
    (task / "dev.tsv").write_text((task / "dev.tsv").read_text() + "99\tmore\ttext\t1\n")
    assert "dev.tsv changed" in refused(*args)

    # --overwrite starts afresh with the new arguments.
    lora_jax_cli(*args[:-2], "--method", "head", "--overwrite", "--out", run)
    record = json.loads((run / "run.json").read_text())
    assert record["arguments"]["method"] == "head" and record["resumed_from"] is None
    assert [rule.name for rule in lj.LoraSpec.from_file(run / "adapter.safetensors").rules] == ["classifier"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


def _random_adapter(model, params, spec, path):
    lora = lj.init(jax.random.key(0), params, spec)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), lora)
    lj.save_adapter(path, params, lora, spec)
    return lora


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_merge_writes_a_model_that_reloads_exactly(tmp_path, name):
    model, params = models.from_pretrained(FIXTURES / name)
    spec = models.lora_spec(model, "all-linear", rank=2, alpha=4)
    lora = _random_adapter(model, params, spec, tmp_path / "adapter.safetensors")
    lora_jax_cli("merge", FIXTURES / name, tmp_path / "adapter.safetensors", "--out", tmp_path / "merged")
    _, back = models.from_pretrained(tmp_path / "merged")
    _assert_same(back, lj.merge(params, lora, spec))


def test_peft_export_import_round_trip(tmp_path):
    model_dir = FIXTURES / "tiny_bert_cls"
    model, params = models.from_pretrained(model_dir)
    spec = models.lora_spec(model, "qkvo", rank=2, alpha=4, head=True)
    lora = _random_adapter(model, params, spec, tmp_path / "adapter.safetensors")
    lora_jax_cli("export-peft", tmp_path / "adapter.safetensors", model_dir, "--out", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / peft.CONFIG).read_text())
    assert config["r"] == 2 and config["modules_to_save"] == ["classifier"]
    assert config["target_modules"] == ["attention.output.dense", "key", "query", "value"]  # not the MLP's dense
    lora_jax_cli("import-peft", tmp_path / "peft", model_dir, "--out", tmp_path / "back.safetensors")
    _assert_same(lj.load_adapter(tmp_path / "back.safetensors", params), lora)
    imported = lj.LoraSpec.from_file(tmp_path / "back.safetensors")
    assert lj.trainable_count(lj.init(jax.random.key(0), params, imported)) == lj.trainable_count(lora)
    message = refused("import-peft", tmp_path / "peft", model_dir, "--out", tmp_path / "back.safetensors")
    assert "back.safetensors exists; pass --overwrite" in message


def test_generate(tmp_path):
    model_dir = FIXTURES / "tiny_gpt2"
    model, params = models.from_pretrained(model_dir)
    prompt = [1, 2, 3, 4]

    def expected(tree):
        tokens = models.generate(model, tree, np.asarray([prompt]), 5, eos_token_id=model.config.eos_token_id)
        return ",".join(str(int(t)) for t in np.asarray(tokens)[0])

    out = lora_jax_cli("generate", model_dir, "--prompt-ids", "1,2,3,4", "--max-new-tokens", "5").stdout
    assert out.strip() == expected(params)
    spec = models.lora_spec(model, "qv", rank=2, alpha=4)
    lora = _random_adapter(model, params, spec, tmp_path / "adapter.safetensors")
    out = lora_jax_cli(
        "generate",
        model_dir,
        "--adapter",
        tmp_path / "adapter.safetensors",
        "--prompt-ids",
        "1,2,3,4",
        "--max-new-tokens",
        "5",
    ).stdout
    assert out.strip() == expected(lj.merge(params, lora, spec))
    assert "tokenizer.json not found" in refused("generate", model_dir, "--prompt", "hello")
    with_tokenizer = tmp_path / "with_tokenizer"
    shutil.copytree(model_dir, with_tokenizer)
    _tiny_tokenizer(with_tokenizer)
    ids, text = lora_jax_cli(
        "generate", with_tokenizer, "--prompt", "the film", "--max-new-tokens", "3"
    ).stdout.splitlines()
    assert ids.startswith("4,5,") and len(ids.split(",")) == 5 and text.startswith("the film")


def test_bad_input_is_one_line_with_exit_2(tmp_path, minilm_dir):
    missing = tmp_path / "nowhere"
    assert str(missing) in refused("describe", missing)
    task = _headerless_task(tmp_path / "task")
    message = refused(
        "train", minilm_dir, task, "--columns", "label,sentence", "--text-columns", "text", "--out", tmp_path / "r"
    )
    assert f"{task / 'train.tsv'}:1: no column 'text'" in message
    message = refused("train", minilm_dir, tmp_path / "no_data", "--out", tmp_path / "r")
    assert "no_data" in message
    assert "tiny_gpt2/tokenizer.json not found" in refused(
        "train", FIXTURES / "tiny_gpt2", task, "--out", tmp_path / "r"
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    message = refused("merge", FIXTURES / "tiny_gpt2", tmp_path / "a.safetensors", "--out", tmp_path / "out")
    assert f"{tmp_path / 'out' / 'config.json'} exists; pass --overwrite" in message
    assert "a.safetensors: no such adapter file" in refused(
        "merge", FIXTURES / "tiny_gpt2", tmp_path / "a.safetensors", "--out", tmp_path / "new"
    )
