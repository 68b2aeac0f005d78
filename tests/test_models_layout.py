"""Layer layouts, LoRA presets, bfloat16, dropout and sampling for the bundled models."""

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
import lora_jax.models as models
from lora_jax.paths import flatten

FIXTURES = Path(__file__).parent / "fixtures" / "models"


def load(name: str, **kwargs):
    return models.from_pretrained(FIXTURES / name, **kwargs)


@functools.cache
def jitted(model):
    return jax.jit(model.apply, static_argnames="deterministic")


def apply(model, params, *args, **kwargs):
    return jitted(model)({"params": params}, *args, **kwargs)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return models.from_pretrained(minilm_dir)


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", "tiny_bert_cls"])
def test_stack_and_unstack_convert_between_layouts(name):
    unrolled_model, unrolled = load(name)
    scanned_model, scanned = load(name, scan_layers=True)
    stacked = models.stack_layers(unrolled)
    assert jax.tree.structure(stacked) == jax.tree.structure(scanned)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(scanned)):
        np.testing.assert_array_equal(a, b)
    back = models.unstack_layers(scanned)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(unrolled)):
        np.testing.assert_array_equal(a, b)

    ids = np.arange(14, dtype=np.int32).reshape(2, 7) % 50 + 1
    out_unrolled = jax.tree.leaves(apply(unrolled_model, unrolled, ids))
    out_scanned = jax.tree.leaves(apply(scanned_model, scanned, ids))
    for a, b in zip(out_unrolled, out_scanned):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_scanned_paths_read_naturally():
    _, params = load("tiny_llama", scan_layers=True)
    names = {path for path, _ in flatten(params)[0]}
    assert ("decoder", "layers", "attention", "query", "kernel") in names
    kernel = params["decoder"]["layers"]["attention"]["key"]["kernel"]
    assert kernel.shape == (2, 64, 2, 16)  # [layers, D, kv heads, Dh]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_minilm_qv_preset_adapter_size(minilm, scan):
    model, params = minilm
    if scan:
        model, params = model.clone(scan_layers=True), models.stack_layers(params)
    spec = models.lora_spec(model, "qv", rank=8)
    assert lora_jax.describe(params, spec).adapter_size == 2 * 6 * 8 * (384 + 384) == 73728
    layer = "layers" if scan else "layer_3"
    assert any(t.name == f"encoder/{layer}/attention/query/kernel" for t in lora_jax.plan(params, spec))
    assert lora_jax.describe(params, models.lora_spec(model, "all-linear", rank=8, scan_layers=scan)).adapter_size == (
        6 * 8 * (4 * (384 + 384) + 2 * (384 + 1536))
    )


def test_lora_through_a_scanned_decoder_matches_merge():
    model, params = load("tiny_llama", scan_layers=True)
    spec = models.lora_spec(model, "all-linear", rank=4, alpha=8.0)
    lora = jax.jit(lora_jax.init, static_argnums=2)(jax.random.key(0), params, spec)
    ids = np.array([[5, 6, 7, 8]], np.int32)

    @jax.jit
    def with_lora(params, lora):
        return model.apply({"params": lora_jax.combine(params, lora, spec)}, ids).logits

    base = apply(model, params, ids).logits
    np.testing.assert_allclose(with_lora(params, lora), base, atol=1e-6)
    rng = np.random.default_rng(1)
    lora = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), lora)
    combined = with_lora(params, lora)
    merged = apply(model, jax.jit(lora_jax.merge, static_argnums=2)(params, lora, spec), ids).logits
    assert np.abs(combined - base).max() > 1e-3
    np.testing.assert_allclose(combined, merged, atol=1e-4)


def test_classifier_preset_trains_the_head():
    model, params = load("tiny_bert_cls")
    spec = models.lora_spec(model, "qkvo", rank=2, head=True)
    description = lora_jax.describe(params, spec)
    full = {t.name for t in description.targets if t.layout is None}
    assert full == {"classifier/kernel", "classifier/bias"}
    assert description.trainable_size == description.adapter_size + 32 * 3 + 3
    with pytest.raises(ValueError, match="classification"):
        models.lora_spec(load("tiny_gpt2")[0], head=True)
    with pytest.raises(ValueError, match="unknown targets"):
        models.lora_spec(model, "qz")


