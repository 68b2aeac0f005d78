"""Check that Hugging Face PEFT loads the DoRA and converted PiSSA adapters lora_jax exports, to lora_jax's logits.

Two steps in two environments, since the test one has no PyTorch:

    .venv/bin/python scripts/check_export_peft_variants.py export /tmp/variants      # lora_jax: adapters, logits
    .venv-ref/bin/python scripts/check_export_peft_variants.py check /tmp/variants   # PEFT: load, compare

``export`` writes four PEFT folders made by lora_jax alone, each with random nonzero values: DoRA on the tiny
BERT classifier (q, v, o and the head), DoRA with rsLoRA on every linear map of the tiny Llama in the scanned
layout, DoRA on GPT-2's ``Conv1D`` modules (stored ``[in, out]``: PEFT's ``fan_in_fan_out``), and a PiSSA
adapter on the tiny Llama (``pissa_init``, perturbed as if trained, ``pissa_to_lora``), with the logits of the
model lora_jax computes (for PiSSA: the residual base with the trained adapter).
``check`` loads each onto the original model with ``PeftModel.from_pretrained`` and compares the logits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "models"
TOLERANCE = 1e-4


def export(out: Path) -> None:
    import jax

    import lora_jax as lj
    from lora_jax import models
    from lora_jax.io import save_peft

    def perturbed(lora, seed):
        keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree_util.tree_leaves(lora))))
        return jax.tree_util.tree_map(lambda x: x * (1 + 0.1 * jax.random.normal(next(keys), x.shape)) + 0.05, lora)

    ids = np.random.default_rng(0).integers(1, 96, (2, 7))
    mask = np.ones_like(ids)
    cases = {
        "dora_bert": ("tiny_bert_cls", False, dict(targets=["q", "v", "o"], mode="dora", head=True)),
        "dora_llama_scanned": ("tiny_llama", True, dict(targets="all-linear", mode="dora", scaling="rslora")),
        "dora_gpt2": ("tiny_gpt2", False, dict(targets=["o", "fc", "proj"], mode="dora")),  # Conv1D, [in, out]
        "pissa_llama": ("tiny_llama", False, dict(targets="qkvo")),
    }
    for case, (name, scan, options) in cases.items():
        model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan)
        spec = models.lora_spec(model, options.pop("targets"), rank=2, alpha=4, **options)
        if case.startswith("pissa"):
            residual, initial = lj.pissa_init(params, spec)
            trained = perturbed(initial, 1)
            served = lj.merge(residual, trained, spec)
            lora, spec = lj.pissa_to_lora(params, trained, spec, initial)
        else:
            lora = perturbed(lj.init(jax.random.key(0), params, spec), 1)
            served = lj.merge(params, lora, spec)
        save_peft(out / case, params, lora, spec, models.hf_names(model), overwrite=True, base_model_name_or_path=name)
        if name == "tiny_bert_cls":
            logits = model.apply({"params": served}, ids, mask)
        else:
            logits = model.apply({"params": served}, ids).logits
        np.savez(out / case / "jax_logits.npz", input_ids=ids, attention_mask=mask, logits=np.asarray(logits))
        print(f"exported {case}")


def check(out: Path) -> None:
    import json

    import peft
    import torch
    from transformers import AutoModelForCausalLM, BertForSequenceClassification

    worst = 0.0
    for folder in sorted(p for p in out.iterdir() if (p / "adapter_config.json").is_file()):
        config = json.loads((folder / "adapter_config.json").read_text())
        name = config["base_model_name_or_path"]
        loader = BertForSequenceClassification if name == "tiny_bert_cls" else AutoModelForCausalLM
        model = peft.PeftModel.from_pretrained(loader.from_pretrained(FIXTURES / name), folder).eval()
        expected = np.load(folder / "jax_logits.npz")
        with torch.no_grad():
            logits = model(
                input_ids=torch.from_numpy(expected["input_ids"]).long(),
                attention_mask=torch.from_numpy(expected["attention_mask"]).long(),
            ).logits.numpy()
        diff = float(np.abs(logits - expected["logits"]).max())
        worst = max(worst, diff)
        print(
            f"{folder.name}: r={config['r']} use_dora={config['use_dora']} loaded by PEFT {peft.__version__}; "
            f"max |logit diff| {diff:.2e}"
        )
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
