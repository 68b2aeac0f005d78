"""Adapter files and the atomic writer: round trip, no silent overwrite, clear errors for foreign or damaged files."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import io
from lora_jax.io import adapter, atomic

PARAMS = {"enc": {"q": {"kernel": jnp.ones((16, 8))}, "v": {"kernel": jnp.ones((16, 2, 4))}}, "head": jnp.ones((8, 2))}
SPEC = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=4), lj.Rule("enc/v/kernel", rank=2, in_axes=0), lj.trainable("head")])


def _trained():
    lora = lj.init(jax.random.key(0), PARAMS, SPEC)
    return jax.tree_util.tree_map(lambda x: x + jax.random.normal(jax.random.key(1), x.shape), lora)


def test_round_trip(tmp_path):
    lora = _trained()
    path = io.save_adapter(tmp_path / "adapter.safetensors", PARAMS, lora, SPEC)
    restored = io.load_adapter(path, PARAMS, SPEC)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(lora)
    for a, b in zip(jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lj.merge(PARAMS, restored, SPEC)["head"], lora["head"])
    assert path.stat().st_size < io.adapter_bytes(lora) + 4096


def test_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "adapter.safetensors"
    io.save_adapter(path, PARAMS, _trained(), SPEC)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.save_adapter(path, PARAMS, lj.init(jax.random.key(5), PARAMS, SPEC), SPEC)
    assert path.read_bytes() == before
    io.save_adapter(path, PARAMS, lj.init(jax.random.key(5), PARAMS, SPEC), SPEC, overwrite=True)
    assert path.read_bytes() != before


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    io.save_adapter(path, PARAMS, _trained(), SPEC)
    before = path.read_bytes()

    def broken_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter, "save_file", broken_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_adapter(path, PARAMS, _trained(), SPEC, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary left behind


def test_adapter_that_does_not_fit_is_not_saved(tmp_path):
    lora = _trained()
    lora["enc"]["q"]["kernel"]["b"] = jnp.zeros((4, 9))
    with pytest.raises(lj.AdapterMismatchError, match="enc/q/kernel/b"):
        io.save_adapter(tmp_path / "a.safetensors", PARAMS, lora, SPEC)
    assert not (tmp_path / "a.safetensors").exists()


def test_checkpoint_from_another_spec(tmp_path):
    path = io.save_adapter(tmp_path / "a.safetensors", PARAMS, _trained(), SPEC)
    where = re.escape(f"{path} was saved for another spec or base: ")
    other_rank = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=2), *SPEC.rules[1:]])
    with pytest.raises(lj.AdapterMismatchError, match=where + r"enc/q/kernel/a: rank 4 in the file, 2 now"):
        io.load_adapter(path, PARAMS, other_rank)
    other_alpha = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=4, alpha=32), *SPEC.rules[1:]])
    with pytest.raises(lj.AdapterMismatchError, match=where + r"enc/q/kernel/a: scale \(alpha / r\) 2.0 in the file"):
        io.load_adapter(path, PARAMS, other_alpha)
    fewer = lj.LoraSpec(SPEC.rules[:2])
    with pytest.raises(lj.AdapterMismatchError, match=where + r"targets: head only in the file \(1 leaves\)"):
        io.load_adapter(path, PARAMS, fewer)


def test_corrupt_and_missing_files(tmp_path):
    path = io.save_adapter(tmp_path / "a.safetensors", PARAMS, _trained(), SPEC)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.CheckpointCorruptError, match="a.safetensors"):
        io.load_adapter(path, PARAMS, SPEC)
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(io.CheckpointCorruptError, match="a.safetensors"):
        io.load_adapter(path, PARAMS, SPEC)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        io.load_adapter(tmp_path / "nothing.safetensors", PARAMS, SPEC)


def test_atomic_write_is_whole_or_nothing(tmp_path):
    path = tmp_path / "notes.txt"
    atomic.write_text(path, "first")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_atomic(path, failing, overwrite=True)
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # no temporary left behind

    with pytest.raises(FileExistsError, match="notes.txt.*overwrite=True"):
        atomic.write_atomic(path, lambda tmp: Path(tmp).write_text("second"))
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]

    assert atomic.write_bytes(path, b"second", overwrite=True) == path
    assert path.read_bytes() == b"second"
    assert atomic.write_text(tmp_path / "new" / "file.txt", "made") == tmp_path / "new" / "file.txt"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file.txt", "new", "notes.txt"]


def test_io_is_the_one_home_of_files():
    assert lj.save_adapter is io.save_adapter is adapter.save_adapter
    assert lj.load_adapter is io.load_adapter and lj.CheckpointCorruptError is io.CheckpointCorruptError
    assert io.save_peft is io.peft.save_peft and io.write_atomic is atomic.write_atomic
    assert not hasattr(lj, "checkpoint") and not hasattr(lj, "peft")
