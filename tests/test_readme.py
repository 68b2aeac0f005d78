"""The README's first code sample runs as written on the packaged MiniLM."""

import re
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_readme_first_sample_runs(tmp_path, monkeypatch, minilm_dir):
    text = (ROOT / "README.md").read_text()
    sample = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the sample saves sst2.safetensors in the working directory
    scope: dict = {}
    exec(compile(sample, "README.md", "exec"), scope)
    lj, params, lora, spec = scope["lj"], scope["params"], scope["lora"], scope["spec"]
    assert (tmp_path / "sst2.safetensors").is_file()
    # The gradient reaches every adapter leaf and the head, and nothing else is in the tree.
    grads = scope["grads"]
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)
    assert float(np.abs(np.asarray(grads["classifier"]["kernel"])).sum()) > 0
    # B starts at zero: the merged tree is the base except the head, which comes from the adapter tree.
    serving = scope["serving"]
    np.testing.assert_array_equal(
        np.asarray(serving["bert"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]),
        np.asarray(params["bert"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]),
    )
    loaded = lj.load_adapter(tmp_path / "sst2.safetensors", params, spec)
    assert lj.trainable_count(loaded) == lj.trainable_count(lora)
