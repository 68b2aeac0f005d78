"""Hugging Face PEFT interop: a real PEFT adapter loads and computes PEFT's logits; export round-trips."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax import models
from lora_jax.io import peft
from lora_jax.paths import flatten, path_str

FIXTURES = Path(__file__).parent / "fixtures"
PEFT_DIR = FIXTURES / "peft"


def _model(scan=False):
    return models.from_pretrained(FIXTURES / "models" / "tiny_bert_cls", scan_layers=scan)


def _fixture_spec(model):
    """The spec of the PEFT fixture: q, v, attention output at r=2, alpha=4; layer 1's value at r=3; the head."""
    layer1_value = lj.Rule(r"bert/encoder/layer_1/attention/value/kernel", rank=3, alpha=4, in_axes=0)
    preset = models.lora_spec(model, ["q", "v", "o"], rank=2, alpha=4, head=True)
    return lj.LoraSpec([layer1_value, *preset.rules])


def test_peft_adapter_gives_peft_logits():
    model, params = _model()
    spec = _fixture_spec(model)
    lora = peft.load_peft(PEFT_DIR, params, spec, models.hf_names(model))
    expected = np.load(PEFT_DIR / "expected.npz")
    logits = model.apply({"params": lj.merge(params, lora, spec)}, expected["input_ids"], expected["attention_mask"])
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-5)


