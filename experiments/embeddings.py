"""Cosine similarities of all-MiniLM-L6-v2 sentence embeddings computed with lora_jax.models.

Paraphrase pairs should score well above unrelated pairs. Writes a markdown
table to ``experiments/results/embeddings.md`` (or ``--out``).

    .venv/bin/python -m experiments.embeddings
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import lora_jax.models as models
from experiments import assets, report
from lora_jax.io.atomic import write_text

PAIRS = [
    ("paraphrase", "A man is eating food.", "A man is eating a piece of bread."),
    ("paraphrase", "The cat sits on the mat.", "A cat is sitting on a rug."),
    ("paraphrase", "How do I reset my password?", "What are the steps to change my password?"),
    ("paraphrase", "The weather is lovely today.", "It is a beautiful sunny day."),
    ("unrelated", "A man is eating food.", "The stock market fell sharply today."),
    ("unrelated", "The cat sits on the mat.", "Quantum computers use qubits."),
    ("unrelated", "How do I reset my password?", "The orchestra played Beethoven's fifth symphony."),
    ("unrelated", "The weather is lovely today.", "He repaired the bicycle's broken chain."),
]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "embeddings.md"


def similarities(pairs: list[tuple[str, str, str]]) -> list[float]:
    """Cosine similarity of each pair's two sentences under all-MiniLM-L6-v2."""
    path = assets.minilm_path()
    model, params = models.from_pretrained(path)
    tokenizer = models.load_tokenizer(path, max_length=256)
    left = models.embed_texts(model, params, tokenizer, [a for _, a, _ in pairs])
    right = models.embed_texts(model, params, tokenizer, [b for _, _, b in pairs])
    return [float(x) for x in np.sum(left * right, axis=-1)]


def table(pairs: list[tuple[str, str, str]], scores: list[float]) -> str:
    lines = ["| kind | sentence A | sentence B | cosine |", "|---|---|---|---:|"]
    lines += [f"| {kind} | {a} | {b} | {s:.4f} |" for (kind, a, b), s in zip(pairs, scores)]
    para = [s for (k, _, _), s in zip(pairs, scores) if k == "paraphrase"]
    other = [s for (k, _, _), s in zip(pairs, scores) if k == "unrelated"]
    lines += [
        "",
        f"Lowest paraphrase score: {min(para):.4f}; highest unrelated score: {max(other):.4f}.",
    ]
    return "\n".join(lines)


def main(out: Path = DEFAULT_OUT, overwrite: bool = False) -> list[float]:
    """Score the pairs and write the table to ``out``.

    ``DEFAULT_OUT`` is this experiment's own results table and is rewritten; another existing
    file is replaced only with ``overwrite``.
    """
    scores = similarities(PAIRS)
    text = "# all-MiniLM-L6-v2 sentence similarities (lora_jax.models, float32)\n\n" + table(PAIRS, scores) + "\n"
    print(text)
    write_text(out, text, overwrite=overwrite or Path(out).resolve() == DEFAULT_OUT)
    return scores


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args()
    if args.out.resolve() != DEFAULT_OUT:
        report.refuse_existing(parser, [args.out], args.overwrite)
    main(args.out, args.overwrite)
