"""PEFT interop of the LoRA variants against real PEFT fixtures (scripts/make_peft_variants_fixture.py): DoRA
adapters and PiSSA adapters before and after pissa-to-lora load to PEFT's logits and merged weights, export to
what PEFT wrote, and every misfit is refused naming the tensor or setting."""

import dataclasses
import functools
import json
import math
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax import models
from lora_jax.io import peft
from lora_jax.paths import nested_get

FIXTURES = Path(__file__).parent / "fixtures"
DORA = FIXTURES / "peft_dora"  # BERT: q, v, attention output; layer 1's value r=3; the classifier kept whole
DORA_LLAMA = FIXTURES / "peft_dora_llama"  # Llama, rsLoRA: q, v, o (multi-axis outputs and inputs)
PISSA = FIXTURES / "peft_pissa"  # Llama: initial/, trained/ (unconverted), converted/ (rank 2r)
TOLERANCE = 1e-4  # against PyTorch's float32; measured differences are near 1e-6


@functools.cache
def _model(name, scan=False):
    return models.from_pretrained(FIXTURES / "models" / name, scan_layers=scan)


def _logits(name, params, expected, scan=False):
    """Return our logits and PEFT's on the fixture's inputs (a decoder's at unmasked positions only)."""
    model, _ = _model(name, scan)
    ids, mask = expected["input_ids"], expected["attention_mask"]
    if name == "tiny_bert_cls":
        return np.asarray(model.apply({"params": params}, ids, mask)), expected["logits"]
    return np.asarray(model.apply({"params": params}, ids).logits)[mask == 1], expected["logits"][mask == 1]


def _merged_diffs(name, merged, expected, prefix="merged/"):
    """Return, per module of ``expected`` under ``prefix``, the largest difference of our kernel from PEFT's."""
    model, _ = _model(name)
    by_name = {torch_name: (path, layout) for path, (torch_name, layout) in models.hf_names(model).items()}
    diffs = {}
    for key in expected.files:
        if key.startswith(prefix):
            path, layout = by_name[key.removeprefix(prefix)]
            kernel = np.asarray(nested_get(merged, tuple(path.split("/"))))
            ours = kernel.reshape(math.prod(kernel.shape[: layout.in_ndim]), -1).T
            diffs[key] = float(np.abs(ours - expected[key]).max())
    return diffs


def _load(folder, name):
    model, params = _model(name)
    names = models.hf_names(model)
    spec = lj.LoraSpec.from_peft(folder, names)
    return params, spec, peft.load_peft(folder, params, spec, names)


# --- DoRA ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, folder, modules", [("tiny_bert_cls", DORA, 6), ("tiny_llama", DORA_LLAMA, 6)])
def test_dora_adapter_gives_peft_logits_and_merged_weights(name, folder, modules):
    params, spec, lora = _load(folder, name)
    assert {rule.mode for rule in spec.rules} >= {"dora"} and "lora" not in {rule.mode for rule in spec.rules}
    expected = np.load(folder / "expected.npz")
    merged = lj.merge(params, lora, spec)
    diffs = _merged_diffs(name, merged, expected)
    assert len(diffs) == modules and max(diffs.values()) < 1e-5, diffs
    ours, theirs = _logits(name, merged, expected)
    assert np.abs(ours - theirs).max() < TOLERANCE
    # Unmerged, through the factored path (the norm recomputed from W0 + s A B, as PEFT's forward does).
    model, _ = _model(name)
    if name == "tiny_bert_cls":
        forward = lj.factored(lambda p, ids, mask: model.apply({"params": p}, ids, mask), spec)
        got = forward(params, lora, expected["input_ids"], expected["attention_mask"])
    else:
        forward = lj.factored(lambda p, ids: model.apply({"params": p}, ids).logits, spec)
        got = np.asarray(forward(params, lora, expected["input_ids"]))[expected["attention_mask"] == 1]
    assert np.abs(np.asarray(got) - theirs).max() < TOLERANCE
    # The adapter matters: the base alone is far from PEFT's numbers.
    assert np.abs(_logits(name, params, expected)[0] - theirs).max() > 1e-2


