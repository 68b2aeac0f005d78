"""PiSSA: the principal part of each kernel as the adapter, the residual as the base, and pissa-to-lora back to
a plain LoRA delta against the original base; checked against a NumPy SVD."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

pytestmark = pytest.mark.core

D, H, DH, L, C = 8, 2, 4, 3, 3
PARAMS = {
    "q": jax.random.normal(jax.random.key(0), (D, H, DH)),  # DenseGeneral [D, H, Dh]: out axes (H, Dh)
    "o": jax.random.normal(jax.random.key(1), (H, DH, D)),  # [H, Dh, D]: in axes (H, Dh)
    "stack": jax.random.normal(jax.random.key(2), (L, D, D)),  # an nn.scan stack [L, D, D]
    "head": {"kernel": jax.random.normal(jax.random.key(3), (D, C)), "bias": jnp.zeros((C,))},
}
SPEC = lj.LoraSpec(
    [
        lj.Rule("q", rank=3, alpha=6, in_axes=0),
        lj.Rule("o", rank=2, alpha=8, scaling="rslora", in_axes=(0, 1)),
        lj.Rule("stack", rank=2, alpha=2, stack_axes=0),
        lj.trainable("head/.*"),
    ]
)


def _model(p, x):
    h = jnp.einsum("bd,dhk->bhk", x, p["q"])
    h = jnp.einsum("bhk,hkd->bd", jnp.tanh(h), p["o"])
    h = jax.lax.scan(lambda carry, w: (jnp.tanh(carry @ w), None), h, p["stack"])[0]
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def _reference(kernel, scale, rank, rows, cols):
    """NumPy float64: the kernel as a [rows, cols] matrix, its top-``rank`` part, and PiSSA's A and B up to sign."""
    m = np.asarray(kernel, np.float64).reshape(rows, cols)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[:rank] / scale)
    return m, (u[:, :rank] * s[:rank]) @ vh[:rank], u[:, :rank] * root, root[:, None] * vh[:rank]


def _same_up_to_sign(got, want, axis):
    """Singular vectors are unique up to sign: compare after giving each column (or row) of ``got`` want's sign."""
    signs = np.sign(np.sum(got * want, axis=axis, keepdims=True))
    np.testing.assert_allclose(got * signs, want, rtol=1e-4, atol=1e-5)


def _trained(lora):
    keys = iter(jax.random.split(jax.random.key(9), 16))
    return jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), lora)


def test_factors_and_residual_match_a_numpy_svd():
    residual, lora = lj.pissa_init(PARAMS, SPEC)
    # q [D, H, Dh]: rows D, columns H*Dh in kernel order.
    m, principal, a, b = _reference(PARAMS["q"], 2.0, 3, D, H * DH)
    np.testing.assert_allclose(np.asarray(residual["q"]).reshape(D, -1), m - principal, rtol=1e-4, atol=1e-5)
    _same_up_to_sign(np.asarray(lora["q"]["a"]), a, axis=0)
    _same_up_to_sign(np.asarray(lora["q"]["b"]).reshape(3, -1), b, axis=1)
    # o [H, Dh, D] with rsLoRA: scale 8 / sqrt(2).
    m, principal, a, b = _reference(PARAMS["o"], 8 / np.sqrt(2), 2, H * DH, D)
    np.testing.assert_allclose(np.asarray(residual["o"]).reshape(-1, D), m - principal, rtol=1e-4, atol=1e-5)
    _same_up_to_sign(np.asarray(lora["o"]["a"]).reshape(-1, 2), a, axis=0)
    _same_up_to_sign(np.asarray(lora["o"]["b"]), b, axis=1)
    # stack [L, D, F]: one SVD per layer.
    for layer in range(L):
        m, principal, a, b = _reference(PARAMS["stack"][layer], 1.0, 2, D, D)
        np.testing.assert_allclose(residual["stack"][layer], m - principal, rtol=1e-4, atol=1e-5)
        _same_up_to_sign(np.asarray(lora["stack"]["a"][layer]), a, axis=0)
        _same_up_to_sign(np.asarray(lora["stack"]["b"][layer]), b, axis=1)
    # The head is trained whole, from its base value; the base tree keeps its structure and dtypes.
    np.testing.assert_array_equal(lora["head"]["kernel"], PARAMS["head"]["kernel"])
    np.testing.assert_array_equal(residual["head"]["kernel"], PARAMS["head"]["kernel"])
    assert jax.tree_util.tree_structure(residual) == jax.tree_util.tree_structure(PARAMS)
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), residual) == jax.tree_util.tree_map(
        lambda x: (x.shape, x.dtype), PARAMS
    )


