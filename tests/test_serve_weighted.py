"""Weighted combinations of adapters: PEFT's numbers (a real PEFT fixture), NumPy's SVD, exact cat."""

from pathlib import Path

import jax
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import serve
from lora_jax.errors import AdapterMismatchError, LoraError, SpecError

pytestmark = pytest.mark.core

FIXTURE = Path(__file__).parent / "fixtures" / "peft_weighted" / "expected.npz"
# scripts/make_weighted_adapter_fixture.py: the adapters and calls the fixture was made with.
PEFT_ADAPTERS = {
    "a1": (2, 4.0, "standard", ("fc1", "fc2")),
    "a2": (3, 6.0, "rslora", ("fc1", "fc2")),
    "a3": (2, 1.0, "standard", ("fc1", "fc2")),
    "a4": (2, 2.0, "standard", ("fc1",)),
}
PEFT_CALLS = {
    "linear": (["a1", "a3"], "linear", {}),
    "cat": (["a1", "a2"], "cat", {}),
    "cat_partial": (["a1", "a4"], "cat", {}),
    "svd": (["a1", "a2"], "svd", {"rank": 2}),
    "svd_clamp": (["a1", "a2", "a3"], "svd", {"rank": 3, "clamp": 0.9}),
    "single": (["a2"], "svd", {}),
}


def _clamp(a, b, q):
    """PEFT's ``svd_clamp``: both factors clipped to +-(the q-quantile of all their signed entries)."""
    high = np.quantile(np.concatenate([b.ravel(), a.ravel()]), q)
    return np.clip(a, -high, high), np.clip(b, -high, high)


def _peft_adapter(data, name):
    """One fixture adapter in lora_jax's layout: ``A [in, r] = lora_A^T``, ``B [r, out] = lora_B^T``."""
    rank, alpha, scaling, modules = PEFT_ADAPTERS[name]
    spec = lj.LoraSpec([lj.Rule(f"({'|'.join(modules)})/kernel", rank=rank, alpha=alpha, scaling=scaling)])
    lora = {m: {"kernel": {"a": data[f"{name}/{m}/A"].T, "b": data[f"{name}/{m}/B"].T}} for m in modules}
    for m in modules:
        assert spec.rules[0].scale == pytest.approx(float(data[f"{name}/{m}/scaling"]))
    return lora, spec


@pytest.mark.parametrize("call", [c for c in PEFT_CALLS if c != "svd_clamp"])
def test_matches_peft_add_weighted_adapter(call):
    data = np.load(FIXTURE)
    params = {m: {"kernel": data[f"base/{m}"].T} for m in ("fc1", "fc2")}
    names, combination, options = PEFT_CALLS[call]
    loras = [_peft_adapter(data, n) for n in names]
    weights = [float(w) for w in data[f"{call}/weights"]]
    lora, spec = serve.weighted_adapter(params, loras, weights, combination=combination, **options)
    assert {rule.scale for rule in spec.rules} == {1.0}  # as PEFT's lora_alpha = r
    for m in ("fc1", "fc2"):
        a, b = np.asarray(lora[m]["kernel"]["a"]), np.asarray(lora[m]["kernel"]["b"])
        peft_a, peft_b = data[f"{call}/{m}/A"].T, data[f"{call}/{m}/B"].T  # [in, r], [r, out]
        if combination == "svd" and call != "single":
            # SVD factors are defined up to the sign of each component: compare the products.
            np.testing.assert_allclose(a @ b, peft_a @ peft_b, rtol=1e-5, atol=1e-5)
            assert a.shape == peft_a.shape
            continue
        # PEFT sizes cat by the adapters' ranks; a module some adapter leaves alone has zero columns left over.
        rank = a.shape[-1]
        np.testing.assert_allclose(a, peft_a[:, :rank], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b, peft_b[:rank], rtol=1e-6, atol=1e-6)
        assert not np.any(peft_a[:, rank:]) and not np.any(peft_b[rank:])
    assert lj.plan(params, spec)  # the spec fits the base
    np.testing.assert_allclose(
        lj.merge(params, lora, spec)["fc1"]["kernel"],
        params["fc1"]["kernel"] + np.asarray(lora["fc1"]["kernel"]["a"]) @ np.asarray(lora["fc1"]["kernel"]["b"]),
        rtol=1e-6,
        atol=1e-6,
    )


