"""The baseline users know: Hugging Face PEFT on PyTorch CPU, same model, shapes and threads as bench_train.

Run by ``experiments.bench_train`` with a Python that has torch, transformers and peft
(``pip install torch==2.13.0 transformers peft``); prints one JSON line.

    python -m experiments.peft_baseline --worker '{"length": 64, "method": "lora", "repeats": 8, "threads": 2,
                                                   "model_path": "...", "compile": false}'

``"compile": true`` wraps the model in ``torch.compile`` (inductor, which needs a C++ compiler);
``"dropout": false`` sets the model's dropout rates to zero.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def worker(job: dict) -> dict:
    import torch
    from transformers import BertForSequenceClassification

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    off = {} if job.get("dropout", True) else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = BertForSequenceClassification.from_pretrained(job["model_path"], num_labels=2, **off)
    if job["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, modules_to_save=["classifier"]
        )
        model = get_peft_model(model, config)
    model.train()
    forward = torch.compile(model) if job.get("compile") else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    rng = np.random.default_rng(0)
    batch_size, length = 32, job["length"]
    ids = torch.tensor(rng.integers(1, model.config.vocab_size, (batch_size, length)))
    mask = torch.ones_like(ids)
    labels = torch.tensor(rng.integers(0, 2, batch_size))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    step()  # warm-up (and, with "compile", torch.compile's tracing and code generation)
    times = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        **job,
        "step_ms": 1000 * float(np.median(times)),
        "trainable_params": sum(p.numel() for p in params),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True)
    print(json.dumps(worker(json.loads(parser.parse_args().worker))))
