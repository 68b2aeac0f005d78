"""No silent failure in the core: bfloat16 adapters work end to end; non-finite merges are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.errors import NonFiniteError

pytestmark = pytest.mark.core


def _dense(dtype=jnp.float32):
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (8, 6)).astype(dtype), "bias": jnp.zeros(6)}}
    return params


def _trained(params, spec):
    lora = lj.init(jax.random.key(0), params, spec)
    return jax.tree_util.tree_map(lambda x: x + 0.25, lora)  # B != 0: a real update


def test_bfloat16_adapters_combine_merge_factored_and_save(tmp_path):
    params = _dense()
    spec = lj.LoraSpec([lj.Rule("dense/kernel", rank=2, dtype="bfloat16")])
    lora = _trained(params, spec)
    assert {x.dtype for x in jax.tree_util.tree_leaves(lora)} == {jnp.dtype("bfloat16")}
    merged = lj.merge(params, lora, spec)
    a, b = lora["dense"]["kernel"]["a"], lora["dense"]["kernel"]["b"]
    expected = params["dense"]["kernel"] + spec.rules[0].scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    np.testing.assert_allclose(merged["dense"]["kernel"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lj.combine(params, lora, spec)["dense"]["kernel"], expected, rtol=1e-6, atol=1e-6)
    x = jax.random.normal(jax.random.key(2), (3, 8))
    out = lj.factored(lambda p, x: x @ p["dense"]["kernel"], spec)(params, lora, x)
    np.testing.assert_allclose(out, x @ expected, rtol=2e-2, atol=2e-2)  # the low-rank branch runs in bfloat16
    path = lj.save_adapter(tmp_path / "bf16.safetensors", params, lora, spec)
    back = lj.load_adapter(path, params, spec)
    for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lora)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_merge_refuses_nan_adapters_naming_the_leaf():
    params = _dense()
    spec = lj.LoraSpec([lj.Rule("dense/kernel", rank=2)])
    lora = _trained(params, spec)
    lora["dense"]["kernel"]["b"] = lora["dense"]["kernel"]["b"].at[1, 2].set(jnp.inf)
    with pytest.raises(NonFiniteError, match="adapter leaf dense/kernel/b holds NaN or Inf"):
        lj.merge(params, lora, spec)


def test_merge_refuses_a_float16_kernel_that_overflows():
    params = _dense(jnp.float16)
    spec = lj.LoraSpec([lj.Rule("dense/kernel", rank=2)])
    lora = _trained(params, spec)
    lora["dense"]["kernel"]["b"] = lora["dense"]["kernel"]["b"] + 3e5  # finite in float32, Inf in float16
    assert np.isfinite(np.asarray(lora["dense"]["kernel"]["b"])).all()
    with pytest.raises(NonFiniteError, match="merged kernel dense/kernel .*float32"):
        lj.merge(params, lora, spec)
    lj.merge(params, lora, spec, check_finite=False)  # asked not to check: no error


def test_merge_checks_inside_jit_only_when_asked():
    params = _dense()
    spec = lj.LoraSpec([lj.Rule("dense/kernel", rank=2)])
    lora = jax.tree_util.tree_map(lambda x: x.at[0].set(jnp.nan), _trained(params, spec))
    quiet = jax.jit(lambda p, a: lj.merge(p, a, spec))(params, lora)
    assert np.isnan(np.asarray(quiet["dense"]["kernel"])).any()
    checked = jax.jit(lambda p, a: lj.merge(p, a, spec, check_finite=True))
    with pytest.raises(Exception, match="dense/kernel/a"):
        jax.block_until_ready(checked(params, lora))


def test_merge_of_finite_adapters_is_unchanged_by_the_check():
    params = _dense()
    spec = lj.LoraSpec([lj.Rule("dense/kernel", rank=2)])
    lora = _trained(params, spec)
    eager = lj.merge(params, lora, spec)
    jitted = jax.jit(lambda p, a: lj.merge(p, a, spec, check_finite=True))(params, lora)
    np.testing.assert_array_equal(eager["dense"]["kernel"], jitted["dense"]["kernel"])


def test_trainable_count_and_describe_count_the_same():
    params = {"dense": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}, "head": jnp.ones((6, 2))}
    spec = lj.LoraSpec([lj.Rule("dense/kernel", rank=2), lj.trainable("head")])
    lora = lj.init(jax.random.key(0), params, spec)
    description = lj.describe(params, spec)
    assert lj.trainable_count(lora) == description.trainable_size == 8 * 2 + 2 * 6 + 6 * 2
    assert description.adapter_size == 8 * 2 + 2 * 6


def test_lora_plus_gives_b_ratio_times_the_rate_of_a():
    import optax

    params = {"dense": {"kernel": jnp.ones((8, 6))}, "head": jnp.ones((6, 2))}
    spec = lj.LoraSpec([lj.Rule("dense/kernel", rank=2), lj.trainable("head")])
    lora = lj.init(jax.random.key(0), params, spec)
    grads = jax.tree_util.tree_map(jnp.ones_like, lora)
    for rate in (0.01, optax.constant_schedule(0.01)):
        tx = lj.lora_plus(optax.sgd, rate, ratio=16.0)
        updates, _ = tx.update(grads, tx.init(lora), lora)
        np.testing.assert_allclose(updates["dense"]["kernel"]["a"], -0.01)
        np.testing.assert_allclose(updates["dense"]["kernel"]["b"], -0.16)
        np.testing.assert_allclose(updates["head"], -0.01)
    # Inside adapter_only, on a combined tree: the base gets nothing.
    combined_tx = lj.adapter_only(lj.lora_plus(optax.sgd, 0.01))
    tree = {"base": params, "lora": lora}
    updates, _ = combined_tx.update(jax.tree_util.tree_map(jnp.ones_like, tree), combined_tx.init(tree), tree)
    np.testing.assert_allclose(updates["base"]["dense"]["kernel"], 0.0)
    np.testing.assert_allclose(updates["lora"]["dense"]["kernel"]["b"], -0.16)
    with pytest.raises(ValueError, match="ratio must be positive"):
        lj.lora_plus(optax.sgd, 0.01, ratio=0.0)
