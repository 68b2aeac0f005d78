"""Self-describing adapters: the spec as data, stored in the adapter file, and the spec of a PEFT adapter."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax import io, models
from lora_jax.io import peft

FIXTURES = Path(__file__).parent / "fixtures"
PEFT_DIR = FIXTURES / "peft"

PARAMS = {
    "enc": {"q": {"kernel": jnp.ones((16, 8))}, "v": {"kernel": jnp.ones((16, 2, 4))}, "norm": jnp.ones((8,))},
    "head": jnp.ones((8, 2)),
}
SPEC = lj.LoraSpec(
    [
        lj.Rule("enc/q/kernel", rank=4, alpha=16, scaling="rslora", init="gaussian", init_std=0.5, name="q"),
        lj.Rule("enc/v/kernel", rank=2, alpha=3.5, dropout=0.1, dtype="bfloat16", in_axes=0),
        lj.freeze("enc/norm"),
        lj.trainable("head"),
    ]
)


def _trained():
    lora = lj.init(jax.random.key(0), PARAMS, SPEC)
    return jax.tree_util.tree_map(lambda x: x + jax.random.normal(jax.random.key(1), x.shape, x.dtype), lora)


def test_spec_round_trips_through_json():
    data = json.loads(json.dumps(SPEC.to_dict()))
    assert data["version"] == 1 and len(data["rules"]) == 4
    assert data["rules"][1]["in_axes"] == [0] and data["rules"][1]["dtype"] == "bfloat16"
    back = lj.LoraSpec.from_dict(data)
    assert back == SPEC and hash(back) == hash(SPEC)
    # Left-out fields take the defaults; only the pattern is required.
    assert lj.LoraSpec.from_dict({"version": 1, "rules": [{"pattern": "a"}]}) == lj.LoraSpec([lj.Rule("a")])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "mapping"),
        ({"version": 1, "rules": [{"pattern": "a"}], "extra": 1}, "unknown key 'extra'"),
        ({"version": 2, "rules": [{"pattern": "a"}]}, "version 2"),
        ({"version": 1, "rules": []}, "non-empty list"),
        ({"version": 1, "rules": [{"pattern": "a"}, {"pattern": "b", "rnak": 4}]}, "rule 1: unknown field 'rnak'"),
        ({"version": 1, "rules": [{"rank": 4}]}, "rule 0: no 'pattern'"),
        ({"version": 1, "rules": [{"pattern": "a", "rank": "8"}]}, "rule 0: field 'rank' must be an integer"),
        ({"version": 1, "rules": [{"pattern": "a", "rank": True}]}, "field 'rank' must be an integer"),
        ({"version": 1, "rules": [{"pattern": "a", "alpha": None}]}, "field 'alpha' must be a number"),
        ({"version": 1, "rules": [{"pattern": "a", "in_axes": [0.5]}]}, "field 'in_axes' must be a list"),
        ({"version": 1, "rules": [{"pattern": "a", "in_axes": 0}]}, "field 'in_axes' must be a list"),
        ({"version": 1, "rules": ["a"]}, "rule 0: expected a mapping"),
        ({"version": 1, "rules": [{"pattern": "a"}, {"pattern": "b", "rank": 0}]}, "rule 1: .*rank must be"),
        ({"version": 1, "rules": [{"pattern": "a", "mode": "bogus"}]}, "rule 0: .*mode"),
        ({"version": 1, "rules": [{"pattern": "a", "dtype": "float99"}]}, "rule 0"),
        ({"version": 1, "rules": [{"pattern": "("}]}, "rule 0: .*regex"),
    ],
)
def test_stored_spec_is_checked(data, message):
    with pytest.raises(lj.SpecError, match=message):
        lj.LoraSpec.from_dict(data)


def test_predicate_rules_cannot_be_stored(tmp_path):
    def is_head(path, leaf):
        return path == "head"

    spec = lj.LoraSpec([SPEC.rules[0], lj.Rule(is_head, mode="train", name="the head")])
    with pytest.raises(lj.SpecError, match=r"'the head' \(rule 1\) has a predicate.*pass the spec"):
        spec.to_dict()
    lora = lj.init(jax.random.key(0), PARAMS, spec)
    with pytest.warns(UserWarning, match="predicate rule.*load_adapter\\(path, params, spec\\)"):
        path = io.save_adapter(tmp_path / "p.safetensors", PARAMS, lora, spec)
    with pytest.raises(lj.CheckpointCorruptError, match="p.safetensors stores no spec.*pass the spec"):
        lj.LoraSpec.from_file(path)
    with pytest.raises(lj.CheckpointCorruptError, match="p.safetensors stores no spec"):
        io.load_adapter(path, PARAMS)
    assert jax.tree_util.tree_structure(io.load_adapter(path, PARAMS, spec)) == jax.tree_util.tree_structure(lora)


def test_adapter_file_loads_without_its_spec(tmp_path):
    lora = _trained()
    path = io.save_adapter(tmp_path / "a.safetensors", PARAMS, lora, SPEC)
    assert lj.LoraSpec.from_file(path) == SPEC
    restored = lj.load_adapter(path, PARAMS)
    for a, b in zip(jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(restored)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # The base is still checked against the stored signature.
    other_base = {**PARAMS, "head": jnp.ones((8, 3))}
    with pytest.raises(lj.AdapterMismatchError, match="head"):
        lj.load_adapter(path, other_base)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        lj.LoraSpec.from_file(tmp_path / "nothing.safetensors")


def test_damaged_stored_spec_names_the_file(tmp_path):
    path = io.save_adapter(tmp_path / "a.safetensors", PARAMS, _trained(), SPEC)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata())
    for damaged in ("{not json", json.dumps({"version": 1, "rules": [{"pattern": "a", "rank": "x"}]})):
        save_file(tensors, str(path), metadata={**metadata, "spec": damaged})
        with pytest.raises(lj.CheckpointCorruptError, match="a.safetensors: damaged spec"):
            lj.LoraSpec.from_file(path)
        with pytest.raises(lj.CheckpointCorruptError, match="a.safetensors"):
            io.load_adapter(path, PARAMS)
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(lj.CheckpointCorruptError, match="a.safetensors: not a readable"):
        lj.LoraSpec.from_file(path)


def _tiny_bert():
    return models.from_pretrained(FIXTURES / "models" / "tiny_bert_cls")


def test_spec_from_peft_reads_the_peft_fixture():
    model, params = _tiny_bert()
    names = models.hf_names(model)
    spec = lj.LoraSpec.from_peft(PEFT_DIR, names)
    by_name = {rule.name: rule for rule in spec.rules}
    value1 = by_name["bert.encoder.layer.1.attention.self.value"]
    assert (value1.rank, value1.alpha, value1.pattern) == (3, 4, "bert/encoder/layer_1/attention/value/kernel")
    out0 = by_name["bert.encoder.layer.0.attention.output.dense"]
    assert (out0.rank, out0.alpha, out0.in_axes) == (2, 4, (0, 1))
    assert by_name["classifier"].mode == "train"
    assert len([r for r in spec.rules if r.mode == "lora"]) == 6  # q, v, o in two layers
    # The spec reads the folder and gives PEFT's logits, as the hand-written spec of test_peft does.
    lora = peft.load_peft(PEFT_DIR, params, spec, names)
    expected = np.load(PEFT_DIR / "expected.npz")
    logits = model.apply({"params": lj.merge(params, lora, spec)}, expected["input_ids"], expected["attention_mask"])
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-5)
    # A dict works as well as the folder, and the spec stores.
    config = json.loads((PEFT_DIR / "adapter_config.json").read_text())
    assert lj.LoraSpec.from_peft(config, names) == spec
    # Written back, the config names the same modules, as precisely as PEFT's own did.
    _, written = peft.to_peft(params, lora, spec, names)
    assert written["target_modules"] == sorted(config["target_modules"])
    assert lj.LoraSpec.from_peft(written, names) == spec
    assert lj.LoraSpec.from_dict(spec.to_dict()) == spec


def test_spec_from_peft_patterns_and_refusals(tmp_path):
    model, _ = _tiny_bert()
    names = models.hf_names(model)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
    config = {**base, "rank_pattern": {"layer.1.attention.self.query": 3, "value": 2}, "alpha_pattern": {"alue": 9}}
    spec = lj.LoraSpec.from_peft({**config, "use_rslora": True}, names)
    ranks = {rule.name: (rule.rank, rule.alpha, rule.scaling) for rule in spec.rules}
    assert ranks["bert.encoder.layer.0.attention.self.query"] == (4, 8, "rslora")
    assert ranks["bert.encoder.layer.1.attention.self.query"] == (3, 8, "rslora")
    # "alue" is a regex that must end the name after a dot, as PEFT matches it: it does not match "value".
    assert ranks["bert.encoder.layer.0.attention.self.value"] == (2, 8, "rslora")
    regex = lj.LoraSpec.from_peft({**base, "target_modules": r".*layer\.0\.attention\.self\.(query|key)"}, names)
    assert sorted(r.name for r in regex.rules) == [
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.query",
    ]
    excluded = lj.LoraSpec.from_peft({**base, "exclude_modules": ["layer.1.attention.self.value"]}, names)
    assert "bert.encoder.layer.1.attention.self.value" not in {r.name for r in excluded.rules}
    for bad, message in [
        ({**base, "peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
        ({**base, "use_dora": "yes"}, "use_dora must be true or false"),
        ({**base, "target_modules": "all-linear"}, "all-linear"),
        ({**base, "target_modules": ["nothing_like_this"]}, "select no module of the base model"),
        ({**base, "target_modules": ["LayerNorm"]}, "not a linear kernel"),
        ({**base, "r": "4"}, "r must be a positive integer"),
    ]:
        with pytest.raises(lj.LoraError, match=message):
            lj.LoraSpec.from_peft(bad, names)
    gpt2, _ = models.from_pretrained(FIXTURES / "models" / "tiny_gpt2")
    with pytest.raises(lj.LoraError, match="c_attn is a fused tensor"):
        lj.LoraSpec.from_peft({**base, "target_modules": ["c_attn"]}, models.hf_names(gpt2))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lj.LoraSpec.from_peft(tmp_path, names)
    (tmp_path / "adapter_config.json").write_text("{oops")
    with pytest.raises(lj.LoraError, match="adapter_config.json: is not JSON"):
        lj.LoraSpec.from_peft(tmp_path, names)
