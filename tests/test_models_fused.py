"""GPT-2 with its fused c_attn kept whole (fused_qkv) and the "qv" preset on its slices."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax import models
from lora_jax.io import peft
from lora_jax.models.common.config import to_hf

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "tiny_gpt2"
IDS = jnp.array([[5, 9, 2, 40, 7, 11], [3, 3, 60, 1, 0, 2]])
RANK = 2


@pytest.fixture(scope="module")
def pair():
    """The split model and the fused one, loaded from the same checkpoint."""
    return models.from_pretrained(FIXTURE), models.from_pretrained(FIXTURE, fused_qkv=True)


def _logits(model, params):
    return model.apply({"params": params}, IDS).logits


def _split_lora(split):
    """Trained-looking q and v adapters of the split model (B non-zero)."""
    model, params = split
    spec = models.lora_spec(model, "qv", rank=RANK, alpha=4)
    lora = lj.init(jax.random.key(0), params, spec)
    keys = iter(jax.random.split(jax.random.key(1), 32))
    return spec, jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), lora)


def _fused_from_split(split_lora, layers):
    """The same adapters as one sliced adapter per fused kernel: A stacked q|v, B per slice [2r, 1, H, Dh]."""
    out = {}
    for i in range(layers):
        attention = split_lora["decoder"][f"layer_{i}"]["attention"]
        q, v = attention["query"]["kernel"], attention["value"]["kernel"]
        a = jnp.concatenate([q["a"], v["a"]], axis=-1)
        b = jnp.concatenate([q["b"], v["b"]], axis=0)[:, None]
        out[f"layer_{i}"] = {"attention": {"qkv": {"kernel": {"a": a, "b": b}}}}
    return {"decoder": out}


def test_fused_model_loads_c_attn_whole_and_computes_the_same(pair):
    (split, split_params), (fused, fused_params) = pair
    attention = fused_params["decoder"]["layer_0"]["attention"]
    assert set(attention) == {"qkv", "out"}
    d, h = split.config.n_embd, split.config.n_head
    assert attention["qkv"]["kernel"].shape == (d, 3, h, d // h) and attention["qkv"]["bias"].shape == (3, h, d // h)
    for j, name in enumerate(("query", "key", "value")):
        kept = split_params["decoder"]["layer_0"]["attention"][name]
        np.testing.assert_array_equal(attention["qkv"]["kernel"][:, j], kept["kernel"])
        np.testing.assert_array_equal(attention["qkv"]["bias"][j], kept["bias"])
    np.testing.assert_allclose(_logits(fused, fused_params), _logits(split, split_params), rtol=1e-6, atol=1e-6)
    scanned, scanned_params = models.from_pretrained(FIXTURE, fused_qkv=True, scan_layers=True)
    assert scanned_params["decoder"]["layers"]["attention"]["qkv"]["kernel"].shape == (2, d, 3, h, d // h)
    np.testing.assert_allclose(_logits(scanned, scanned_params), _logits(split, split_params), rtol=1e-5, atol=1e-5)
    assert "fused_qkv" not in to_hf(fused.config)  # a layout option, no config.json entry
    with pytest.raises(models.ConfigError, match="fused_qkv applies to GPT2LMHeadModel or GPT2Model"):
        models.from_pretrained(FIXTURE.parent / "tiny_llama", fused_qkv=True)


def test_fused_generation_equals_split(pair):
    (split, split_params), (fused, fused_params) = pair
    prompt = IDS[:, :3]
    np.testing.assert_array_equal(
        models.generate(fused, fused_params, prompt, 4), models.generate(split, split_params, prompt, 4)
    )


def test_export_writes_c_attn_back_as_the_checkpoint_had_it(pair, tmp_path):
    (split, split_params), (fused, fused_params) = pair
    spec = models.lora_spec(fused, "qv", rank=RANK, alpha=4)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lj.init(jax.random.key(0), fused_params, spec))
    models.save_pretrained(tmp_path / "base", fused, fused_params)
    source = load_file(str(FIXTURE / "model.safetensors"))
    exported = load_file(str(tmp_path / "base" / "model.safetensors"))
    for key in ("transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias"):
        np.testing.assert_array_equal(exported[key], source[key])
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert "fused_qkv" not in config
    merged = lj.merge(fused_params, lora, spec)
    models.save_pretrained(tmp_path / "merged", fused, merged)
    split_back, split_loaded = models.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(_logits(split_back, split_loaded), _logits(fused, merged), rtol=1e-5, atol=1e-5)


def test_qv_slices_equal_separate_q_and_v_adapters(pair):
    (split, split_params), (fused, fused_params) = pair
    split_spec, split_lora = _split_lora(pair[0])
    spec = models.lora_spec(fused, "qv", rank=RANK, alpha=4)
    (rule,) = spec.rules
    assert (rule.slices, rule.adapt, rule.slice_axis) == (("q", "k", "v"), ("q", "v"), 1)
    lora = _fused_from_split(split_lora, fused.config.n_layer)
    assert jax.tree_util.tree_structure(lora) == jax.tree_util.tree_structure(
        lj.init(jax.random.key(0), fused_params, spec)
    )

    merged = lj.merge(fused_params, lora, spec)
    split_merged = lj.merge(split_params, split_lora, split_spec)
    for i in range(fused.config.n_layer):
        kernel = merged["decoder"][f"layer_{i}"]["attention"]["qkv"]["kernel"]
        for j, name in enumerate(("query", "key", "value")):
            want = split_merged["decoder"][f"layer_{i}"]["attention"][name]["kernel"]
            np.testing.assert_allclose(kernel[:, j], want, rtol=1e-6, atol=1e-6)
        base = fused_params["decoder"][f"layer_{i}"]["attention"]["qkv"]["kernel"]
        assert np.all(np.asarray(kernel[:, 1]) - np.asarray(base[:, 1]) == 0.0)  # k: exactly the base
        assert np.abs(np.asarray(kernel[:, 0]) - np.asarray(base[:, 0])).max() > 1e-3
    want = jax.jit(lambda lo: _logits(split, lj.combine(split_params, lo, split_spec)))(split_lora)
    got = jax.jit(lambda lo: _logits(fused, lj.combine(fused_params, lo, spec)))(lora)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    forward = lj.factored(lambda p, ids: fused.apply({"params": p}, ids).logits, spec)
    got = jax.jit(lambda lo: forward(fused_params, lo, IDS))(lora)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _loss(model):
    def loss(p, batch, rng):
        logits = model.apply({"params": p}, batch["ids"][:, :-1]).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["ids"][:, 1:, None], -1))

    return loss


def test_factored_equals_combine_forward_and_gradients(pair):
    _, (fused, fused_params) = pair
    spec = models.lora_spec(fused, "qv", rank=RANK, alpha=4)
    _, split_lora = _split_lora(pair[0])
    lora = _fused_from_split(split_lora, fused.config.n_layer)
    loss = _loss(fused)
    batch = {"ids": IDS}
    forward = lj.factored(lambda p, b: loss(p, b, None), spec)
    on_combined = jax.jit(lambda lo: loss(lj.combine(fused_params, lo, spec), batch, None))
    on_factored = jax.jit(lambda lo: forward(fused_params, lo, batch))
    np.testing.assert_allclose(on_factored(lora), on_combined(lora), rtol=1e-5)
    grad_f = jax.jit(jax.grad(on_factored))(lora)
    grad_c = jax.jit(jax.grad(on_combined))(lora)
    for got, want in zip(jax.tree_util.tree_leaves(grad_f), jax.tree_util.tree_leaves(grad_c), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_training_leaves_the_k_slice_exactly_at_the_base(scan):
    model, params = models.from_pretrained(FIXTURE, fused_qkv=True, scan_layers=scan)
    spec = models.lora_spec(model, "qv", rank=RANK, alpha=4)
    tx = optax.adam(2e-2)
    step = jax.jit(lj.training.train_step(_loss(model), spec, tx))
    lora = lj.init(jax.random.key(0), params, spec)
    opt_state = tx.init(lora)
    losses = []
    for i in range(4):
        lora, opt_state, loss = step(params, lora, opt_state, {"ids": IDS}, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    merged = lj.merge(params, lora, spec)
    layers = ["layers"] if scan else ["layer_0", "layer_1"]
    for layer in layers:
        before = np.asarray(params["decoder"][layer]["attention"]["qkv"]["kernel"])
        after = np.asarray(merged["decoder"][layer]["attention"]["qkv"]["kernel"])
        delta = after - before
        k = delta[:, :, 1] if scan else delta[:, 1]
        q, v = (delta[:, :, j] if scan else delta[:, j] for j in (0, 2))
        assert np.all(k == 0.0), f"{layer}: the k slice moved"
        assert np.abs(q).max() > 0 and np.abs(v).max() > 0


def test_adapter_file_and_describe(pair, tmp_path):
    _, (fused, fused_params) = pair
    spec = models.lora_spec(fused, "qv", rank=RANK, alpha=4)
    _, split_lora = _split_lora(pair[0])
    lora = _fused_from_split(split_lora, fused.config.n_layer)
    path = lj.save_adapter(tmp_path / "qv.safetensors", fused_params, lora, spec)
    assert lj.LoraSpec.from_file(path) == spec
    back = lj.load_adapter(path, fused_params)
    for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lora), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(lj.AdapterMismatchError, match=r"adapt \['q', 'v'\] in the file, \['q', 'k', 'v'\] now"):
        lj.load_adapter(path, fused_params, models.lora_spec(fused, "qkv", rank=RANK, alpha=4))
    table = str(lj.describe(fused_params, spec))
    d, h = fused.config.n_embd, fused.config.n_head
    row = f"decoder/layer_0/attention/qkv/kernel  {d}x3x{h}x{d // h}"
    assert row in table and "slices q|k|v of axis 1" in table and f"{RANK} on q,v" in table
    per_layer = d * 2 * RANK + 2 * RANK * d  # A [D, 2r], B [2r, 1, H, Dh]: as the split q and v adapters
    split_spec, _ = _split_lora(pair[0])
    split_params = pair[0][1]
    assert lj.describe(fused_params, spec).trainable_size == 2 * per_layer
    assert lj.describe(split_params, split_spec).trainable_size == 2 * per_layer


def test_presets_and_partition_rules_on_the_fused_model(pair):
    (split, _), (fused, fused_params) = pair
    every = models.lora_spec(fused, "all-linear", rank=RANK)
    assert [r.name for r in every.rules] == ["attention.qkv", "attention.out", "mlp.fc", "mlp.proj"]
    assert every.rules[0].adapt == ("q", "k", "v")
    assert models.lora_spec(fused, ["v"], rank=RANK).rules[0].adapt == ("v",)
    assert models.lora_spec(fused.config, "qv") == models.lora_spec(fused, "qv")
    assert [r.name for r in models.lora_spec(split, "qv").rules] == ["attention.query", "attention.value"]
    with pytest.raises(lj.SpecError, match="unknown targets"):
        models.lora_spec(fused, ["qkv"])  # the fused kernel is reached through its slices' names
    from lora_jax.distributed import lora_partitions, partitions

    parts = partitions(fused_params, models.tensor_parallel_rules("model"))
    qkv = parts["decoder"]["layer_0"]["attention"]["qkv"]
    assert tuple(qkv["kernel"]) == (None, None, "model", None)  # the heads, not the q|k|v axis
    assert tuple(qkv["bias"]) == (None, "model", None)
    adapters = lora_partitions(fused_params, every, parts)["decoder"]["layer_0"]["attention"]["qkv"]["kernel"]
    assert (tuple(adapters["a"]), tuple(adapters["b"])) == ((None, None), (None, None, "model", None))


def test_peft_export_is_one_c_attn_adapter_with_zero_k_rows(pair, tmp_path):
    (split, split_params), (fused, fused_params) = pair
    spec = models.lora_spec(fused, "qv", rank=RANK, alpha=4) + models.lora_spec(fused, ["fc"], rank=3, alpha=6)
    lora = lj.init(jax.random.key(0), fused_params, spec)
    keys = iter(jax.random.split(jax.random.key(1), 32))
    lora = jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), lora)
    peft.save_peft(tmp_path, fused_params, lora, spec, models.hf_names(fused))
    tensors = load_file(str(tmp_path / peft.WEIGHTS))
    config = json.loads((tmp_path / peft.CONFIG).read_text())
    d = fused.config.n_embd
    module = "base_model.model.transformer.h.1.attn.c_attn"
    a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
    assert a.shape == (2 * RANK, d) and b.shape == (3 * d, 2 * RANK)
    assert np.all(b[d : 2 * d] == 0.0) and np.all(b[:d, RANK:] == 0.0) and np.all(b[2 * d :, :RANK] == 0.0)
    assert config["fan_in_fan_out"] is True
    # c_attn takes the config's r and lora_alpha (the patterns name only c_fc): rank 2r, alpha 2 * 4.
    assert (config["r"], config["lora_alpha"]) == (2 * RANK, 8)
    assert not any("c_attn" in key for key in (*config["rank_pattern"], *config["alpha_pattern"]))
    r, alpha = config["r"], config["lora_alpha"]
    # PEFT's arithmetic with fan_in_fan_out: W [in, out] + alpha / r * (B @ A)^T, the merged fused kernel.
    weight = load_file(str(FIXTURE / "model.safetensors"))["transformer.h.1.attn.c_attn.weight"]
    want = weight + (alpha / r) * (b @ a).T
    merged = lj.merge(fused_params, lora, spec)["decoder"]["layer_1"]["attention"]["qkv"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged).reshape(d, 3 * d), want, rtol=1e-5, atol=1e-6)
    fc = "base_model.model.transformer.h.0.mlp.c_fc"
    assert tensors[f"{fc}.lora_A.weight"].shape == (3, d)
    # The folder reads back as PEFT sees it, one rank-2r adapter on c_attn, with the same merged weights;
    names = models.hf_names(fused)
    back_spec = lj.LoraSpec.from_peft(tmp_path, names)
    back = lj.merge(fused_params, peft.load_peft(tmp_path, fused_params, back_spec, names), back_spec)
    for key, value in _flat(lj.merge(fused_params, lora, spec)).items():
        np.testing.assert_allclose(_flat(back)[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # and under the spec with slices as the slices again, exactly.
    again = peft.load_peft(tmp_path, fused_params, spec, names)
    for key, value in _flat(lora).items():
        assert np.array_equal(_flat(again)[key], value), key


@pytest.mark.parametrize("scan", [False, True])
def test_peft_c_attn_adapter_reads_into_slices_only_when_it_is_slices(scan, tmp_path):
    fused, fused_params = models.from_pretrained(FIXTURE, fused_qkv=True, scan_layers=scan)
    spec = models.lora_spec(fused, "qv", rank=RANK, alpha=4)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lj.init(jax.random.key(0), fused_params, spec))
    names = models.hf_names(fused)
    peft.save_peft(tmp_path, fused_params, lora, spec, names)
    # A rank the slices do not give: 2 slices of rank 3 would be PEFT's r=6, the file has r=4.
    other = models.lora_spec(fused, "qv", rank=3, alpha=6)
    with pytest.raises(lj.AdapterMismatchError, match=r"c_attn: the PEFT file has r=4.* r=3 on each of 2 slices"):
        peft.load_peft(tmp_path, fused_params, other, names)
    # A B that reaches the k slice (trained in PEFT as one adapter on c_attn) is no pair of slice adapters.
    tensors = load_file(str(tmp_path / peft.WEIGHTS))
    d, key = fused.config.n_embd, "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tensors[key][d + 3, 0] = 1e-3
    save_file(tensors, str(tmp_path / peft.WEIGHTS))
    with pytest.raises(lj.AdapterMismatchError, match=f"tensor {key} reaches outputs of .*qkv/kernel outside"):
        peft.load_peft(tmp_path, fused_params, spec, names)
    # (layer 1's tensor named, in a scanned stack too). Read as PEFT sees it, the same file loads.
    if not scan:  # from_peft's per-module rules name layers, which a scanned stack does not have
        assert peft.load_peft(tmp_path, fused_params, lj.LoraSpec.from_peft(tmp_path, names), names)


def _flat(tree):
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
