"""Write tests/fixtures/peft_patterns/ and tests/fixtures/peft_patterns_rslora/: real PEFT LoRA adapters with
mixed per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``), random nonzero weights, and what PEFT
computes with them: the merged weights of every adapted module (``merge_and_unload``) and the logits for fixed
inputs, in ``expected.npz``.

``peft_patterns`` adapts the tiny BERT classifier (target_modules a list of names, standard scaling);
``peft_patterns_rslora`` adapts the tiny Llama (target_modules a regular expression, rsLoRA). Run it with a
reference environment that has torch, transformers and peft (never a dependency of lora_jax):

    python3 -m venv /work/.venv-ref
    /work/.venv-ref/bin/pip install torch transformers peft safetensors numpy
    /work/.venv-ref/bin/python scripts/make_peft_pattern_fixture.py
"""

import json
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BertForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "fixtures" / "models"

# Per-pattern comments say which modules PEFT gives the value to; the order matters (the first key that matches
# the end of a module name wins), and "alue" checks that a key only matches after a dot.
BERT = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["query", "value", "dense"],  # "dense" also takes bert.pooler.dense
    modules_to_save=["classifier"],
    rank_pattern={
        "layer.1.attention.self.query": 3,  # layer 1's query only
        "value": 2,  # both values
        r"encoder.layer.\d.output.dense": 1,  # the MLP outputs, not attention.output.dense
    },
    alpha_pattern={
        "alue": 999,  # matches nothing: "value" does not end in ".alue"
        "value": 64,  # both values: scale 64 / 2 = 32
        "layer.0.intermediate.dense": 2,
        "pooler.dense": 1.5,
    },
)

LLAMA = LoraConfig(
    r=4,
    lora_alpha=8,
    use_rslora=True,
    target_modules=r".*\.(q_proj|v_proj)",
    rank_pattern={"layers.1.self_attn.q_proj": 2},
    alpha_pattern={"v_proj": 32},
)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every adapter and saved-module weight random values, so each update is nonzero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def make(name: str, out: str, config: LoraConfig, seed: int) -> None:
    """Save the adapter PEFT makes from ``config`` on model ``name``, and PEFT's merged weights and logits."""
    folder = ROOT / "tests" / "fixtures" / out
    if name == "tiny_bert_cls":
        base = BertForSequenceClassification.from_pretrained(MODELS / name)
    else:
        base = AutoModelForCausalLM.from_pretrained(MODELS / name)
    model = get_peft_model(base.eval(), config).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    (folder / "README.md").unlink()  # PEFT's model card: not needed here
    config_file = folder / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["base_model_name_or_path"] = f"tests/fixtures/models/{name}"  # not this machine's absolute path
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    adapted = sorted(
        key.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
        for key, _ in model.named_parameters()
        if key.endswith(".lora_A.default.weight")
    )
    rng = np.random.default_rng(seed)
    ids = torch.tensor(rng.integers(1, base.config.vocab_size, (2, 7)))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.numpy()
        merged = model.merge_and_unload().state_dict()
    weights = {f"merged/{module}.weight": merged[f"{module}.weight"].numpy() for module in adapted}
    np.savez_compressed(
        folder / "expected.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(), logits=logits, **weights
    )
    print(folder, "adapted:", adapted)


make("tiny_bert_cls", "peft_patterns", BERT, seed=0)
make("tiny_llama", "peft_patterns_rslora", LLAMA, seed=1)
