"""Write tests/fixtures/peft_bias_*/: Hugging Face PEFT LoRA adapters for the tiny BERT classifier fixture that
also train biases (``bias="all"``: every bias of the model; ``"lora_only"``: the biases of the adapted modules),
with random nonzero weights and biases, and the logits PEFT computes with each.

    .venv-ref/bin/python scripts/make_peft_bias_fixture.py     # needs torch, transformers, peft
"""

from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "tests" / "fixtures" / "models" / "tiny_bert_cls"

CASES = {  # folder: (bias, target_modules, modules_to_save)
    "peft_bias_all": ("all", ["query", "value"], ["classifier"]),
    "peft_bias_lora_only": ("lora_only", ["query", "value"], ["classifier"]),
    # query kept whole: bias="all" also saves copies of its [32] bias, which lora_jax holds as [heads, head_dim]
    "peft_bias_all_saved": ("all", ["value"], ["query", "classifier"]),
}
for seed, (folder, (bias, targets, saved)) in enumerate(CASES.items()):
    out = ROOT / "tests" / "fixtures" / folder
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(BASE).eval()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, modules_to_save=saved, bias=bias)
    model = get_peft_model(model, config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # the LoRA factors, the saved head and the biases PEFT trains
                param.copy_(0.3 * torch.randn_like(param))
    model.save_pretrained(out)
    ids = torch.tensor(np.random.default_rng(3).integers(1, model.config.vocab_size, (2, 7)))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.numpy()
    np.savez(out / "expected.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(), logits=logits)
    print(out, logits)
