"""Merged models exported in the Hugging Face layout: the checkpoint's own names and layouts, read back exactly."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lora_jax as lj
from lora_jax import models
from lora_jax.models.common.convert import CheckpointError, Tensor, join_parts
from lora_jax.paths import flatten, path_str

FIXTURES = Path(__file__).parent / "fixtures" / "models"
FAMILIES = ["tiny_bert_cls", "tiny_gpt2", "tiny_llama", "tiny_llama_tied"]


def _leaves(tree):
    return {path_str(p): x for p, x in flatten(tree)[0]}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_export_reloads_bit_for_bit(tmp_path, name, scan):
    model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan)
    models.save_pretrained(tmp_path, model, params, source=FIXTURES / name)
    _, back = models.from_pretrained(tmp_path, scan_layers=scan)
    ours, theirs = _leaves(params), _leaves(back)
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        assert theirs[key].dtype == value.dtype
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
    # The file holds the source checkpoint's own tensors (names, layouts, values), less buffers and tied copies.
    source, exported = (
        load_file(str(FIXTURES / name / "model.safetensors")),
        load_file(str(tmp_path / "model.safetensors")),
    )
    arch = models.ARCHITECTURES.of(model)
    kept = {k for k in source if not arch.is_ignored(k) and arch.key_map(model).get(k, ()) != ()}
    assert set(exported) == kept
    for key in kept:
        np.testing.assert_array_equal(exported[key], source[key], err_msg=key)
    config = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((FIXTURES / name / "config.json").read_text())
    assert config["architectures"] == original["architectures"] and config["model_type"] == original["model_type"]


def test_gpt2_fused_attention_is_joined(tmp_path):
    model, params = models.from_pretrained(FIXTURES / "tiny_gpt2")
    spec = models.lora_spec(model, "qkvo", rank=2, alpha=4)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lj.init(jax.random.key(0), params, spec))
    merged = lj.merge(params, lora, spec)
    models.save_pretrained(tmp_path, model, merged)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    d = model.config.n_embd
    c_attn = tensors["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (d, 3 * d)  # Conv1D: [in, out], query | key | value
    np.testing.assert_array_equal(
        c_attn[:, d : 2 * d], np.asarray(merged["decoder"]["layer_0"]["attention"]["key"]["kernel"]).reshape(d, d)
    )
    assert "lm_head.weight" not in tensors  # tied to the token embedding
    _, back = models.from_pretrained(tmp_path)
    for key, value in _leaves(merged).items():
        np.testing.assert_array_equal(_leaves(back)[key], value, err_msg=key)


def test_classifier_labels_and_refusals(tmp_path):
    model, params = models.from_pretrained(FIXTURES / "tiny_bert_cls")
    models.save_pretrained(tmp_path, model, params, labels=["neg", "neutral", "pos"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"} and config["label2id"]["pos"] == 2
    with pytest.raises(FileExistsError, match="config.json|model.safetensors"):
        models.save_pretrained(tmp_path, model, params)
    with pytest.raises(CheckpointError, match="2 label names for a classifier of 3 classes"):
        models.save_pretrained(tmp_path / "b", model, params, labels=["a", "b"])
    partial = {**params, "classifier": {"kernel": params["classifier"]["kernel"]}}
    with pytest.raises(CheckpointError, match="classifier/bias"):
        models.save_pretrained(tmp_path / "c", model, partial)
    extra = {**params, "extra": jnp.ones(3)}
    with pytest.raises(CheckpointError, match="param extra .* has no checkpoint name"):
        models.save_pretrained(tmp_path / "d", model, extra)
    mean_model, mean_params = models.from_pretrained(FIXTURES / "tiny_bert_cls", pooling="mean")
    with pytest.warns(UserWarning, match="pools with 'mean'"):
        models.save_pretrained(tmp_path / "e", mean_model, mean_params)


def test_tensor_to_checkpoint_inverts_convert():
    rng = np.random.default_rng(0)
    kernel = Tensor(("q", "kernel"), transpose=True, in_ndim=1)
    value = rng.normal(size=(8, 2, 4)).astype(np.float32)
    np.testing.assert_array_equal(kernel.convert("w", kernel.to_checkpoint(value), value.shape), value)
    parts = tuple(Tensor((p, "kernel"), in_ndim=1, part=(i, 3)) for i, p in enumerate("qkv"))
    values = [rng.normal(size=(8, 8)).astype(np.float32) for _ in parts]
    fused = join_parts("c_attn", parts, [t.to_checkpoint(v) for t, v in zip(parts, values)])
    for t, v in zip(parts, values):
        np.testing.assert_array_equal(t.convert("c_attn", fused, v.shape), v)
    with pytest.raises(CheckpointError, match="do not make one whole tensor"):
        join_parts("c_attn", parts[:2], [fused, fused])