def test_svd_clamp_matches_peft_given_the_same_signs():
    """The clamp threshold is a quantile of signed entries, so it depends on each SVD component's sign: an
    arbitrary choice of the SVD routine (torch's and XLA's may differ). Given PEFT's signs, the numbers agree."""
    data = np.load(FIXTURE)
    params = {m: {"kernel": data[f"base/{m}"].T} for m in ("fc1", "fc2")}
    names, _, options = PEFT_CALLS["svd_clamp"]
    loras = [_peft_adapter(data, n) for n in names]
    weights = [float(w) for w in data["svd_clamp/weights"]]
    plain, _ = serve.weighted_adapter(params, loras, weights, rank=options["rank"])
    clamped, _ = serve.weighted_adapter(params, loras, weights, **options)
    for m in ("fc1", "fc2"):
        a, b = np.asarray(plain[m]["kernel"]["a"]), np.asarray(plain[m]["kernel"]["b"])
        got = np.asarray(clamped[m]["kernel"]["a"]), np.asarray(clamped[m]["kernel"]["b"])
        for g, w in zip(got, _clamp(a, b, options["clamp"])):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
        peft_a, peft_b = data[f"svd_clamp/{m}/A"].T, data[f"svd_clamp/{m}/B"].T
        signs = np.sign(np.sum(peft_a * a, axis=0))  # clipping keeps each entry's sign
        assert np.all(signs != 0)
        for g, w in zip(_clamp(a * signs, b * signs[:, None], options["clamp"]), (peft_a, peft_b)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        assert np.abs(peft_b).max() < np.abs(b).max()  # the clamp bites


def _stacked_adapters(params, specs, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        shapes = jax.eval_shape(lambda p, spec=spec: lj.init(jax.random.key(0), p, spec), params)
        lora = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)
        out.append((lora, spec))
    return out


def _delta64(lora, spec, path, layer):
    """``s A B`` of one layer of a stacked ``[L, D, H, Dh]`` kernel, in float64, ``[D, H * Dh]``."""
    node = lj.paths.nested_get(lora, path)
    a = np.asarray(node["a"][layer], np.float64)
    b = np.asarray(node["b"][layer], np.float64)
    return spec.rules[0].scale * a @ b.reshape(b.shape[0], -1)


# A scanned [layers, D, H, Dh] kernel: the combinations act per layer.
PARAMS = {"layers": {"query": {"kernel": np.random.default_rng(9).normal(size=(3, 8, 2, 4)).astype(np.float32)}}}
PATH = ("layers", "query", "kernel")


def _rule(rank, alpha, scaling="standard"):
    return lj.LoraSpec(
        [lj.Rule("layers/query/kernel", rank=rank, alpha=alpha, scaling=scaling, stack_axes=0, in_axes=1)]
    )


def test_cat_is_exactly_the_weighted_sum_of_the_merged_deltas():
    loras = _stacked_adapters(PARAMS, [_rule(2, 4.0), _rule(3, 6.0, "rslora"), _rule(1, 0.5)])
    weights = [0.5, -2.0, 1.25]
    lora, spec = serve.weighted_adapter(PARAMS, loras, weights, combination="cat")
    assert spec.rules[0].rank == 6 and spec.rules[0].scale == 1.0
    # The factors are the adapters' own, the weight and scale on A: nothing else is rounded.
    node = lj.paths.nested_get(lora, PATH)
    parts = [lj.paths.nested_get(lr, PATH) for lr, _ in loras]
    scaled = [np.float32(w * sp.rules[0].scale) * p["a"] for w, (_, sp), p in zip(weights, loras, parts)]
    np.testing.assert_array_equal(node["a"], np.concatenate(scaled, axis=-1))
    np.testing.assert_array_equal(node["b"], np.concatenate([p["b"] for p in parts], axis=1))
    for layer in range(3):  # so A B is the weighted sum of the deltas up to that one rounding of w s A
        want = sum(w * _delta64(lr, sp, PATH, layer) for w, (lr, sp) in zip(weights, loras))
        np.testing.assert_allclose(_delta64(lora, spec, PATH, layer), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    # And through merge, in float32: the merged combination is the base plus the weighted merged deltas.
    base = PARAMS["layers"]["query"]["kernel"]
    merged = lj.merge(PARAMS, lora, spec)["layers"]["query"]["kernel"]
    deltas = [lj.merge(PARAMS, lr, sp)["layers"]["query"]["kernel"] - base for lr, sp in loras]
    np.testing.assert_allclose(merged - base, sum(w * d for w, d in zip(weights, deltas)), rtol=1e-5, atol=1e-5)


def test_svd_is_numpys_truncated_svd_of_the_weighted_delta():
    loras = _stacked_adapters(PARAMS, [_rule(2, 4.0), _rule(3, 6.0, "rslora")], seed=1)
    weights = [0.5, -2.0]
    lora, spec = serve.weighted_adapter(PARAMS, loras, weights, combination="svd")  # rank: the largest, 3
    assert spec.rules[0].rank == 3
    node = lj.paths.nested_get(lora, PATH)
    for layer in range(3):
        delta = sum(w * _delta64(lr, sp, PATH, layer) for w, (lr, sp) in zip(weights, loras))
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vt[:3]
        np.testing.assert_allclose(_delta64(lora, spec, PATH, layer), best, rtol=1e-4, atol=1e-4)
        a = np.asarray(node["a"][layer], np.float64)  # U: orthonormal columns
        np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-5)
        b = np.asarray(node["b"][layer], np.float64).reshape(3, -1)  # diag(S) V^T: row norms are S
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), s[:3], rtol=1e-5)
    lora2, spec2 = serve.weighted_adapter(PARAMS, loras, weights, combination="svd", rank=1)
    assert spec2.rules[0].rank == 1 and lj.paths.nested_get(lora2, PATH)["a"].shape == (3, 8, 1)