def test_bfloat16_stays_close_to_float32(minilm):
    model, params = load("tiny_llama")
    half_model, half = load("tiny_llama", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    ids = np.array([[1, 2, 3, 4, 5, 6]], np.int32)
    full_logits = apply(model, params, ids).logits
    half_logits = apply(half_model, half, ids).logits
    scale = float(np.abs(full_logits).max())
    assert np.abs(half_logits - full_logits).max() <= 0.05 * scale

    encoder, weights = minilm
    half_encoder = encoder.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    half_weights = jax.tree.map(lambda x: x.astype(jnp.bfloat16), weights)
    ids = np.array([[101, 1037, 2158, 2003, 5983, 2833, 1012, 102]], np.int32)
    mask = np.ones_like(ids)
    full_emb = models.sentence_embeddings(encoder, weights, ids, mask)
    half_emb = models.sentence_embeddings(half_encoder, half_weights, ids, mask)
    assert float(jnp.sum(full_emb * half_emb)) > 0.99


def test_dropout_only_when_not_deterministic():
    model, params = load("tiny_bert_cls")
    ids = np.array([[3, 4, 5, 6]], np.int32)
    first = apply(model, params, ids)
    np.testing.assert_array_equal(first, apply(model, params, ids))
    noisy = apply(model, params, ids, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert np.abs(noisy - first).max() > 1e-4


def test_sampling_uses_the_explicit_key():
    model, params = load("tiny_gpt2")
    # The fixture's prompt shape and length reuse the greedy compilation of the parity tests.
    prompt = np.load(FIXTURES / "tiny_gpt2" / "expected.npz")["prompt"]
    one = models.generate(model, params, prompt, 10, temperature=1.0, key=jax.random.key(0))
    again = models.generate(model, params, prompt, 10, temperature=1.0, key=jax.random.key(0))
    other = models.generate(model, params, prompt, 10, temperature=1.0, key=jax.random.key(1))
    assert one.shape == (2, 15)
    np.testing.assert_array_equal(one, again)
    np.testing.assert_array_equal(one[:, :5], prompt)
    assert not np.array_equal(one, other)
    top1 = models.generate(model, params, prompt, 10, temperature=1.0, key=jax.random.key(2), top_k=1)
    np.testing.assert_array_equal(top1, models.generate(model, params, prompt, 10))
    with pytest.raises(ValueError, match="key"):
        models.generate(model, params, prompt, 10, temperature=0.7)
    with pytest.raises(ValueError, match="n_positions"):
        models.generate(model, params, prompt, 40)


def test_generation_pads_after_eos():
    model, params = load("tiny_llama")
    prompt = np.load(FIXTURES / "tiny_llama" / "expected.npz")["prompt"]
    greedy = np.asarray(models.generate(model, params, prompt, 10))
    eos = int(greedy[0, 6])  # the second new token of row 0
    stopped = np.asarray(models.generate(model, params, prompt, 10, eos_token_id=eos, pad_token_id=0))
    for row in range(2):
        new = list(greedy[row, 5:])
        first = 5 + new.index(eos) if eos in new else greedy.shape[1]
        np.testing.assert_array_equal(stopped[row, : first + 1], greedy[row, : first + 1])
        np.testing.assert_array_equal(stopped[row, first + 1 :], 0)


def test_left_padded_prompts_continue_like_unpadded_ones():
    model, params = load("tiny_gpt2")
    expected = np.load(FIXTURES / "tiny_gpt2" / "expected.npz")
    prompt = expected["prompt"]  # [2, 5]
    short = prompt[1:, 2:]  # the last three tokens of row 1
    alone = np.asarray(models.generate(model, params, short, 10))
    padded = np.zeros((2, 7), np.int32)
    padded[0, 2:], padded[1, 4:] = prompt[0], short[0]
    mask = (np.arange(7)[None] >= np.array([[2], [4]])).astype(np.int32)
    out = np.asarray(models.generate(model, params, padded, 10, attention_mask=mask))
    np.testing.assert_array_equal(out[0, 7:], expected["generated"][0, 5:])
    np.testing.assert_array_equal(out[1, 7:], alone[0, 3:])


def test_single_target_names_select_one_projection():
    from lora_jax.models.presets import target_names

    assert target_names("bert", "q") == ("q",)
    assert target_names("llama", "down") == ("down",)
    assert target_names("gpt2", "qv") == ("q", "v")
    with pytest.raises(ValueError, match="unknown targets"):
        target_names("bert", "gate")


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_generation_with_unmerged_adapters_equals_the_merged_model(name, scan):
    import warnings

    model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan)
    spec = models.lora_spec(model, "all-linear", rank=2)
    lora = jax.tree_util.tree_map(lambda x: x + 0.3, lora_jax.init(jax.random.key(0), params, spec))  # B != 0
    ids = jnp.array([[5, 6, 7], [8, 9, 10]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the factored path must not fall back to materializing any kernel
        unmerged = models.generate(model, params, ids, 5, lora=lora, spec=spec)
    merged = models.generate(model, lora_jax.merge(params, lora, spec), ids, 5)
    base = models.generate(model, params, ids, 5)
    np.testing.assert_array_equal(unmerged, merged)
    assert not np.array_equal(unmerged, base)  # the adapters change what is generated
    with pytest.raises(ValueError, match="both lora and spec"):
        models.generate(model, params, ids, 5, lora=lora)


@pytest.mark.parametrize(
    "name,scan,policy",
    [
        ("tiny_bert_cls", False, "nothing_saveable"),
        pytest.param("tiny_gpt2", True, "dots_saveable", marks=pytest.mark.slow),
        pytest.param("tiny_llama", False, "dots_with_no_batch_dims_saveable", marks=pytest.mark.slow),
    ],
)
def test_remat_policies_change_memory_not_numbers(name, scan, policy):
    model, params = load(name, scan_layers=scan)
    spec = models.lora_spec(model, "all-linear", rank=4, alpha=8.0)
    lora = lora_jax.init(jax.random.key(0), params, spec)
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    ids = np.array([[5, 6, 7, 8, 9, 3]], np.int32)

    def grad_fn(model, factored):
        def outputs(params, ids):
            out = model.apply({"params": params}, ids)
            return jnp.mean(jnp.square(out.logits if hasattr(out, "logits") else out))

        forward = (
            lora_jax.factored(outputs, spec)
            if factored
            else (lambda params, lora, ids: outputs(lora_jax.combine(params, lora, spec), ids))
        )
        return jax.jit(jax.value_and_grad(lambda lora: forward(params, lora, ids)))

    for factored in (False, True):
        value, grads = grad_fn(model, factored)(lora)
        remat_value, remat_grads = grad_fn(model.clone(remat=policy), factored)(lora)
        np.testing.assert_allclose(remat_value, value, rtol=1e-5)
        flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
        remat_flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(remat_grads)])
        np.testing.assert_allclose(remat_flat, flat, rtol=1e-4, atol=1e-5 * float(np.abs(flat).max()))
    with pytest.raises(models.ConfigError, match="remat='dots'.*nothing_saveable"):
        model.clone(remat="dots").apply({"params": params}, ids)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_is_the_two_pass_layer_norm(dtype):
    from lora_jax.models.common.layers import LayerNorm

    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 + 2.0 * rng.normal(size=(4, 5, 48)), dtype)
    norm = LayerNorm(1e-12, dtype=dtype, param_dtype=dtype)
    params = {"scale": jnp.asarray(rng.normal(size=48), dtype), "bias": jnp.asarray(rng.normal(size=48), dtype)}
    out = norm.apply({"params": params}, x)
    # Against numpy in float64 from the same (rounded) inputs.
    x64, scale, bias = (np.asarray(a, np.float64) for a in (x, params["scale"], params["bias"]))
    centered = x64 - x64.mean(-1, keepdims=True)
    want = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-12) * scale + bias
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tolerance, atol=tolerance)
    # Its gradient is flax's two-pass LayerNorm's.
    flax_norm = nn.LayerNorm(epsilon=1e-12, dtype=dtype, param_dtype=dtype, use_fast_variance=False)
    grads = [
        jax.grad(lambda v, m=m: jnp.sum(m.apply({"params": params}, v).astype(jnp.float32) ** 2))(x)
        for m in (norm, flax_norm)
    ]
    assert grads[0].dtype == dtype
    np.testing.assert_allclose(
        np.asarray(grads[0], np.float32), np.asarray(grads[1], np.float32), rtol=tolerance, atol=10 * tolerance
    )
