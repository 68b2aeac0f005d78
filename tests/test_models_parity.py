"""Parity with Hugging Face transformers (float32, max abs diff <= 1e-4).

References come from scripts/make_model_fixtures.py, run once in a separate
environment with torch and transformers; these tests need neither.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

import lora_jax.models as models

FIXTURES = Path(__file__).parent / "fixtures" / "models"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "Stocks fell sharply after the report.",
]
TOL = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict:
    return dict(np.load(FIXTURES / "minilm.npz"))


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def minilm(request, minilm_dir):
    return models.from_pretrained(minilm_dir, scan_layers=request.param)


def test_tokenizer_matches_reference(minilm_dir, reference):
    batch = models.encode(models.load_tokenizer(minilm_dir), SENTENCES)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(batch[name], reference[name])


def test_minilm_hidden_states_and_pooler(minilm, reference):
    model, params = minilm
    out = jax.jit(model.apply)(
        {"params": params}, reference["input_ids"], reference["attention_mask"], reference["token_type_ids"]
    )
    assert out.hidden_states.shape == reference["hidden_states"].shape
    assert out.hidden_states.shape[::2] == (4, 384)
    assert np.abs(np.asarray(out.hidden_states) - reference["hidden_states"]).max() <= TOL
    assert np.abs(np.asarray(out.pooled) - reference["pooled"]).max() <= TOL


def test_minilm_sentence_embeddings(minilm, minilm_dir, reference):
    model, params = minilm
    tokenizer = models.load_tokenizer(minilm_dir)
    embeddings = models.embed_texts(model, params, tokenizer, SENTENCES)
    assert embeddings.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)
    assert np.abs(embeddings - reference["embeddings"]).max() <= TOL


@pytest.mark.parametrize(
    ("name", "scan"),
    [
        ("tiny_gpt2", False),
        ("tiny_gpt2", True),
        ("tiny_llama", False),
        ("tiny_llama", True),
        ("tiny_llama_tied", False),  # biases, tied head, one key/value head
    ],
)
def test_decoder_logits_and_greedy_generation(name, scan):
    expected = np.load(FIXTURES / name / "expected.npz")
    model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan)
    logits = jax.jit(model.apply)({"params": params}, expected["input_ids"]).logits
    assert logits.shape == expected["logits"].shape
    assert np.abs(np.asarray(logits) - expected["logits"]).max() <= TOL
    steps = expected["generated"].shape[1] - expected["prompt"].shape[1]
    generated = models.generate(model, params, expected["prompt"], steps)
    np.testing.assert_array_equal(np.asarray(generated), expected["generated"])


def test_bert_classifier_logits():
    expected = np.load(FIXTURES / "tiny_bert_cls" / "expected.npz")
    model, params = models.from_pretrained(FIXTURES / "tiny_bert_cls")
    assert isinstance(model, models.BertForSequenceClassification)
    assert set(params) == {"bert", "classifier"}
    logits = jax.jit(model.apply)(
        {"params": params}, expected["input_ids"], expected["attention_mask"], expected["token_type_ids"]
    )
    assert logits.shape == (2, 3)
    assert np.abs(np.asarray(logits) - expected["logits"]).max() <= TOL
