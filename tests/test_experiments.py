"""Each experiment script runs at its smoke size and writes its results."""

import importlib.util
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up
    spec.loader.exec_module(module)
    return module


def test_quickstart_smoke(tmp_path):
    result = load("quickstart").main(["--smoke", "--results-dir", str(tmp_path)])
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert result["accuracy"] > result["base_accuracy"] + 0.2
    assert result["gap"] < 1e-5
    table = (tmp_path / "quickstart_smoke.md").read_text()
    assert "trainable parameters" in table and "jax" in table
    assert (tmp_path / "quickstart_smoke.png").stat().st_size > 1000


def test_finetune_minilm_smoke(tmp_path):
    result = load("finetune_minilm").main(["--smoke", "--out", str(tmp_path / "run"), "--results-dir", str(tmp_path)])
    assert result["agree"] == result["total"] == 64
    assert result["gap"] < 1e-4
    assert 0.0 <= result["score"] <= 1.0
    # qv r=8 on six layers plus the head: a few hundred kilobytes on disk.
    assert 73_728 * 4 < result["adapter_bytes"] < 400_000
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    assert "dev accuracy" in (tmp_path / "finetune_minilm_smoke.md").read_text()
