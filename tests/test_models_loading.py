"""from_pretrained on good and bad model directories."""

import json
import shutil
import warnings
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import lora_jax
import lora_jax.models as models
from experiments import assets

FIXTURES = Path(__file__).parent / "fixtures" / "models"


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(path, framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


def copy_model(name: str, dest: Path) -> Path:
    shutil.copytree(FIXTURES / name, dest, ignore=shutil.ignore_patterns("*.npz"))
    return dest


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    tensors = read_tensors(FIXTURES / "tiny_llama" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(FIXTURES / "tiny_llama" / "config.json", tmp_path)

    assert [p.name for p in models.checkpoint_files(tmp_path)] == list(shards)
    _, sharded = models.from_pretrained(tmp_path)
    _, single = models.from_pretrained(FIXTURES / "tiny_llama")
    assert jax.tree.structure(sharded) == jax.tree.structure(single)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_checkpoint_loads_into_float32(tmp_path):
    path = copy_model("tiny_llama", tmp_path / "m")
    tensors = read_tensors(path / "model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, path / "model.safetensors")
    _, params = models.from_pretrained(path)
    _, reference = models.from_pretrained(FIXTURES / "tiny_llama")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-6)


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(tmp_path)


def test_missing_weights_name_the_file(tmp_path):
    shutil.copy(FIXTURES / "tiny_gpt2" / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    shutil.copy(FIXTURES / "tiny_gpt2" / "config.json", tmp_path)
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    # The index is what is wrong: it lists a shard the directory lacks.
    with pytest.raises(models.CheckpointError, match="model-00001-of-00001.safetensors.*index.json") as err:
        models.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value) and "download the missing shard" in str(err.value)


def test_unknown_architecture_is_named(tmp_path):
    path = copy_model("tiny_gpt2", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["T5ForConditionalGeneration"], model_type="t5")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ConfigError, match="T5ForConditionalGeneration") as err:
        models.from_pretrained(path)
    assert isinstance(err.value, lora_jax.LoraError)
    with pytest.raises(models.ConfigError, match="Mamba"):
        models.from_pretrained(FIXTURES / "tiny_gpt2", architecture="Mamba")


def test_unsupported_option_is_refused(tmp_path):
    path = copy_model("tiny_llama", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ConfigError, match="yarn"):
        models.from_pretrained(path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    path = copy_model("tiny_gpt2", tmp_path / "m")
    tensors = read_tensors(path / "model.safetensors")
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:-1]  # [31, 32], config says 32
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(models.CheckpointError) as err:
        models.from_pretrained(path)
    message = str(err.value)
    assert "transformer.wpe.weight" in message
    assert "(31, 32)" in message and "(32, 32)" in message
    assert "position_embeddings/embedding" in message


def test_missing_tensor_is_named(tmp_path):
    path = copy_model("tiny_llama", tmp_path / "m")
    tensors = read_tensors(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(models.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        models.from_pretrained(path, scan_layers=True)


def test_encoder_from_a_classifier_checkpoint_ignores_the_head():
    with pytest.warns(UserWarning, match="classifier"):
        model, params = models.from_pretrained(FIXTURES / "tiny_bert_cls", architecture="BertModel")
    assert isinstance(model, models.BertModel)
    assert set(params) == {"embeddings", "encoder", "pooler"}


def test_wrong_num_labels_is_a_shape_error():
    with pytest.raises(models.CheckpointError, match=r"'classifier\.(bias|weight)' has shape \(3") as err:
        models.from_pretrained(FIXTURES / "tiny_bert_cls", num_labels=5)
    assert "5" in str(err.value)


def test_minilm_as_classifier_gets_fresh_head(minilm_dir):
    with pytest.warns(UserWarning, match="no classifier"):
        model, params = models.from_pretrained(minilm_dir, architecture="BertForSequenceClassification", num_labels=2)
    assert params["classifier"]["kernel"].shape == (384, 2)
    np.testing.assert_array_equal(params["classifier"]["bias"], 0.0)
    assert 0.01 < float(np.std(params["classifier"]["kernel"])) < 0.03  # N(0, 0.02^2) as in transformers


def test_mean_pooling_classifier_averages_real_tokens(tmp_path):
    path = copy_model("tiny_bert_cls", tmp_path / "m")
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert models.sentence_pooling(path) == "mean"
    model, params = models.from_pretrained(path, pooling="mean")
    assert "pooler" not in params["bert"]
    with pytest.warns(UserWarning, match="classifier"):
        encoder, encoder_params = models.from_pretrained(path, architecture="BertModel")
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids > 0).astype(np.int32)
    hidden = encoder.apply({"params": encoder_params}, ids, mask).hidden_states
    expected = np.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)])
    expected = expected @ params["classifier"]["kernel"] + params["classifier"]["bias"]
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask), expected, rtol=1e-5, atol=1e-6)
    assert all("pooler" not in name for name, _ in models.hf_names(model).values())