def test_linear_puts_the_sign_on_a_and_one_adapter_is_linear():
    loras = _stacked_adapters(PARAMS, [_rule(2, 4.0), _rule(2, 1.0)], seed=2)
    lora, spec = serve.weighted_adapter(PARAMS, loras, [0.7, -1.3], combination="linear")
    (a1, b1), (a2, b2) = [[lj.paths.nested_get(lr, PATH)[k] for k in "ab"] for lr, _ in loras]
    w1, w2 = 0.7 * 2.0, -1.3 * 0.5
    node = lj.paths.nested_get(lora, PATH)
    np.testing.assert_allclose(node["a"], np.sqrt(w1) * a1 - np.sqrt(-w2) * a2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(node["b"], np.sqrt(w1) * b1 + np.sqrt(-w2) * b2, rtol=1e-6, atol=1e-6)
    # One adapter: linear whatever is asked, so its delta is the weighted delta, at its own rank.
    one, one_spec = serve.weighted_adapter(PARAMS, loras[:1], [-0.5], combination="svd")
    for layer in range(3):
        np.testing.assert_allclose(
            _delta64(one, one_spec, PATH, layer), -0.5 * _delta64(*loras[0], PATH, layer), rtol=1e-6, atol=1e-6
        )


def test_weighted_combinations_refuse_what_they_cannot_combine():
    loras = _stacked_adapters(PARAMS, [_rule(2, 4.0), _rule(3, 6.0)])
    with pytest.raises(AdapterMismatchError, match=r"layers/query/kernel: the adapters have ranks \[2, 3\] here"):
        serve.weighted_adapter(PARAMS, loras, [1.0, 1.0], combination="linear")
    with pytest.raises(LoraError, match="2 adapters but 1 weights"):
        serve.weighted_adapter(PARAMS, loras, [1.0])
    with pytest.raises(LoraError, match=r"weights\[1\] = nan is not a finite number"):
        serve.weighted_adapter(PARAMS, loras, [1.0, float("nan")])
    with pytest.raises(LoraError, match="combination 'ties' is not one of linear, cat, svd"):
        serve.weighted_adapter(PARAMS, loras, [1.0, 1.0], combination="ties")  # pyright: ignore[reportArgumentType]
    with pytest.raises(LoraError, match="rank and clamp apply to combination='svd', not 'cat'"):
        serve.weighted_adapter(PARAMS, loras, [1.0, 1.0], combination="cat", rank=2)
    with pytest.raises(LoraError, match=r"clamp 1.5 is not a quantile in \(0, 1\]"):
        serve.weighted_adapter(PARAMS, loras, [1.0, 1.0], clamp=1.5)
    with pytest.raises(SpecError, match=r"rank 9 exceeds min\(in, out\) = 8 for layers/query/kernel"):
        serve.weighted_adapter(PARAMS, loras, [1.0, 1.0], rank=9)
    with pytest.raises(LoraError, match="one adapter combines linearly"):
        serve.weighted_adapter(PARAMS, loras[:1], [1.0], rank=2)
    with pytest.raises(LoraError, match="at least one"):
        serve.weighted_adapter(PARAMS, [], [])
    other_axes = lj.LoraSpec([lj.Rule("layers/query/kernel", rank=2, stack_axes=0, in_axes=(1, 2))])
    (lora_axes, _), *_ = _stacked_adapters(PARAMS, [other_axes])
    with pytest.raises(AdapterMismatchError, match="the adapters give mode and axes"):
        serve.weighted_adapter(PARAMS, [loras[0], (lora_axes, other_axes)], [1.0, 1.0], combination="cat")
    params = {"dense": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    head = lj.LoraSpec([lj.Rule("dense/kernel", rank=1), lj.trainable("dense/bias")])
    heads = _stacked_adapters(params, [head, head])
    with pytest.raises(AdapterMismatchError, match="dense/bias: 2 adapters train this leaf in full"):
        serve.weighted_adapter(params, heads, [1.0, 1.0], combination="cat")
    # One adapter's fully trainable leaf is carried over as it is.
    plain = lj.LoraSpec([lj.Rule("dense/kernel", rank=1)])
    (no_head, _), *_ = _stacked_adapters(params, [plain])
    lora, spec = serve.weighted_adapter(params, [heads[0], (no_head, plain)], [1.0, 2.0], combination="cat")
    np.testing.assert_array_equal(lora["dense"]["bias"], heads[0][0]["dense"]["bias"])
    assert sorted(rule.mode for rule in spec.rules) == ["lora", "train"]
    dora = lj.LoraSpec([lj.Rule("dense/kernel", rank=1, mode="dora")])
    with pytest.raises(SpecError, match="'dora' target; weighted adapter takes LoRA factors"):
        serve.weighted_adapter(params, _stacked_adapters(params, [dora, plain]), [1.0, 1.0])
