"""DoRA on the variant seam: init at the base, merge against a NumPy reference, factored equal to combine."""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.distributed import target_partitions

pytestmark = pytest.mark.core

D, H, DH, L = 6, 2, 3, 3
PARAMS = {
    "q": jax.random.normal(jax.random.key(0), (D, H, DH)),  # DenseGeneral [D, H, Dh]
    "stack": jax.random.normal(jax.random.key(1), (L, D, D)),  # an nn.scan stack [L, D, D]
}
SPEC = lj.LoraSpec(
    [lj.Rule("q", mode="dora", rank=2, alpha=8, in_axes=0), lj.Rule("stack", mode="dora", rank=2, stack_axes=0)]
)


def _trained():
    lora = lj.init(jax.random.key(2), PARAMS, SPEC)
    keys = iter(jax.random.split(jax.random.key(9), 8))
    return jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), lora)


def _reference(w, a, b, m, scale, subscripts, norm_axes, expand):
    """NumPy float64: m * W' / ||W'|| with W' = W0 + s A@B, the norm over the input axes."""
    w, a, b, m = (np.asarray(t, np.float64) for t in (w, a, b, m))
    updated = w + scale * np.einsum(subscripts, a, b)
    norm = np.sqrt((updated**2).sum(norm_axes))
    return expand(m) * updated / expand(norm)


def test_dora_starts_at_the_base_with_magnitude_the_column_norm():
    lora = lj.init(jax.random.key(2), PARAMS, SPEC)
    np.testing.assert_allclose(lora["q"]["m"], np.linalg.norm(np.asarray(PARAMS["q"]), axis=0), rtol=1e-6)
    np.testing.assert_allclose(lora["stack"]["m"], np.linalg.norm(np.asarray(PARAMS["stack"]), axis=1), rtol=1e-6)
    merged = lj.merge(PARAMS, lora, SPEC)
    for key in PARAMS:
        np.testing.assert_allclose(merged[key], PARAMS[key], rtol=1e-6, atol=1e-6)


def test_dora_merge_matches_a_numpy_reference():
    lora = _trained()
    merged = lj.merge(PARAMS, lora, SPEC)
    q, st = lora["q"], lora["stack"]
    want_q = _reference(PARAMS["q"], q["a"], q["b"], q["m"], 4.0, "dr,rhk->dhk", 0, lambda t: t[None])
    want_stack = _reference(PARAMS["stack"], st["a"], st["b"], st["m"], 4.0, "ldr,lrf->ldf", 1, lambda t: t[:, None, :])
    np.testing.assert_allclose(merged["q"], want_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged["stack"], want_stack, rtol=1e-5, atol=1e-5)


def _model(p, x):
    h = jnp.einsum("bd,dhk->bhk", x, p["q"]).reshape(x.shape[0], -1)[:, :D]

    def layer(carry, w):
        return jnp.tanh(carry @ w), None

    return jax.lax.scan(layer, h, p["stack"])[0]


def test_dora_factored_equals_combine_in_value_and_gradient():
    lora, x = _trained(), jax.random.normal(jax.random.key(5), (4, D))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matmuls stay factored: no fallback
        got = lj.factored(_model, SPEC)(PARAMS, lora, x)
        grads = jax.grad(lambda a: lj.factored(_model, SPEC)(PARAMS, a, x).sum())(lora)
    want = _model(lj.combine(PARAMS, lora, SPEC), x)
    want_grads = jax.grad(lambda a: _model(lj.combine(PARAMS, a, SPEC), x).sum())(lora)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))
    merged = lj.merge(PARAMS, lora, SPEC)
    np.testing.assert_allclose(_model(merged, x), want, rtol=1e-5, atol=1e-5)


def test_dora_cannot_be_unmerged_and_says_so():
    lora = _trained()
    with pytest.raises(lj.LoraError, match="cannot be undone"):
        lj.unmerge(lj.merge(PARAMS, lora, SPEC), lora, SPEC)


def test_dora_files_partitions_and_description(tmp_path: Path):
    lora = _trained()
    path = lj.save_adapter(tmp_path / "dora.safetensors", PARAMS, lora, SPEC)
    back = lj.load_adapter(path, PARAMS, SPEC)
    np.testing.assert_array_equal(back["q"]["m"], lora["q"]["m"])
    lora_spec = lj.LoraSpec([lj.Rule("q", rank=2, alpha=8, in_axes=0), lj.Rule("stack", rank=2, stack_axes=0)])
    with pytest.raises(lj.AdapterMismatchError):
        lj.load_adapter(path, PARAMS, lora_spec)  # the file holds a magnitude plain LoRA does not have
    target = lj.plan(PARAMS, SPEC)[0]
    parts = target_partitions(target, P("data", "model", None))
    assert parts[("q", "m")] == P("model", None)  # the magnitude follows the kernel's output axes
    assert "DoRA" in str(lj.describe(PARAMS, SPEC))
    assert lj.trainable_count(lora) == lj.describe(PARAMS, SPEC).trainable_size


def test_dora_on_a_bundled_model_through_the_preset():
    from lora_jax import models

    model, params = models.from_pretrained(Path(__file__).parent / "fixtures" / "models" / "tiny_llama")
    spec = models.lora_spec(model, "qv", rank=2, mode="dora")
    lora = jax.tree_util.tree_map(lambda x: x * 1.1 + 0.05, lj.init(jax.random.key(0), params, spec))
    ids = jnp.array([[3, 4, 5, 6]])

    def logits(p, ids):
        return model.apply({"params": p}, ids).logits

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lj.factored(logits, spec)(params, lora, ids)
    np.testing.assert_allclose(got, logits(lj.merge(params, lora, spec), ids), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, logits(params, ids), atol=1e-3)  # the adapter does something
