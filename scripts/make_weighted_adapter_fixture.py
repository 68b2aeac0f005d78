"""Write tests/fixtures/peft_weighted/expected.npz: what real PEFT's ``add_weighted_adapter`` makes.

A two-layer torch model (``fc1`` [8 -> 7], ``fc2`` [7 -> 6]) gets four LoRA adapters with random nonzero factors:
``a1`` (r=2, alpha=4), ``a2`` (r=3, alpha=6, rsLoRA), ``a3`` (r=2, alpha=1), ``a4`` (r=2, alpha=2, ``fc1`` only).
Each combination below is one PEFT ``add_weighted_adapter`` call; the file holds every input adapter's factors
(PEFT's layout: ``lora_A [r, in]``, ``lora_B [out, r]``), its scaling, and each result's factors and scaling.
Run it with a reference environment that has torch and peft (never a dependency of lora_jax):

    /work/.venv-ref/bin/python scripts/make_weighted_adapter_fixture.py
"""

from pathlib import Path

import numpy as np
import peft
import torch
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "peft_weighted" / "expected.npz"

ADAPTERS = {
    "a1": LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]),
    "a2": LoraConfig(r=3, lora_alpha=6, use_rslora=True, target_modules=["fc1", "fc2"]),
    "a3": LoraConfig(r=2, lora_alpha=1, target_modules=["fc1", "fc2"]),
    "a4": LoraConfig(r=2, lora_alpha=2, target_modules=["fc1"]),
}
# name -> (adapters, weights, keyword arguments of add_weighted_adapter)
COMBINATIONS = {
    "linear": (["a1", "a3"], [0.7, -1.3], {"combination_type": "linear"}),
    "cat": (["a1", "a2"], [0.5, -2.0], {"combination_type": "cat"}),
    "cat_partial": (["a1", "a4"], [1.5, 0.25], {"combination_type": "cat"}),
    "svd": (["a1", "a2"], [0.5, -2.0], {"combination_type": "svd", "svd_rank": 2}),
    "svd_clamp": (["a1", "a2", "a3"], [0.5, 1.5, 1.0], {"combination_type": "svd", "svd_rank": 3, "svd_clamp": 0.9}),
    "single": (["a2"], [-0.6], {"combination_type": "svd"}),
}


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 7)
        self.fc2 = torch.nn.Linear(7, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    names = list(ADAPTERS)
    model = get_peft_model(Tiny(), ADAPTERS[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, ADAPTERS[name])
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_" in key:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    for name, (adapters, weights, kwargs) in COMBINATIONS.items():
        model.add_weighted_adapter(adapters, weights, name, **kwargs)
    arrays = {}
    for module in ("fc1", "fc2"):
        layer = getattr(model.base_model.model, module)
        arrays[f"base/{module}"] = layer.weight.detach().numpy()
        for name in layer.lora_A:
            arrays[f"{name}/{module}/A"] = layer.lora_A[name].weight.detach().numpy()
            arrays[f"{name}/{module}/B"] = layer.lora_B[name].weight.detach().numpy()
            arrays[f"{name}/{module}/scaling"] = np.float64(layer.scaling[name])
    for name, (_, weights, _) in COMBINATIONS.items():
        arrays[f"{name}/weights"] = np.asarray(weights, np.float64)
        arrays[f"{name}/r"] = np.int64(model.peft_config[name].r)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, peft_version=np.str_(peft.__version__), **arrays)
    print(OUT, sorted(arrays))


if __name__ == "__main__":
    main()