def test_sentence_pooling_reads_the_checkpoint(tmp_path):
    path = copy_model("tiny_bert_cls", tmp_path / "m")
    assert models.sentence_pooling(path) == "cls"  # no 1_Pooling: a plain Hugging Face directory
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(models.ConfigError, match=r"1_Pooling/config.json.*max_tokens"):
        models.sentence_pooling(path)
    with pytest.raises(models.ConfigError, match="pooling must be one of"):
        models.from_pretrained(path, pooling="max")
    with pytest.raises(models.ConfigError, match="pooling applies to BertForSequenceClassification"):
        models.from_pretrained(path, architecture="BertModel", pooling="mean")


def test_minilm_pools_by_mean():
    assert models.sentence_pooling(assets.minilm_path()) == "mean"


# --- damaged and malformed files: each names the file and the fix ------------------------------


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _shard(path: Path) -> None:
    """Split model.safetensors into two shards with an index."""
    tensors = read_tensors(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, path / file)
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _int_tensor(path: Path) -> None:
    tensors = read_tensors(path / "model.safetensors")
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].astype(np.int32)
    save_file(tensors, path / "model.safetensors")


MODEL_DAMAGE = {
    # name: (how to damage the copied model, error, file named, what the message says)
    "truncated weights": (
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]),
        models.CheckpointError,
        "model.safetensors",
        "not a readable safetensors file .*download it again",
    ),
    "empty weights": (
        lambda p: (p / "model.safetensors").write_bytes(b""),
        models.CheckpointError,
        "model.safetensors",
        "not a readable safetensors file",
    ),
    "git lfs pointer": (
        lambda p: (p / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),
        models.CheckpointError,
        "model.safetensors",
        "git lfs pull",
    ),
    "integer weight": (
        _int_tensor,
        models.CheckpointError,
        "model.safetensors",
        "'transformer.wpe.weight' has dtype int32",
    ),
    "config not JSON": (
        lambda p: (p / "config.json").write_text('{"model_type": "gpt2",'),
        models.ConfigError,
        "config.json",
        "is not valid JSON",
    ),
    "config not UTF-8": (
        lambda p: (p / "config.json").write_bytes(b'{"model_type": "gpt\xff2"}'),
        models.ConfigError,
        "config.json",
        "is not valid JSON",
    ),
    "config a list": (
        lambda p: (p / "config.json").write_text("[1, 2]"),
        models.ConfigError,
        "config.json",
        "holds a JSON list, not an object",
    ),
    "config field of another type": (
        lambda p: _edit_config(p, n_embd="32"),
        models.ConfigError,
        "config.json",
        "field 'n_embd' is '32', not int",
    ),
    "config flag a number": (
        lambda p: _edit_config(p, layer_norm_epsilon=True),
        models.ConfigError,
        "config.json",
        "field 'layer_norm_epsilon' is True, not float",
    ),
    "architectures not a list": (
        lambda p: _edit_config(p, architectures="GPT2LMHeadModel"),
        models.ConfigError,
        "config.json",
        "'architectures' is 'GPT2LMHeadModel', not a list",
    ),
    "model_type a list": (
        lambda p: _edit_config(p, architectures=[], model_type=["gpt2"]),
        models.ConfigError,
        "config.json",
        "'model_type' is \\['gpt2'\\]",
    ),
    "index not JSON": (
        lambda p: (_shard(p), (p / "model.safetensors.index.json").write_text("{")),
        models.CheckpointError,
        "model.safetensors.index.json",
        "is not valid JSON",
    ),
    "index without weight map": (
        lambda p: (_shard(p), (p / "model.safetensors.index.json").write_text('{"weight_map": {"a": 3}}')),
        models.CheckpointError,
        "model.safetensors.index.json",
        "has no 'weight_map' object",
    ),
    "truncated shard": (
        lambda p: (_shard(p), (p / "model-00002-of-00002.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{")),
        models.CheckpointError,
        "model-00002-of-00002.safetensors",
        "not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("kind", sorted(MODEL_DAMAGE))
def test_bad_model_file_is_named(tmp_path, kind):
    damage, error, file, message = MODEL_DAMAGE[kind]
    path = copy_model("tiny_gpt2", tmp_path / "m")
    damage(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message) as err:
            models.from_pretrained(path)
    assert str(path / file) in str(err.value)


def test_a_tensor_held_twice_across_shards_is_refused(tmp_path):
    tensors = read_tensors(FIXTURES / "tiny_llama" / "model.safetensors")
    names = sorted(tensors)
    twice = names[0]
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    save_file(
        {n: tensors[n] for n in shards["model-00001-of-00002.safetensors"]},
        tmp_path / "model-00001-of-00002.safetensors",
    )
    stray = {n: tensors[n] for n in shards["model-00002-of-00002.safetensors"]} | {twice: np.zeros_like(tensors[twice])}
    save_file(stray, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(FIXTURES / "tiny_llama" / "config.json", tmp_path)
    with pytest.raises(
        models.CheckpointError, match=f"00002-of-00002.safetensors: tensor '{twice}' is the same weight"
    ):
        models.from_pretrained(tmp_path)


def test_a_tensor_in_a_dtype_numpy_lacks_is_refused_naming_it(tmp_path):
    path = copy_model("tiny_gpt2", tmp_path / "m")
    file = path / "model.safetensors"
    raw = file.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    entry = header["transformer.wpe.weight"]
    # The same bytes read as four times as many FP8 numbers: a header numpy has no dtype for.
    header["transformer.wpe.weight"] = {**entry, "dtype": "F8_E4M3", "shape": [int(np.prod(entry["shape"])) * 4]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    with pytest.raises(
        models.CheckpointError, match=r"model.safetensors: tensor 'transformer.wpe.weight' is stored as F8_E4M3"
    ):
        models.from_pretrained(path)


def test_weights_holding_nan_or_beyond_the_param_dtype_are_refused(tmp_path):
    path = copy_model("tiny_gpt2", tmp_path / "m")
    tensors = read_tensors(path / "model.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = 1e6
    save_file(tensors, path / "model.safetensors")
    models.from_pretrained(path)  # float32 holds it
    with pytest.raises(models.CheckpointError, match=f"tensor '{name}' holds 1e\\+06, beyond float16's largest"):
        models.from_pretrained(path, param_dtype=np.float16)
    tensors[name][0, 0] = np.nan
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(models.CheckpointError, match=f"model.safetensors: tensor '{name}' holds NaN or Inf"):
        models.from_pretrained(path)


def test_export_refuses_nan_and_writes_its_files_as_one(tmp_path, monkeypatch):
    source = copy_model("tiny_gpt2", tmp_path / "source")
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    model, params = models.from_pretrained(source)
    out = models.save_pretrained(tmp_path / "out", model, params, source=source)
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves[-1] = leaves[-1].at[..., 0].set(np.nan)
    with pytest.raises(lora_jax.errors.NonFiniteError, match="holds NaN or Inf: the model diverged"):
        models.save_pretrained(out, model, jax.tree_util.tree_unflatten(treedef, leaves), overwrite=True)

    # A write that fails part way (the config, after the weights) leaves the folder as it was.
    def disk_full(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="disk full"):
        models.save_pretrained(out, model, jax.tree_util.tree_map(lambda x: x * 2, params), overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]  # no temporary folder left behind