def test_step_zero_equals_the_base_combined_and_factored():
    residual, lora = lj.pissa_init(PARAMS, SPEC)
    for key in ("q", "o", "stack"):
        np.testing.assert_allclose(lj.combine(residual, lora, SPEC)[key], PARAMS[key], rtol=1e-5, atol=1e-5)
    x = jax.random.normal(jax.random.key(5), (4, D))
    want = _model(PARAMS, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matmuls stay factored: no fallback
        got = lj.factored(_model, SPEC)(residual, lora, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_model(lj.combine(residual, lora, SPEC), x), want, rtol=1e-5, atol=1e-5)
    # The residual alone is another model: PiSSA moved the principal part into the adapter.
    assert not np.allclose(_model(residual, x), want, atol=1e-2)


def test_jitted_init_and_a_bfloat16_base():
    residual, lora = jax.jit(lj.pissa_init, static_argnums=1)(PARAMS, SPEC)
    eager_residual, eager_lora = lj.pissa_init(PARAMS, SPEC)
    for got, want in zip(
        jax.tree_util.tree_leaves((residual, lora)), jax.tree_util.tree_leaves((eager_residual, eager_lora))
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    residual, lora = lj.pissa_init(half, SPEC)
    assert residual["q"].dtype == jnp.bfloat16 and lora["q"]["a"].dtype == jnp.float32
    back = lj.merge(residual, lora, SPEC)["q"].astype(jnp.float32)
    np.testing.assert_allclose(back, half["q"].astype(jnp.float32), rtol=2e-2, atol=2e-2)
    # bfloat16 factors: the residual takes away exactly what they add back, so step 0 is the base in float32.
    spec = lj.LoraSpec([lj.Rule("q", rank=3, alpha=6, in_axes=0, dtype="bfloat16")])
    residual, lora = lj.pissa_init(PARAMS, spec)
    assert lora["q"]["a"].dtype == jnp.bfloat16 and residual["q"].dtype == jnp.float32
    np.testing.assert_allclose(lj.combine(residual, lora, spec)["q"], PARAMS["q"], rtol=1e-5, atol=1e-5)


def test_pissa_to_lora_merges_the_same_onto_the_original_base():
    residual, initial = lj.pissa_init(PARAMS, SPEC)
    trained = _trained(initial)
    converted, converted_spec = lj.pissa_to_lora(PARAMS, trained, SPEC, initial)
    ranks = [(rule.rank, rule.alpha, rule.scale) for rule in converted_spec.rules[:3]]
    assert ranks == [(6, 12, 2.0), (4, pytest.approx(8 * np.sqrt(2)), pytest.approx(4 * np.sqrt(2))), (4, 4, 1.0)]
    assert converted["q"]["a"].shape == (D, 6) and converted["q"]["b"].shape == (6, H, DH)
    assert converted["stack"]["a"].shape == (L, D, 4) and converted["stack"]["b"].shape == (L, 4, D)
    on_residual = lj.merge(residual, trained, SPEC)
    on_original = lj.merge(PARAMS, converted, converted_spec)
    for got, want in zip(jax.tree_util.tree_leaves(on_original), jax.tree_util.tree_leaves(on_residual)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    x = jax.random.normal(jax.random.key(6), (4, D))
    np.testing.assert_allclose(
        lj.factored(_model, converted_spec)(PARAMS, converted, x), _model(on_residual, x), rtol=1e-5, atol=1e-5
    )
    # The delta against the original base is the change of the adapter, nothing else: untrained, it is zero.
    untouched, untouched_spec = lj.pissa_to_lora(PARAMS, initial, SPEC, initial)
    np.testing.assert_allclose(lj.merge(PARAMS, untouched, untouched_spec)["o"], PARAMS["o"], atol=1e-6)


def test_refusals_name_what_to_fix():
    residual, initial = lj.pissa_init(PARAMS, SPEC)
    with pytest.raises(lj.AdapterMismatchError, match="q/b"):
        lj.pissa_to_lora(PARAMS, {**initial, "q": {"a": initial["q"]["a"]}}, SPEC, initial)
    with pytest.raises(lj.AdapterMismatchError, match="stack/a has shape"):
        lj.pissa_to_lora(PARAMS, initial, SPEC, {**initial, "stack": {**initial["stack"], "a": initial["q"]["a"]}})
    with pytest.raises(lj.LoraError, match="adapts no kernel"):
        lj.pissa_init(PARAMS, lj.LoraSpec([lj.trainable("head/.*")]))
    # A rank of 2r must still fit the kernel: [L, D, D] allows 8, and r=5 doubles past it.
    wide = lj.LoraSpec([lj.Rule("stack", rank=5, stack_axes=0)])
    _, lora = lj.pissa_init(PARAMS, wide)
    with pytest.raises(lj.SpecError, match="rank 10 exceeds min"):
        lj.pissa_to_lora(PARAMS, lora, wide, lora)


def test_dora_starts_from_the_principal_part_and_cannot_be_converted():
    spec = lj.LoraSpec(
        [lj.Rule("q", mode="dora", rank=3, alpha=6, in_axes=0), lj.Rule("stack", mode="dora", stack_axes=0, rank=2)]
    )
    residual, lora = lj.pissa_init(PARAMS, spec)
    np.testing.assert_allclose(lora["q"]["m"], np.linalg.norm(np.asarray(PARAMS["q"]), axis=0), rtol=1e-5)
    merged = lj.merge(residual, lora, spec)
    for key in ("q", "stack"):
        np.testing.assert_allclose(merged[key], PARAMS[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(lj.LoraError, match="q is DoRA"):
        lj.pissa_to_lora(PARAMS, lora, spec, lora)
