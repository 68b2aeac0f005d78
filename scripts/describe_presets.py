"""Writes docs/presets.md: ``lora_jax.describe`` for each model preset (shapes only, nothing allocated)."""

from pathlib import Path

import jax
import jax.numpy as jnp

import lora_jax as lj
from lora_jax import models

MODELS = {
    "all-MiniLM-L6-v2 (BERT, 6 layers, width 384)": models.BertModel(
        models.BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        )
    ),
    "GPT-2 small (12 layers, width 768)": models.GPT2LMHeadModel(models.GPT2Config()),
    "GPT-2 small, c_attn kept whole (fused_qkv=True)": models.GPT2LMHeadModel(models.GPT2Config(fused_qkv=True)),
    "Llama, 1B-shaped (16 layers, width 2048, 32 heads, 8 KV heads)": models.LlamaForCausalLM(
        models.LlamaConfig(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
        )
    ),
}


def main() -> None:
    out = [
        "# LoRA presets of the bundled models",
        "",
        "`lora_jax.models.lora_spec(model, targets, rank=8)`; tables from `lora_jax.describe` on `jax.eval_shape` "
        "params. Scanned layouts (`scan_layers=True`) give the same counts with one stacked row per kernel.",
        "",
    ]
    for title, model in MODELS.items():
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
        for targets in ("qv", "qkvo", "all-linear"):
            description = lj.describe(params, models.lora_spec(model, targets, rank=8))
            lines = str(description).splitlines()
            shown = lines[:2] + lines[2 : 2 + (4 if targets != "all-linear" else 7)] + ["..."] + lines[-1:]
            out += [f"## {title}: `{targets}`", "", "```", *shown, "```", ""]
    path = Path(__file__).resolve().parents[1] / "docs" / "presets.md"
    path.write_text("\n".join(out))
    print(path)


if __name__ == "__main__":
    main()
