"""Adapter-only checkpoints: round trip, no silent overwrite, clear errors for foreign or damaged files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lora_jax as lj
from lora_jax import checkpoint

PARAMS = {"enc": {"q": {"kernel": jnp.ones((16, 8))}, "v": {"kernel": jnp.ones((16, 2, 4))}}, "head": jnp.ones((8, 2))}
SPEC = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=4), lj.Rule("enc/v/kernel", rank=2, in_axes=0), lj.trainable("head")])


def _trained():
    lora = lj.init(jax.random.key(0), PARAMS, SPEC)
    return jax.tree_util.tree_map(lambda x: x + jax.random.normal(jax.random.key(1), x.shape), lora)


def test_round_trip(tmp_path):
    lora = _trained()
    path = checkpoint.save_adapter(tmp_path / "adapter.safetensors", lora, SPEC, PARAMS)
    restored = checkpoint.load_adapter(path, PARAMS, SPEC)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(lora)
    for a, b in zip(jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lj.merge(PARAMS, restored, SPEC)["head"], lora["head"])
    assert path.stat().st_size < checkpoint.adapter_bytes(lora) + 4096


def test_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "adapter.safetensors"
    checkpoint.save_adapter(path, _trained(), SPEC, PARAMS)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save_adapter(path, lj.init(jax.random.key(5), PARAMS, SPEC), SPEC, PARAMS)
    assert path.read_bytes() == before
    checkpoint.save_adapter(path, lj.init(jax.random.key(5), PARAMS, SPEC), SPEC, PARAMS, overwrite=True)
    assert path.read_bytes() != before


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    checkpoint.save_adapter(path, _trained(), SPEC, PARAMS)
    before = path.read_bytes()

    def broken_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_write)  # looked up when saving
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_adapter(path, _trained(), SPEC, PARAMS, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary left behind


def test_adapter_that_does_not_fit_is_not_saved(tmp_path):
    lora = _trained()
    lora["enc"]["q"]["kernel"]["b"] = jnp.zeros((4, 9))
    with pytest.raises(lj.AdapterMismatchError, match="enc/q/kernel/b"):
        checkpoint.save_adapter(tmp_path / "a.safetensors", lora, SPEC, PARAMS)
    assert not (tmp_path / "a.safetensors").exists()


def test_checkpoint_from_another_spec(tmp_path):
    path = checkpoint.save_adapter(tmp_path / "a.safetensors", _trained(), SPEC, PARAMS)
    other_rank = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=2), *SPEC.rules[1:]])
    with pytest.raises(lj.AdapterMismatchError, match="enc/q/kernel/a"):
        checkpoint.load_adapter(path, PARAMS, other_rank)
    other_alpha = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=4, alpha=32), *SPEC.rules[1:]])
    with pytest.raises(lj.AdapterMismatchError, match="'scale': 2.0"):
        checkpoint.load_adapter(path, PARAMS, other_alpha)
    fewer = lj.LoraSpec(SPEC.rules[:2])
    with pytest.raises(lj.AdapterMismatchError, match="holds head"):
        checkpoint.load_adapter(path, PARAMS, fewer)


def test_corrupt_and_missing_files(tmp_path):
    path = checkpoint.save_adapter(tmp_path / "a.safetensors", _trained(), SPEC, PARAMS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointCorruptError, match="a.safetensors"):
        checkpoint.load_adapter(path, PARAMS, SPEC)
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="a.safetensors"):
        checkpoint.load_adapter(path, PARAMS, SPEC)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        checkpoint.load_adapter(tmp_path / "nothing.safetensors", PARAMS, SPEC)