def test_dora_adapter_loads_into_the_scanned_layout():
    model, params = _model("tiny_llama", scan=True)
    spec = models.lora_spec(model, ["q", "v", "o"], rank=4, alpha=8, scaling="rslora", mode="dora")
    lora = peft.load_peft(DORA_LLAMA, params, spec, models.hf_names(model))
    assert lora["decoder"]["layers"]["attention"]["query"]["kernel"]["m"].shape == (2, 4, 16)  # [L, H, Dh]
    expected = np.load(DORA_LLAMA / "expected.npz")
    ours, theirs = _logits("tiny_llama", lj.merge(params, lora, spec), expected, scan=True)
    assert np.abs(ours - theirs).max() < TOLERANCE


@pytest.mark.parametrize("name, folder", [("tiny_bert_cls", DORA), ("tiny_llama", DORA_LLAMA)])
def test_dora_export_reproduces_the_peft_file_and_reads_back(tmp_path, name, folder):
    params, spec, lora = _load(folder, name)
    model, _ = _model(name)
    names = models.hf_names(model)
    peft.save_peft(tmp_path, params, lora, spec, names)
    ours, theirs = load_file(str(tmp_path / peft.WEIGHTS)), load_file(str(folder / peft.WEIGHTS))
    assert sorted(ours) == sorted(theirs)
    assert any(key.endswith(".lora_magnitude_vector") for key in ours)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, err_msg=key)
    config, original = (json.loads((f / peft.CONFIG).read_text()) for f in (tmp_path, folder))
    for setting in ("use_dora", "r", "lora_alpha", "use_rslora", "rank_pattern", "modules_to_save"):
        assert config[setting] == original[setting], setting
    assert lj.LoraSpec.from_peft(tmp_path, names) == spec
    back = peft.load_peft(tmp_path, params, spec, names)
    for a, b in zip(jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)


def _copy(tmp_path, source=DORA):
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    return folder


def _edit(folder, change):
    tensors = load_file(str(folder / peft.WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / peft.WEIGHTS))


def _config(folder, **changes):
    config = json.loads((folder / peft.CONFIG).read_text())
    (folder / peft.CONFIG).write_text(json.dumps({**config, **changes}))


MAGNITUDE = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_magnitude_vector"


def test_dora_misfits_are_refused_naming_the_tensor_or_setting(tmp_path):
    model, params = _model("tiny_bert_cls")
    names = models.hf_names(model)
    spec = lj.LoraSpec.from_peft(DORA, names)
    folder = _copy(tmp_path)
    _edit(folder, lambda t: t.update({MAGNITUDE: t[MAGNITUDE][:-1]}))
    with pytest.raises(
        lj.AdapterMismatchError, match=rf"tensor {MAGNITUDE} has shape \(31,\), but needs shape \(32,\)"
    ):
        peft.load_peft(folder, params, spec, names)
    folder = _copy(tmp_path / "missing")
    _edit(folder, lambda t: [t.pop(k) for k in list(t) if k.endswith("lora_magnitude_vector")])
    with pytest.raises(lj.AdapterMismatchError, match=r"has no tensor .*\.lora_magnitude_vector \(the DoRA magnitude"):
        peft.load_peft(folder, params, spec, names)
    folder = _copy(tmp_path / "nan")
    _edit(folder, lambda t: t[MAGNITUDE].__setitem__(0, np.nan))
    with pytest.raises(lj.NonFiniteError, match=MAGNITUDE):
        peft.load_peft(folder, params, spec, names)
    # DoRA weights under plain LoRA rules, and the other way round.
    plain = lj.LoraSpec([dataclasses.replace(r, mode="lora") if r.mode == "dora" else r for r in spec.rules])
    with pytest.raises(lj.AdapterMismatchError, match=r"use_dora=true makes \S+ DoRA, and .* has mode='lora'"):
        peft.load_peft(DORA, params, plain, names)
    folder = _copy(tmp_path / "plain")
    _config(folder, use_dora=False)
    with pytest.raises(lj.AdapterMismatchError, match=r"use_dora=false makes \S+ plain LoRA, .* mode='dora'"):
        peft.load_peft(folder, params, spec, names)
    # A plain LoRA file with magnitudes left in it: PEFT would not read them.
    with pytest.raises(lj.AdapterMismatchError, match=r"holds .*lora_magnitude_vector .* which the spec does not"):
        peft.load_peft(folder, params, lj.LoraSpec.from_peft(folder, names), names)
    # PEFT's use_dora covers every module: a spec mixing the modes does not export.
    mixed = lj.LoraSpec([plain.rules[0], *spec.rules[1:]])
    with pytest.raises(lj.LoraError, match="mixes mode='dora' and mode='lora'"):
        peft.to_peft(params, lj.init(jax.random.key(0), params, mixed), mixed, names)


