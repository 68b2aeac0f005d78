"""What ``pip install lora_jax`` brings: the transform on jax, numpy and optax; the rest behind named extras."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lora_jax import _extras

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow_datasets", "orbax", "matplotlib", "tokenizers", "flax")
# Everything an extra brings; blocking these leaves what a plain `pip install lora_jax` has.
OPTIONAL = (*HEAVY, "safetensors", "tqdm", "array_record", "tensorflow")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def blocked(modules: tuple[str, ...]) -> str:
    """Source that makes importing any of ``modules`` fail, as if they were not installed."""
    return f"import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"


def test_import_lora_jax_stays_light():
    done = run_python(
        "import sys, lora_jax\n"
        f"print(sorted(m for m in {HEAVY!r} if any(k == m or k.startswith(m + '.') for k in sys.modules)))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_transform_needs_only_jax_numpy_and_optax():
    code = blocked(OPTIONAL) + (
        "import jax, jax.numpy as jnp, lora_jax as lj\n"
        "params = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}}\n"
        "spec = lj.LoraSpec([lj.Rule('dense/kernel', rank=2)])\n"
        "lora = lj.init(jax.random.key(0), params, spec)\n"
        "assert lj.merge(params, lora, spec)['dense']['kernel'].shape == (4, 3)\n"
        "try:\n"
        "    lj.save_adapter('never.safetensors', params, lora, spec)\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert 'pip install "lora_jax[io]"' in done.stdout
    assert not (ROOT / "never.safetensors").exists()


@pytest.mark.parametrize(
    ("subpackage", "missing", "extra"), [("models", "flax", "models"), ("data", "tensorflow_datasets", "data")]
)
def test_a_subpackage_without_its_extra_names_it(subpackage, missing, extra):
    done = run_python(blocked((missing,)) + f"import lora_jax.{subpackage}\n")
    assert done.returncode != 0
    assert f'pip install "lora_jax[{extra}]"' in done.stderr.strip().splitlines()[-1]


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # as if orbax-checkpoint were not installed
    with pytest.raises(ImportError, match=r'orbax\.checkpoint .*\'train\' extra: pip install "lora_jax\[train\]"'):
        _extras.require("orbax.checkpoint", "train")
    assert _extras.require("optax", "never-needed").__name__ == "optax"


def test_base_dependencies_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("<")[0].split("=")[0] for dep in project["dependencies"]}
    assert names == {"jax", "numpy", "optax"}
    extras = project["optional-dependencies"]
    assert {"io", "models", "data", "train", "experiments", "all", "dev"} <= set(extras)
    assert extras["all"] == ["lora_jax[io,models,data,train,experiments]"]
    assert "ruff" in " ".join(extras["dev"])


def test_ships_a_typing_marker():
    assert (ROOT / "lora_jax" / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["lora_jax"]
