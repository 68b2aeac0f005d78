"""``lora-jax train-lm``: decoder fine-tuning (LoRA and QLoRA) on prompt-completion JSON Lines, checked line by line."""

import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import lora_jax_cli
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as token_models

from lora_jax import cli, data, training

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"
WORDS = ["add", *(f"w{i}" for i in range(40))]


def _model_dir(tmp_path: Path, name: str) -> Path:
    """A copy of a tiny decoder fixture with a word-level ``tokenizer.json`` (its EOS id kept as ``<eos>``)."""
    out = tmp_path / name
    out.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / name / file, out / file)
    eos = json.loads((out / "config.json").read_text())["eos_token_id"]
    free = iter(i for i in range(96) if i != eos)
    vocab = {"<eos>": eos, "<unk>": next(free), **{word: next(free) for word in WORDS}}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # pyright: ignore[reportAttributeAccessIssue]
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def _data_dir(tmp_path: Path, train_lines=None) -> Path:
    """``add wi`` -> ``w(i+1) w(i+2)``: a rule the model learns in a few dozen steps."""
    out = tmp_path / "data"
    out.mkdir()

    def pairs(indices):
        return [json.dumps({"prompt": f"add w{i}", "completion": f" w{i + 1} w{i + 2}"}) for i in indices]

    lines = pairs(range(36)) if train_lines is None else train_lines
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    (out / "dev.jsonl").write_text("\n".join(pairs(range(0, 36, 3))) + "\n")
    return out


def test_qlora_on_nf4_scanned_learns_the_completions_and_generate_continues_with_them(tmp_path):
    model_dir, data_dir, run = _model_dir(tmp_path, "tiny_llama"), _data_dir(tmp_path), tmp_path / "run"
    args = ["train-lm", model_dir, data_dir, "--quantize", "nf4", "--scan-layers", "--steps", "60", "--batch-size", "8"]
    args += ["--max-length", "16", "--learning-rate", "1e-2", "--out", run, "--no-progress"]
    lora_jax_cli(*args)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["arguments"]["quantize"] == "nf4"
    # The rule is learned: from chance (ln 96 = 4.6 nats) to under one nat per completion token ...
    assert record["scores"]["nll"] < 1.0
    # ... and the adapter continues a dev prompt with its completion and the end of sequence.
    done = lora_jax_cli("generate", model_dir, "--adapter", run / "adapter.safetensors", "--prompt", "add w9")
    assert done.stdout.splitlines()[-1] == "add w9 w10 w11 <eos>"
    # Other arguments for the same run directory are refused, naming what differs.
    done = lora_jax_cli(*args[:-3], "--rank", "4", "--out", run, "--no-progress", expect=2)
    assert "--rank 8 then, 4 now" in done.stderr


@pytest.mark.slow  # two training runs in subprocesses
def test_loss_in_chunks_trains_the_same_adapter_and_dev_is_scored_on_schedule(tmp_path):
    model_dir, data_dir = _model_dir(tmp_path, "tiny_gpt2"), _data_dir(tmp_path)
    common = ["train-lm", model_dir, data_dir, "--steps", "4", "--batch-size", "8", "--max-length", "16"]
    common += ["--learning-rate", "1e-2", "--no-progress"]
    lora_jax_cli(*common, "--out", tmp_path / "whole", "--eval-every", "2")
    lora_jax_cli(*common, "--out", tmp_path / "chunks", "--loss-chunk", "3")
    whole, chunks = (json.loads((tmp_path / run / "run.json").read_text()) for run in ("whole", "chunks"))
    assert chunks["arguments"]["loss_chunk"] == 3 and whole["arguments"]["loss_chunk"] is None
    assert whole["scores"]["nll"] == pytest.approx(chunks["scores"]["nll"], rel=1e-5)
    assert whole["scores"]["nll"] < 4.4  # below chance (ln 96 = 4.56): it trained
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["split"] == "eval"] == [2, 4]


