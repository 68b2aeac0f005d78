import os
from pathlib import Path

import pytest

from experiments import assets

# Tests compare float32 numbers; keep XLA from using bfloat16 passes anywhere.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The local GLUE root (``experiments.assets.glue_dir``); the data tests read RTE from it."""
    path = assets.glue_dir()
    if path is None:
        raise FileNotFoundError(f"no local GLUE copy: set ${assets.GLUE_DIR_ENV} to a GLUE-style root")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged MiniLM (``experiments.assets.minilm_path``); tests that need it skip without it."""
    try:
        return assets.minilm_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
