"""Write tests/fixtures/peft/: a Hugging Face PEFT LoRA adapter for the tiny BERT classifier fixture,
with random nonzero weights, and the logits PEFT computes with it.

    .venv-ref/bin/python scripts/make_peft_fixture.py     # needs torch, transformers, peft
"""

from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "tests" / "fixtures" / "models" / "tiny_bert_cls"
OUT = ROOT / "tests" / "fixtures" / "peft"

torch.manual_seed(0)
model = BertForSequenceClassification.from_pretrained(BASE).eval()
config = LoraConfig(
    r=2,
    lora_alpha=4,
    target_modules=["query", "value", "attention.output.dense"],
    modules_to_save=["classifier"],
    rank_pattern={"bert.encoder.layer.1.attention.self.value": 3},
)
model = get_peft_model(model, config).eval()
with torch.no_grad():
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            param.copy_(0.3 * torch.randn_like(param))
model.save_pretrained(OUT)
ids = torch.tensor(np.random.default_rng(3).integers(1, model.config.vocab_size, (2, 7)))
mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits.numpy()
np.savez(OUT / "expected.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(), logits=logits)
print(OUT, logits)
