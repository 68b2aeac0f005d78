"""experiments.embeddings runs and ranks paraphrases above unrelated pairs."""

from experiments import embeddings


def test_embeddings_experiment_ranks_paraphrases_first(minilm_dir, tmp_path, capsys):
    out = tmp_path / "embeddings.md"
    scores = embeddings.main(out)
    kinds = [kind for kind, _, _ in embeddings.PAIRS]
    paraphrase = [s for k, s in zip(kinds, scores) if k == "paraphrase"]
    unrelated = [s for k, s in zip(kinds, scores) if k == "unrelated"]
    assert min(paraphrase) > max(unrelated) + 0.3
    assert min(paraphrase) > 0.6 and max(unrelated) < 0.3
    table = out.read_text()
    assert table.count("| paraphrase |") == len(paraphrase)
    assert "| unrelated |" in table
    assert "cosine" in capsys.readouterr().out