def test_export_reproduces_the_peft_file(tmp_path):
    model, params = _model()
    spec = _fixture_spec(model)
    names = models.hf_names(model)
    lora = peft.load_peft(PEFT_DIR, params, spec, names)
    peft.save_peft(tmp_path, params, lora, spec, names)
    ours, theirs = load_file(str(tmp_path / peft.WEIGHTS)), load_file(str(PEFT_DIR / peft.WEIGHTS))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, err_msg=key)
    config = __import__("json").loads((tmp_path / peft.CONFIG).read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4 and config["modules_to_save"] == ["classifier"]
    assert config["rank_pattern"] == {"bert.encoder.layer.1.attention.self.value": 3}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        peft.save_peft(tmp_path, params, lora, spec, names)


def test_scanned_layout_exports_per_layer_modules(tmp_path):
    model, params = _model()
    scanned_model, scanned_params = _model(scan=True)
    spec = models.lora_spec(model, "qkvo", rank=2, alpha=4, head=True)
    scanned_spec = models.lora_spec(scanned_model, "qkvo", rank=2, alpha=4, head=True)
    lora = lj.init(jax.random.key(0), params, spec)
    lora = jax.tree_util.tree_map(lambda x: x + jax.random.normal(jax.random.key(1), x.shape), lora)
    stacked = models.stack_layers(lora)
    unrolled_tensors, _ = peft.to_peft(params, lora, spec, models.hf_names(model))
    scanned_tensors, _ = peft.to_peft(scanned_params, stacked, scanned_spec, models.hf_names(scanned_model))
    assert sorted(unrolled_tensors) == sorted(scanned_tensors)
    for key, value in unrolled_tensors.items():
        np.testing.assert_array_equal(value, scanned_tensors[key], err_msg=key)
    peft.save_peft(tmp_path, scanned_params, stacked, scanned_spec, models.hf_names(scanned_model))
    back = peft.load_peft(tmp_path, scanned_params, scanned_spec, models.hf_names(scanned_model))
    for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(back)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_spec_from_peft_on_a_scanned_model_gives_rules_on_the_stacked_kernels(tmp_path):
    model, params = _model()
    scanned_model, scanned_params = _model(scan=True)
    names, scanned_names = models.hf_names(model), models.hf_names(scanned_model)
    # Every layer's attention LayerNorm saved (PEFT's modules_to_save), beside LoRA and the head.
    norms = lj.trainable(r"bert/encoder/layer_\d+/attention_norm/(scale|bias)")
    spec = lj.LoraSpec([norms, *models.lora_spec(model, "qkvo", rank=2, alpha=4, head=True).rules])
    lora = lj.init(jax.random.key(0), params, spec)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), lora)
    peft.save_peft(tmp_path, params, lora, spec, names)  # PEFT's per-layer modules
    scanned_spec = lj.LoraSpec.from_peft(tmp_path, scanned_names, scanned_params)
    adapted = [rule for rule in scanned_spec.rules if rule.mode == "lora"]
    assert len(adapted) == 4 and all(rule.stack_axes == (0,) for rule in adapted)
    stacked_norms = sorted(t.name for t in lj.plan(scanned_params, scanned_spec) if "norm" in t.name)
    assert stacked_norms == ["bert/encoder/layers/attention_norm/bias", "bert/encoder/layers/attention_norm/scale"]
    back = peft.load_peft(tmp_path, scanned_params, scanned_spec, scanned_names)
    expected = np.load(PEFT_DIR / "expected.npz")
    inputs = expected["input_ids"], expected["attention_mask"]
    want = model.apply({"params": lj.merge(params, lora, spec)}, *inputs)
    got = scanned_model.apply({"params": lj.merge(scanned_params, back, scanned_spec)}, *inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Written back from the scanned model: PEFT's per-layer tensors again, the saved norms' among them.
    again, _ = peft.to_peft(scanned_params, back, scanned_spec, scanned_names)
    first, _ = peft.to_peft(params, lora, spec, names)
    assert sorted(again) == sorted(first) and any("layer.1.attention.output.LayerNorm" in key for key in first)
    for key in first:
        np.testing.assert_allclose(again[key], first[key], rtol=0, atol=1e-7, err_msg=key)
    # Without the base tree the rules name the unrolled paths, which a scanned tree does not have.
    with pytest.raises(lj.SpecError, match="matches no leaf"):
        lj.plan(scanned_params, lj.LoraSpec.from_peft(tmp_path, scanned_names))
    # One rule on a stacked kernel: PEFT's fixture gives layer 1's value r=3 and layer 0's r=2,
    with pytest.raises(lj.LoraError, match=r"layer.0.attention.self.value has rank=2 and .*layer.1.* rank=3"):
        lj.LoraSpec.from_peft(PEFT_DIR, scanned_names, scanned_params)
    # and it adapts every layer, where layers_to_transform names some.
    config = json.loads((tmp_path / peft.CONFIG).read_text())
    with pytest.raises(lj.LoraError, match=r"PEFT adapts layers \[1\] of bert/encoder/layers/.*scan_layers=False"):
        lj.LoraSpec.from_peft({**config, "layers_to_transform": [1]}, scanned_names, scanned_params)
    # A module saved in some layers only cannot be one rule on its stacked leaf either.
    assert config["modules_to_save"] == ["attention.output.LayerNorm", "classifier"]  # every layer's, by suffix
    partial = ["bert.encoder.layer.0.attention.output.LayerNorm", "classifier"]
    with pytest.raises(lj.LoraError, match=r"PEFT trains layers \[0\] of bert/encoder/layers/attention_norm"):
        lj.LoraSpec.from_peft({**config, "modules_to_save": partial}, scanned_names, scanned_params)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_adapters_that_train_biases_give_peft_logits(tmp_path, bias):
    """PEFT's bias='all' (every bias of the model) and 'lora_only' (the adapted modules'), from real PEFT
    (scripts/make_peft_bias_fixture.py): from_peft gives a trainable rule per bias, load_peft reads them, and the
    merged model gives PEFT's logits."""
    folder = FIXTURES / f"peft_bias_{bias}"
    model, params = models.from_pretrained(FIXTURES / "models" / "tiny_bert_cls", num_labels=3)
    names = models.hf_names(model)
    spec = lj.LoraSpec.from_peft(folder, names)
    lora = peft.load_peft(folder, params, spec, names)
    trained = sorted(t.name for t in lj.plan(params, spec) if t.rule.mode == "train" and t.name.endswith("/bias"))
    adapted = ["bert/encoder/layer_0/attention/query/bias", "bert/encoder/layer_0/attention/value/bias"]
    assert set(adapted) <= set(trained) and ("bert/embeddings/layer_norm/bias" in trained) == (bias == "all")
    base = {path_str(p): leaf for p, leaf in flatten(params)[0]}
    query_bias = lora["bert"]["encoder"]["layer_0"]["attention"]["query"]["bias"]
    assert not np.allclose(np.asarray(query_bias), base[adapted[0]])  # the biases matter
    expected = np.load(folder / "expected.npz")
    logits = model.apply({"params": lj.merge(params, lora, spec)}, expected["input_ids"], expected["attention_mask"])
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-5)
    # Written back, the adapter is PEFT's file again: the same tensors under the same names, the same bias option
    # (bias='all' also keeps two copies of the saved head's bias, which load_peft checked and PEFT does not need).
    tensors, config = peft.to_peft(params, lora, spec, names)
    theirs = load_file(folder / peft.WEIGHTS)
    assert config["bias"] == bias
    assert sorted(set(theirs) - set(tensors)) == (
        ["base_model.model.classifier.modules_to_save.bias", "base_model.model.classifier.original_module.bias"]
        if bias == "all"
        else []
    )
    assert set(tensors) <= set(theirs)
    for key, value in tensors.items():
        np.testing.assert_allclose(value, theirs[key], rtol=0, atol=1e-7, err_msg=key)
    # A spec that leaves the biases frozen does not cover the file's bias tensors.
    frozen = lj.LoraSpec([rule for rule in spec.rules if not rule.pattern.endswith("/bias")])
    with pytest.raises(lj.AdapterMismatchError, match=r"holds base_model\.model\.\S+bias .* the spec does not cover"):
        peft.load_peft(folder, params, frozen, names)
    if bias == "all":  # the head kept whole also has its bias saved twice over, and the base's: copies, checked
        changed = tmp_path / "changed"
        shutil.copytree(folder, changed)
        tensors = dict(load_file(changed / peft.WEIGHTS))
        tensors["base_model.model.classifier.original_module.bias"] = np.ones(3, np.float32)
        save_file(tensors, changed / peft.WEIGHTS)
        with pytest.raises(lj.AdapterMismatchError, match=r"original_module\.bias differs from the base's classifier"):
            peft.load_peft(changed, params, spec, names)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_bias_all_copies_of_a_kept_module_are_checked_in_the_base_layout(scan):
    """query kept whole under bias='all': PEFT's copies of its bias are [32], lora_jax's leaf [heads, head_dim]
    (and, scanned, one layer of a stacked leaf); read in PyTorch's layout they are copies, and the model loads."""
    folder = FIXTURES / "peft_bias_all_saved"
    model, params = models.from_pretrained(FIXTURES / "models" / "tiny_bert_cls", num_labels=3, scan_layers=scan)
    names = models.hf_names(model)
    spec = lj.LoraSpec.from_peft(folder, names, params)
    lora = peft.load_peft(folder, params, spec, names)
    expected = np.load(folder / "expected.npz")
    logits = model.apply({"params": lj.merge(params, lora, spec)}, expected["input_ids"], expected["attention_mask"])
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-5)


