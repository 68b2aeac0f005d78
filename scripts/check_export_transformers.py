"""Check that Hugging Face transformers loads merged models exported by ``lora_jax.models.save_pretrained``.

Two steps in two environments, since the test one has no PyTorch:

    .venv/bin/python scripts/check_export_transformers.py export /tmp/exported       # lora_jax: merge, export, logits
    .venv-ref/bin/python scripts/check_export_transformers.py check /tmp/exported    # transformers: load, compare

``export`` merges a random LoRA adapter (every linear map, r=2) into each tiny fixture model
(BERT classifier, GPT-2 with its fused ``c_attn``, Llama untied and tied), writes the Hugging Face
directory and the merged model's logits on the fixture's inputs; ``check`` loads each directory with
``transformers.AutoModelFor...`` and compares its logits with them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "models"
MODELS = ("tiny_bert_cls", "tiny_gpt2", "tiny_llama", "tiny_llama_tied")
TOLERANCE = 1e-4


def export(out: Path) -> None:
    import jax

    import lora_jax as lj
    from lora_jax import models

    for name in MODELS:
        model, params = models.from_pretrained(FIXTURES / name)
        spec = models.lora_spec(model, "all-linear", rank=2, alpha=4)
        lora = lj.init(jax.random.key(0), params, spec)
        lora = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)
        merged = lj.merge(params, lora, spec)
        models.save_pretrained(out / name, model, merged, source=FIXTURES / name, overwrite=True)
        inputs = np.load(FIXTURES / name / "expected.npz")
        if "attention_mask" in inputs:
            masks = (inputs["attention_mask"], inputs["token_type_ids"])
            logits = model.apply({"params": merged}, inputs["input_ids"], *masks)
        else:
            logits = model.apply({"params": merged}, inputs["input_ids"]).logits
        np.savez(out / name / "jax_logits.npz", input_ids=inputs["input_ids"], logits=np.asarray(logits))
        extra = {k: inputs[k] for k in ("attention_mask", "token_type_ids") if k in inputs}
        np.savez(out / name / "inputs.npz", **extra)
        print(f"exported {name}")


def check(out: Path) -> None:
    import torch
    import transformers

    worst = 0.0
    for name in MODELS:
        directory = out / name
        architecture = json.loads((directory / "config.json").read_text())["architectures"][0]
        model = getattr(transformers, architecture).from_pretrained(directory).eval()
        expected = np.load(directory / "jax_logits.npz")
        extra = {k: torch.from_numpy(v).long() for k, v in np.load(directory / "inputs.npz").items()}
        with torch.no_grad():
            logits = model(torch.from_numpy(expected["input_ids"]).long(), **extra).logits.numpy()
        diff = float(np.abs(logits - expected["logits"]).max())
        worst = max(worst, diff)
        print(f"{name}: {architecture} loaded by transformers {transformers.__version__}; max |logit diff| {diff:.2e}")
    if worst > TOLERANCE:
        raise SystemExit(f"logits differ by {worst:.2e} > {TOLERANCE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("export", "check"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    (export if args.step == "export" else check)(args.out)


if __name__ == "__main__":
    main()
