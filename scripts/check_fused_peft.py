"""Check that PEFT loads a q,v adapter on GPT-2's fused ``c_attn`` exported by ``lora_jax.io.save_peft``.

Two steps in two environments, since the test one has no PyTorch:

    .venv/bin/python scripts/check_fused_peft.py export /tmp/fused        # lora_jax: adapter, PEFT folder, logits
    .venv-ref/bin/python scripts/check_fused_peft.py check /tmp/fused     # transformers + PEFT: load, compare

``export`` loads the tiny GPT-2 fixture with ``fused_qkv=True``, draws q and v slice adapters (r=2) and an
MLP adapter of another rank, writes the PEFT folder and the logits of the adapted model (the factored path);
``check`` loads the fixture with ``transformers``, the folder with ``peft.PeftModel.from_pretrained``, and
compares its logits, unmerged and merged, with them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "models" / "tiny_gpt2"
TOLERANCE = 1e-4


def export(out: Path) -> None:
    import jax

    import lora_jax as lj
    from lora_jax import models
    from lora_jax.io import save_peft

    model, params = models.from_pretrained(FIXTURE, fused_qkv=True)
    spec = models.lora_spec(model, "qv", rank=2, alpha=4) + models.lora_spec(model, ["fc"], rank=3, alpha=5)
    lora = lj.init(jax.random.key(0), params, spec)
    keys = iter(jax.random.split(jax.random.key(1), 32))
    lora = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), lora)
    save_peft(out, params, lora, spec, models.hf_names(model), overwrite=True)
    ids = np.load(FIXTURE / "expected.npz")["input_ids"]
    forward = lj.factored(lambda p, x: model.apply({"params": p}, x).logits, spec)
    np.savez(out / "jax_logits.npz", input_ids=ids, logits=np.asarray(forward(params, lora, ids)))
    print(f"exported {out}")


def check(out: Path) -> None:
    import peft
    import torch
    import transformers

    base = transformers.GPT2LMHeadModel.from_pretrained(FIXTURE).eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    expected = np.load(out / "jax_logits.npz")
    ids = torch.from_numpy(expected["input_ids"]).long()
    worst = 0.0
    with torch.no_grad():
        for label, run in (("unmerged", model), ("merged", model.merge_and_unload())):
            diff = float(np.abs(run(ids).logits.numpy() - expected["logits"]).max())
            worst = max(worst, diff)
            print(f"PEFT {peft.__version__} {label}: max |logit diff| {diff:.2e}")
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