def test_copies_compare_to_the_rounding_of_the_coarser_dtype():
    base = np.array([0.1, -2.5, 3.0], np.float32)
    assert peft._same(base.astype(jnp.bfloat16), base)  # a bfloat16 model's copy of a float32 base
    assert not peft._same(base.astype(jnp.bfloat16), base + 0.05)
    assert not peft._same(base + 1e-6, base) and not peft._same(base.reshape(3, 1), base)


def test_peft_configs_that_one_stacked_rule_cannot_hold_are_refused_naming_the_file():
    scanned, params = models.from_pretrained(FIXTURES / "models" / "tiny_bert_cls", scan_layers=True)
    config = json.loads((PEFT_DIR / peft.CONFIG).read_text())
    # layer 0's query kept whole, layer 1's adapted: one stacked kernel, two kinds
    mixed = {**config, "rank_pattern": {}, "modules_to_save": ["layer.0.attention.self.query", "classifier"]}
    with pytest.raises(lj.LoraError, match=r"adapter config: PEFT trains layers \[0\] of \S+/query/bias"):
        lj.LoraSpec.from_peft(mixed, models.hf_names(scanned), params)
    with pytest.raises(lj.LoraError, match=r"adapter config: \S+layer.0.attention.self.query has mode='train' and"):
        lj.LoraSpec.from_peft({**mixed, "bias": "all"}, models.hf_names(scanned), params)  # every bias trains
    # bias='all' trains GPT-2's fused c_attn bias whole; the split layout cannot, the fused one can
    gpt2 = {**config, "rank_pattern": {}, "target_modules": ["c_fc"], "modules_to_save": None, "bias": "all"}
    split, _ = models.from_pretrained(FIXTURES / "models" / "tiny_gpt2")
    with pytest.raises(
        lj.LoraError, match=r"bias='all' trains the bias of transformer.h.0.attn.c_attn whole.*fused_qkv"
    ):
        lj.LoraSpec.from_peft(gpt2, models.hf_names(split))
    fused, _ = models.from_pretrained(FIXTURES / "models" / "tiny_gpt2", fused_qkv=True)
    spec = lj.LoraSpec.from_peft(gpt2, models.hf_names(fused))
    assert any(rule.mode == "train" and "qkv" in str(rule.pattern) for rule in spec.rules)