def test_only_the_completion_and_its_end_count_in_the_loss(tmp_path):
    model_dir = _model_dir(tmp_path, "tiny_gpt2")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = {word: tokenizer.token_to_id(word) for word in WORDS}
    file = tmp_path / "x.jsonl"
    # U+2028 is a line break to str.splitlines(), not to JSON Lines; "0 w2" joins "w1" into one token "w10".
    file.write_text('{"prompt": "add w1", "completion": " w2 w3"}\n\n{"text": "w4 w5\u2028"}\n')
    examples = data.read_completions(file)
    assert [e.line for e in examples] == [1, 3]  # blank lines skipped, numbering kept
    encoded = data.encode_completions(examples, tokenizer, 16, eos_id=0, pad_id=0, file=file)
    np.testing.assert_array_equal(encoded.input_ids[0], [ids["add"], ids["w1"], ids["w2"], ids["w3"], 0])
    np.testing.assert_array_equal(encoded.input_ids[1], [ids["w4"], ids["w5"], 0])
    batch = next(data.batches(encoded, 3, seed=None, buckets=(8,), drop_remainder=False))
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][1], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][2], np.zeros(8))  # a filler row counts nothing
    np.testing.assert_array_equal(batch["attention_mask"][:2].sum(1), [5, 3])
    # Predicted tokens: the completion's two and EOS; the text's second and EOS (its first has no context).
    _, count = training.next_token_nll(jnp.zeros((3, 8, 96)), batch["input_ids"], batch["loss_mask"])
    assert float(count) == 5.0
    cut = data.encode_completions(examples, tokenizer, 3, eos_id=0, pad_id=0, file=file)
    np.testing.assert_array_equal(cut.input_ids[0], [ids["add"], ids["w1"], ids["w2"]])  # cut from the end
    assert (encoded.cut, cut.cut) == (0, 1)  # counted, and said by train-lm
    # The text is tokenized whole; a token that straddles prompt and completion holds completion text: it counts.
    joined = data.encode_completions([data.Completion("add w1", "0 w2", 1)], tokenizer, 8, 0, 0, file)
    np.testing.assert_array_equal(joined.input_ids[0], [ids["add"], ids["w10"], ids["w2"], 0])
    assert joined.prompt_lengths.tolist() == [1]


BAD_LINES = [
    ("{'prompt': 'a'}", r"train.jsonl:2: not JSON"),
    ('["add w1", "w2"]', r"train.jsonl:2: a list, not a JSON object"),
    ('{"prompt": "add w1", "completon": "w2"}', r"train.jsonl:2: keys \['completon', 'prompt'\]"),
    ('{"prompt": "add w1", "completion": "w2", "id": 7}', r"train.jsonl:2: keys \['completion', 'id', 'prompt'\]"),
    ('{"prompt": "a", "prompt": "add w1", "completion": " w2"}', r"train.jsonl:2: key 'prompt' appears twice"),
    ('{"prompt": "add w1 \\ud800", "completion": " w2"}', r"train.jsonl:2: 'prompt' holds surrogates not allowed"),
    ('{"prompt": "add w1", "completion": 2}', r"train.jsonl:2: 'completion' is a int, not a string"),
    ('{"prompt": "add w1", "completion": "  "}', r"train.jsonl:2: the completion is empty"),
    ('{"text": ""}', r"train.jsonl:2: the text is empty"),
    ('{"prompt": "' + " ".join(["w1"] * 20) + '", "completion": " w2"}', r"train.jsonl:2: the prompt takes 20 of"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m.split(": ", 1)[1][:16] for _, m in BAD_LINES])
def test_a_bad_line_is_refused_naming_file_and_line(tmp_path, capsys, line, message):
    good = json.dumps({"prompt": "add w1", "completion": " w2 w3"})
    model_dir, data_dir = _model_dir(tmp_path, "tiny_gpt2"), _data_dir(tmp_path, [good, line, good])
    status = cli.main(["train-lm", str(model_dir), str(data_dir), "--max-length", "16", "--out", str(tmp_path / "r")])
    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("lora-jax: error: ") and str(data_dir) in error
    assert re.search(message, error), error
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_inputs_that_cannot_train_are_refused(tmp_path, capsys):
    model_dir, run = _model_dir(tmp_path, "tiny_gpt2"), str(tmp_path / "r")

    def refused(*args):
        assert cli.main(["train-lm", *map(str, args), "--out", run]) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("\n\n")
    (empty / "dev.jsonl").write_text('{"text": "w1 w2"}\n')
    assert "train.jsonl: no examples" in refused(model_dir, empty)
    data_dir = _data_dir(tmp_path)
    assert "--max-length 64 exceeds the model's n_positions = 32" in refused(model_dir, data_dir, "--max-length", "64")
    assert "fewer than --batch-size 64" in refused(model_dir, data_dir, "--max-length", "16", "--batch-size", "64")
    assert "--learning-rate must be a finite number above 0" in refused(model_dir, data_dir, "--learning-rate", "0")
    bert = tmp_path / "bert"
    shutil.copytree(FIXTURES / "tiny_bert_cls", bert)
    shutil.copy(model_dir / "tokenizer.json", bert / "tokenizer.json")
    assert "not a decoder; train-lm takes GPT-2 or Llama models" in refused(bert, data_dir, "--max-length", "16")
    # A tokenizer with ids past the model's vocabulary is another model's.
    wide = tmp_path / "wide"
    shutil.copytree(model_dir, wide)
    vocab = {"<eos>": 0, "<unk>": 1, **{word: 100 + i for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # pyright: ignore[reportAttributeAccessIssue]
    tokenizer.save(str(wide / "tokenizer.json"))
    assert "outside the model's vocabulary of 96" in refused(wide, data_dir, "--max-length", "16")
