"""Write the PEFT fixtures of the LoRA variants: DoRA adapters and a PiSSA adapter before and after PEFT's
pissa-to-lora conversion, each with what PEFT computes with it.

- ``tests/fixtures/peft_dora/``: DoRA (``use_dora=True``) on the tiny BERT classifier (query, value and the
  attention output; layer 1's value at another rank; the classifier kept whole).
- ``tests/fixtures/peft_dora_llama/``: DoRA with rsLoRA on the tiny Llama (q, v, o: multi-axis inputs and outputs).
- ``tests/fixtures/peft_pissa/``: PiSSA (``init_lora_weights="pissa"``) on the tiny Llama. ``initial/`` is the
  adapter right after PiSSA's SVD, ``trained/`` the same after a simulated training step (still ``"pissa"``:
  its weights apply to the residual base), ``converted/`` what ``save_pretrained(...,
  path_initial_model_for_weight_conversion=initial)`` writes: a plain LoRA of rank 2r against the original base.

Every adapter gets random nonzero values (B nonzero; DoRA magnitudes perturbed). Each ``expected.npz`` holds the
inputs, PEFT's logits and PEFT's merged weights (``merge_and_unload``) of every adapted module; PiSSA's also the
residual base weights PEFT computed and the logits of the original base with the converted adapter (which PEFT
must agree with). Run it with the reference environment (torch, transformers, peft; never a dependency):

    /work/.venv-ref/bin/python scripts/make_peft_variants_fixture.py

``scripts/check_export_peft_variants.py`` checks the other direction: what lora_jax exports, PEFT loads.
"""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BertForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "fixtures" / "models"
FIXTURES = ROOT / "tests" / "fixtures"

DORA_BERT = LoraConfig(
    r=2,
    lora_alpha=4,
    use_dora=True,
    target_modules=["query", "value", "attention.output.dense"],
    modules_to_save=["classifier"],
    rank_pattern={"bert.encoder.layer.1.attention.self.value": 3},
)
DORA_LLAMA = LoraConfig(
    r=4, lora_alpha=8, use_dora=True, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"]
)
PISSA = LoraConfig(
    r=4,
    lora_alpha=8,
    init_lora_weights="pissa",
    target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
    rank_pattern={"layers.1.self_attn.v_proj": 2},
    alpha_pattern={"o_proj": 2},
)


def base_model(name: str) -> torch.nn.Module:
    if name == "tiny_bert_cls":
        return BertForSequenceClassification.from_pretrained(MODELS / name).eval()
    return AutoModelForCausalLM.from_pretrained(MODELS / name).eval()


def inputs(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(np.random.default_rng(seed).integers(1, vocab, (2, 7)))
    return ids, torch.tensor([[1] * 7, [1] * 5 + [0] * 2])


def logits_of(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.numpy()


def adapted_modules(model: torch.nn.Module) -> list[str]:
    suffix = ".lora_A.default.weight"
    return sorted(
        k.removeprefix("base_model.model.").removesuffix(suffix)
        for k, _ in model.named_parameters()
        if k.endswith(suffix)
    )


def merged_weights(model: torch.nn.Module, modules: list[str]) -> dict[str, np.ndarray]:
    """Return PEFT's merged weight of each adapted module (the model is merged in place)."""
    with torch.no_grad():
        merged = model.merge_and_unload().state_dict()
    return {f"merged/{m}.weight": merged[f"{m}.weight"].numpy() for m in modules}


def tidy(folder: Path, name: str) -> None:
    """Drop PEFT's model card and record the base by its path in this repository, not this machine's."""
    (folder / "README.md").unlink(missing_ok=True)
    config_file = folder / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["base_model_name_or_path"] = f"tests/fixtures/models/{name}"
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Give LoRA factors ``scale``-sized random additions and DoRA magnitudes a random gain near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * noise)
            elif "lora_" in name or "modules_to_save" in name:
                param.add_(scale * noise)


def make_dora(name: str, out: str, config: LoraConfig, seed: int) -> None:
    folder = FIXTURES / out
    shutil.rmtree(folder, ignore_errors=True)
    model = get_peft_model(base_model(name), copy.deepcopy(config)).eval()
    perturb(model, seed, 0.3)
    model.save_pretrained(folder)
    tidy(folder, name)
    ids, mask = inputs(model.config.vocab_size, seed)
    logits = logits_of(model, ids, mask)
    modules = adapted_modules(model)
    # PEFT reloads its own file to the same numbers.
    reloaded = PeftModel.from_pretrained(base_model(name), folder).eval()
    assert np.abs(logits_of(reloaded, ids, mask) - logits).max() < 1e-6
    merged = merged_weights(model, modules)
    np.savez_compressed(
        folder / "expected.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(), logits=logits, **merged
    )
    print(folder, "adapted:", modules)


def make_pissa(name: str, out: str, config: LoraConfig, seed: int) -> None:
    folder = FIXTURES / out
    shutil.rmtree(folder, ignore_errors=True)
    model = get_peft_model(base_model(name), copy.deepcopy(config)).eval()
    modules = adapted_modules(model)
    residual = {
        f"residual/{m}.weight": model.get_submodule(f"base_model.model.{m}").base_layer.weight.detach().numpy().copy()
        for m in modules
    }
    model.save_pretrained(folder / "initial")
    perturb(model, seed, 0.05)  # a training step's worth of change
    model.save_pretrained(folder / "trained")
    model.save_pretrained(folder / "converted", path_initial_model_for_weight_conversion=str(folder / "initial"))
    for sub in ("initial", "trained", "converted"):
        tidy(folder / sub, name)
    ids, mask = inputs(model.config.vocab_size, seed)
    logits = logits_of(model, ids, mask)
    converted = PeftModel.from_pretrained(base_model(name), folder / "converted").eval()
    converted_logits = logits_of(converted, ids, mask)
    # PEFT's conversion: the original base with the rank-2r adapter is the residual base with the trained one.
    assert np.abs(converted_logits - logits).max() < 1e-4, np.abs(converted_logits - logits).max()
    # PEFT loads the unconverted adapter by running PiSSA's SVD on the original base again.
    reloaded = PeftModel.from_pretrained(base_model(name), folder / "trained").eval()
    assert np.abs(logits_of(reloaded, ids, mask) - logits).max() < 1e-4
    merged = merged_weights(converted, modules)
    np.savez_compressed(
        folder / "expected.npz",
        input_ids=ids.numpy(),
        attention_mask=mask.numpy(),
        logits=logits,
        converted_logits=converted_logits,
        **residual,
        **merged,
    )
    print(folder, "adapted:", modules)


if __name__ == "__main__":
    print("peft", peft.__version__)
    torch.manual_seed(0)
    make_dora("tiny_bert_cls", "peft_dora", DORA_BERT, seed=0)
    make_dora("tiny_llama", "peft_dora_llama", DORA_LLAMA, seed=1)
    make_pissa("tiny_llama", "peft_pissa", PISSA, seed=2)