def test_magnitude_spelled_with_weight_or_adapter_name_reads_the_same(tmp_path):
    params, spec, lora = _load(DORA, "tiny_bert_cls")
    folder = _copy(tmp_path)
    _edit(folder, lambda t: t.update({MAGNITUDE + ".default.weight": t.pop(MAGNITUDE)}))
    model, _ = _model("tiny_bert_cls")
    back = peft.load_peft(folder, params, spec, models.hf_names(model))
    for a, b in zip(jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)
    _edit(folder, lambda t: t.update({MAGNITUDE + ".weight": t[MAGNITUDE + ".default.weight"]}))
    with pytest.raises(lj.CheckpointCorruptError, match=rf"holds {MAGNITUDE} twice"):
        peft.load_peft(folder, params, spec, models.hf_names(model))


# --- PiSSA ---------------------------------------------------------------------------------------------------------


def test_pissa_residual_and_factors_match_peft():
    model, params = _model("tiny_llama")
    names = models.hf_names(model)
    spec = lj.LoraSpec.from_peft(PISSA / "initial", names)
    residual, initial = lj.pissa_init(params, spec)
    expected = np.load(PISSA / "expected.npz")
    diffs = _merged_diffs("tiny_llama", residual, expected, prefix="residual/")
    assert len(diffs) == 8 and max(diffs.values()) < 1e-5, diffs
    # PEFT's initial factors are ours up to the sign of each singular pair.
    theirs = peft.load_peft(PISSA / "initial", params, spec, names)
    for path in ("decoder/layer_0/attention/query/kernel", "decoder/layer_1/mlp/gate/kernel"):
        ours_ab, theirs_ab = (nested_get(t, tuple(path.split("/"))) for t in (initial, theirs))
        signs = np.sign(np.sum(np.asarray(ours_ab["a"]) * np.asarray(theirs_ab["a"]), axis=0))
        # Singular vectors of close singular values carry float32 SVD differences of ~1e-5 (entries ~0.1).
        np.testing.assert_allclose(np.asarray(ours_ab["a"]) * signs, theirs_ab["a"], atol=1e-4)
        b, tb = np.asarray(ours_ab["b"]), np.asarray(theirs_ab["b"])
        np.testing.assert_allclose(b * signs.reshape((-1,) + (1,) * (b.ndim - 1)), tb, atol=1e-4)


def test_pissa_converted_by_peft_loads_onto_the_original_base():
    params, spec, lora = _load(PISSA / "converted", "tiny_llama")
    ranks = {rule.name: (rule.rank, rule.alpha) for rule in spec.rules}
    assert ranks["model.layers.0.self_attn.q_proj"] == (8, 16)  # r=4, alpha=8 doubled
    assert ranks["model.layers.1.self_attn.v_proj"] == (4, 16)  # rank_pattern 2 doubled
    assert ranks["model.layers.0.self_attn.o_proj"] == (8, 4)  # alpha_pattern 2 doubled
    expected = np.load(PISSA / "expected.npz")
    merged = lj.merge(params, lora, spec)
    diffs = _merged_diffs("tiny_llama", merged, expected)
    assert len(diffs) == 8 and max(diffs.values()) < 1e-5, diffs
    ours, theirs = _logits("tiny_llama", merged, expected)
    assert np.abs(ours - theirs).max() < TOLERANCE
    assert np.abs(ours - expected["converted_logits"][expected["attention_mask"] == 1]).max() < TOLERANCE


