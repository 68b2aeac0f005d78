"""experiments/embeddings.py runs and ranks paraphrases above unrelated pairs."""

import importlib.util
from pathlib import Path

import pytest

import lora_jax.models as models

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "embeddings.py"


def test_embeddings_experiment_ranks_paraphrases_first(tmp_path, capsys):
    try:
        models.minilm_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    spec = importlib.util.spec_from_file_location("embeddings_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "embeddings.md"
    scores = module.main(out)
    kinds = [kind for kind, _, _ in module.PAIRS]
    paraphrase = [s for k, s in zip(kinds, scores) if k == "paraphrase"]
    unrelated = [s for k, s in zip(kinds, scores) if k == "unrelated"]
    assert min(paraphrase) > max(unrelated) + 0.3
    assert min(paraphrase) > 0.6 and max(unrelated) < 0.3
    table = out.read_text()
    assert table.count("| paraphrase |") == len(paraphrase)
    assert "| unrelated |" in table
    assert "cosine" in capsys.readouterr().out