def test_mismatches_name_the_module(tmp_path):
    model, params = _model()
    names = models.hf_names(model)
    wrong_rank = models.lora_spec(model, ["q", "v", "o"], rank=4, alpha=4, head=True)
    with pytest.raises(lj.AdapterMismatchError, match=r"bert.encoder.layer.0.attention.* the PEFT file has r=2"):
        peft.load_peft(PEFT_DIR, params, wrong_rank, names)
    fewer = models.lora_spec(model, ["q", "v"], rank=2, alpha=4, head=True)
    with pytest.raises(lj.AdapterMismatchError, match="attention.output.dense"):
        peft.load_peft(PEFT_DIR, params, lj.LoraSpec([_fixture_spec(model).rules[0], *fewer.rules]), names)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft.load_peft(tmp_path, params, _fixture_spec(model), names)
    # Biases trained alone that PEFT's bias option cannot name: some of the adapted modules' (q, not v).
    biased = lj.LoraSpec([lj.trainable(r".*attention/query/bias"), *fewer.rules])
    with pytest.raises(lj.LoraError, match=r"trains 2 biases alone, .* \(bias='lora_only'\)"):
        peft.to_peft(params, lj.init(jax.random.key(0), params, biased), biased, names)
    gpt2, gpt2_params = models.from_pretrained(FIXTURES / "models" / "tiny_gpt2")
    gpt2_spec = models.lora_spec(gpt2, "qv", rank=2)
    lora = lj.init(jax.random.key(0), gpt2_params, gpt2_spec)
    with pytest.raises(lj.LoraError, match="fused tensor"):
        peft.to_peft(gpt2_params, lora, gpt2_spec, models.hf_names(gpt2))


def test_save_peft_writes_both_files_or_neither(tmp_path, monkeypatch):
    """A failure while writing the config, after the new weights, leaves the previous folder as it was."""
    import lora_jax.io.peft as peft_io

    model, params = models.from_pretrained(FIXTURES / "models" / "tiny_bert_cls")
    spec = models.lora_spec(model, "qv", rank=2)
    names = models.hf_names(model)
    lora = lj.init(jax.random.key(0), params, spec)
    peft_io.save_peft(tmp_path, params, lora, spec, names)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    changed = jax.tree_util.tree_map(lambda x: x + 1.0, lora)

    def broken_write_text(self, *args, **kwargs):  # the config is written after the weights
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken_write_text)
    with pytest.raises(OSError, match="disk full"):
        peft_io.save_peft(tmp_path, params, changed, spec, names, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