def test_pissa_unconverted_loads_with_its_residual_and_converts_like_peft(tmp_path):
    model, params = _model("tiny_llama")
    names = models.hf_names(model)
    spec = lj.LoraSpec.from_peft(PISSA / "trained", names)
    with pytest.raises(lj.AdapterMismatchError, match=r"init_lora_weights='pissa'.*load_peft_pissa"):
        peft.load_peft(PISSA / "trained", params, spec, names)
    residual, lora = peft.load_peft_pissa(PISSA / "trained", params, spec, names)
    expected = np.load(PISSA / "expected.npz")
    ours, theirs = _logits("tiny_llama", lj.merge(residual, lora, spec), expected)
    assert np.abs(ours - theirs).max() < TOLERANCE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forward = lj.factored(lambda p, ids: model.apply({"params": p}, ids).logits, spec)
        unmerged = np.asarray(forward(residual, lora, expected["input_ids"]))[expected["attention_mask"] == 1]
    assert np.abs(unmerged - theirs).max() < TOLERANCE
    # pissa-to-lora with PEFT's initial factors writes PEFT's converted file, tensor for tensor.
    initial = peft.load_peft(PISSA / "initial", residual, spec, names)
    converted, converted_spec = lj.pissa_to_lora(params, lora, spec, initial)
    peft.save_peft(tmp_path / "theirs", params, converted, converted_spec, names)
    written, wanted = (load_file(str(f / peft.WEIGHTS)) for f in (tmp_path / "theirs", PISSA / "converted"))
    assert sorted(written) == sorted(wanted)
    for key in wanted:
        np.testing.assert_allclose(written[key], wanted[key], rtol=1e-6, atol=1e-7, err_msg=key)
    config, original = (json.loads((f / peft.CONFIG).read_text()) for f in (tmp_path / "theirs", PISSA / "converted"))
    for setting in ("r", "lora_alpha", "init_lora_weights", "use_dora"):
        assert config[setting] == original[setting], setting
    # The patterns may be spelled otherwise (whole module names), but give each module PEFT's rank and alpha.
    assert lj.LoraSpec.from_peft(config, names) == lj.LoraSpec.from_peft(original, names) == converted_spec
    # With our own initial factors (signs may differ from PyTorch's SVD) the delta, and so the model, is the same.
    converted, converted_spec = lj.pissa_to_lora(params, lora, spec, lj.pissa_init(params, spec)[1])
    peft.save_peft(tmp_path / "ours", params, converted, converted_spec, names)
    back_spec = lj.LoraSpec.from_peft(tmp_path / "ours", names)
    back = peft.load_peft(tmp_path / "ours", params, back_spec, names)
    merged = lj.merge(params, back, back_spec)
    assert max(_merged_diffs("tiny_llama", merged, expected).values()) < 1e-5
    ours, theirs = _logits("tiny_llama", merged, expected)
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_pissa_misfits_are_refused(tmp_path):
    model, params = _model("tiny_llama")
    names = models.hf_names(model)
    spec = lj.LoraSpec.from_peft(PISSA / "trained", names)
    with pytest.raises(lj.AdapterMismatchError, match="init_lora_weights=True is not an unconverted PiSSA"):
        peft.load_peft_pissa(PISSA / "converted", params, lj.LoraSpec.from_peft(PISSA / "converted", names), names)
    folder = _copy(tmp_path, PISSA / "trained")
    _config(folder, init_lora_weights="pissa_niter_4")
    with pytest.raises(lj.AdapterMismatchError, match="randomized SVD"):
        peft.load_peft_pissa(folder, params, spec, names)
    with pytest.raises(lj.AdapterMismatchError, match="init_lora_weights='pissa_niter_4'.*residual base"):
        peft.load_peft(folder, params, spec, names)
