"""Partial adaptation of fused kernels (Rule.slices): separate adapters per slice, the others exactly zero."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.distributed import lora_partitions

pytestmark = pytest.mark.core

D, H, DH, L = 6, 2, 3, 2
PARAMS = {
    "qkv": jax.random.normal(jax.random.key(0), (D, 3, H, DH)),  # a fused DenseGeneral [D, 3, H, Dh]
    "flat": jax.random.normal(jax.random.key(1), (D, 3 * D)),  # a fused Dense [D, 3D], as Hugging Face's c_attn
    "stack": jax.random.normal(jax.random.key(2), (L, D, 3, H, DH)),  # an nn.scan stack of fused kernels
}
SLICES = ("q", "k", "v")
SPEC = lj.LoraSpec(
    [
        lj.Rule("qkv", rank=2, alpha=4, in_axes=0, slices=SLICES, adapt=("q", "v")),
        lj.Rule("flat", rank=2, alpha=2, slices=SLICES, adapt=("k",)),
        lj.Rule("stack", rank=1, alpha=2, stack_axes=0, in_axes=1, slices=SLICES, adapt=("v", "q"), slice_axis=-3),
    ]
)


def _trained(spec=SPEC, params=PARAMS):
    lora = lj.init(jax.random.key(3), params, spec)
    keys = iter(jax.random.split(jax.random.key(4), 16))
    return jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), lora)


def test_leaves_hold_one_block_per_adapted_slice():
    lora = lj.init(jax.random.key(3), PARAMS, SPEC)
    shapes = jax.tree_util.tree_map(jnp.shape, lora)
    assert shapes["qkv"] == {"a": (D, 4), "b": (4, 1, H, DH)}
    assert shapes["flat"] == {"a": (D, 2), "b": (2, D)}
    assert shapes["stack"] == {"a": (L, D, 2), "b": (L, 2, 1, H, DH)}
    assert all(float(jnp.abs(leaf["b"]).max()) == 0.0 for leaf in lora.values())
    bound = 1 / np.sqrt(D)  # kaiming uniform over the input axes, as each separate adapter would draw
    assert float(jnp.abs(lora["qkv"]["a"]).max()) <= bound
    assert SPEC.rules[2].adapt == ("q", "v")  # stored in the order of slices: the order of the rank blocks


def _numpy_merge(w, a, b, scale, rank, adapted, axis, count):
    """NumPy float64 reference: each adapted slice j gets W0_j + s A_j B_j; the other slices stay W0."""
    w, a, b = (np.asarray(t, np.float64) for t in (w, a, b))
    parts = np.split(w.copy(), count, axis=axis)
    for j, position in enumerate(adapted):
        a_j, b_j = a[..., j * rank : (j + 1) * rank], b[j * rank : (j + 1) * rank]
        parts[position] = parts[position] + scale * np.tensordot(a_j, b_j, axes=1)
    return np.concatenate(parts, axis=axis)


def test_merge_equals_separate_adapters_per_slice_and_leaves_the_rest_exactly():
    lora = _trained()
    merged = lj.merge(PARAMS, lora, SPEC)
    want = _numpy_merge(PARAMS["qkv"], lora["qkv"]["a"], lora["qkv"]["b"], 2.0, 2, (0, 2), 1, 3)
    np.testing.assert_allclose(merged["qkv"], want, rtol=1e-5, atol=1e-5)
    want = _numpy_merge(PARAMS["flat"], lora["flat"]["a"], lora["flat"]["b"], 1.0, 2, (1,), 1, 3)
    np.testing.assert_allclose(merged["flat"], want, rtol=1e-5, atol=1e-5)
    for layer in range(L):
        st = lora["stack"]
        want = _numpy_merge(PARAMS["stack"][layer], st["a"][layer], st["b"][layer], 2.0, 1, (0, 2), 1, 3)
        np.testing.assert_allclose(merged["stack"][layer], want, rtol=1e-5, atol=1e-5)
    # Not close: equal. The slices without an adapter are the base's own numbers.
    np.testing.assert_array_equal(merged["qkv"][:, 1], PARAMS["qkv"][:, 1])
    np.testing.assert_array_equal(merged["stack"][:, :, 1], PARAMS["stack"][:, :, 1])
    np.testing.assert_array_equal(merged["flat"][:, :D], PARAMS["flat"][:, :D])
    np.testing.assert_array_equal(merged["flat"][:, 2 * D :], PARAMS["flat"][:, 2 * D :])
    unmerged = lj.unmerge(merged, lora, SPEC)
    np.testing.assert_allclose(unmerged["qkv"], PARAMS["qkv"], atol=1e-5)


def test_equals_separate_lora_on_split_projections():
    """The fused kernel with q and v slices computes what separate q and v LoRAs on split kernels compute."""
    lora = _trained()
    split = {name: PARAMS["qkv"][:, i] for i, name in enumerate(SLICES)}
    split_spec = lj.LoraSpec([lj.Rule("q|v", rank=2, alpha=4, in_axes=0)])
    a, b = lora["qkv"]["a"], lora["qkv"]["b"]
    split_lora = {"q": {"a": a[:, :2], "b": b[:2, 0]}, "v": {"a": a[:, 2:], "b": b[2:, 0]}}
    fused = lj.merge(PARAMS, lora, SPEC)["qkv"]
    separate = lj.merge(split, split_lora, split_spec)
    for i, name in enumerate(SLICES):
        np.testing.assert_allclose(fused[:, i], separate[name], rtol=1e-6, atol=1e-6)


def _fn(p, x):
    qkv = jnp.einsum("bd,dshk->bshk", x, p["qkv"])
    stack = jnp.einsum("bd,ldshk->blshk", x, p["stack"])
    return jnp.tanh(qkv).sum((1, 2, 3)) + jnp.sin(x @ p["flat"]).sum(-1) + jnp.tanh(stack).sum((1, 2, 3, 4))


def test_factored_equals_combine_with_gradients():
    lora = _trained()
    x = jax.random.normal(jax.random.key(5), (4, D))
    forward = lj.factored(_fn, SPEC)
    both = jax.jit(lambda lo: (forward(PARAMS, lo, x), _fn(lj.combine(PARAMS, lo, SPEC), x)))
    np.testing.assert_allclose(*both(lora), rtol=1e-5)
    grad_f = jax.jit(jax.grad(lambda lo: forward(PARAMS, lo, x).sum()))(lora)
    grad_c = jax.jit(jax.grad(lambda lo: _fn(lj.combine(PARAMS, lo, SPEC), x).sum()))(lora)
    for got, want in zip(jax.tree_util.tree_leaves(grad_f), jax.tree_util.tree_leaves(grad_c), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factored", [True, False])
def test_training_never_moves_the_slices_without_an_adapter(factored):
    x = jax.random.normal(jax.random.key(6), (8, D))
    y = jax.random.normal(jax.random.key(7), (8,))
    step = jax.jit(
        lj.training.train_step(
            lambda p, batch, rng: jnp.mean((_fn(p, batch["x"]) - batch["y"]) ** 2),
            SPEC,
            optax.adam(0.05),
            factored=factored,
        )
    )
    lora = lj.init(jax.random.key(3), PARAMS, SPEC)
    opt_state = optax.adam(0.05).init(lora)
    losses = []
    for i in range(4):
        lora, opt_state, loss = step(PARAMS, lora, opt_state, {"x": x, "y": y}, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    merged = lj.merge(PARAMS, lora, SPEC)
    delta = {k: np.asarray(merged[k]) - np.asarray(PARAMS[k]) for k in PARAMS}
    assert np.abs(delta["qkv"][:, 0]).max() > 0 and np.abs(delta["qkv"][:, 2]).max() > 0
    assert np.all(delta["qkv"][:, 1] == 0.0)
    assert np.all(delta["stack"][:, :, 1] == 0.0)
    assert np.all(delta["flat"][:, :D] == 0.0) and np.all(delta["flat"][:, 2 * D :] == 0.0)


def test_describe_signature_and_stored_spec():
    table = str(lj.describe(PARAMS, SPEC))
    assert "slices q|k|v of axis 1" in table and "2 on q,v" in table and "2 on k" in table
    assert "slices q|k|v of axis 2" in table and "1 on q,v" in table
    assert lj.describe(PARAMS, SPEC).trainable_size == (6 * 4 + 4 * 6) + (6 * 2 + 2 * 6) + L * (6 * 2 + 2 * 6)
    signature = lj.adapters.signature(PARAMS, SPEC)
    assert signature["qkv/b"] == {
        "shape": [4, 1, H, DH],
        "mode": "lora",
        "rank": 2,
        "scale": 2.0,
        "axes": "stack() in(0,) out(1, 2, 3)",
        "slices": ["q", "k", "v"],
        "adapt": ["q", "v"],
        "slice_axis": 1,
    }
    data = SPEC.to_dict()
    assert data["rules"][2]["slices"] == ["q", "k", "v"] and data["rules"][2]["adapt"] == ["q", "v"]
    assert lj.LoraSpec.from_dict(data) == SPEC
    plain = lj.LoraSpec([lj.Rule("qkv", in_axes=0)]).to_dict()["rules"][0]
    assert "slices" not in plain and "adapt" not in plain  # older readers still read specs without slices


def test_adapter_file_round_trip_and_refusal(tmp_path):
    lora = _trained()
    path = lj.save_adapter(tmp_path / "a.safetensors", PARAMS, lora, SPEC)
    back = lj.load_adapter(path, PARAMS)  # the stored spec, slices included
    for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lora), strict=True):
        np.testing.assert_array_equal(got, want)
    other = lj.LoraSpec([lj.Rule(r.pattern, **{**_fields(r), "adapt": ("q", "k")}) for r in SPEC.rules])
    with pytest.raises(lj.AdapterMismatchError, match=r"flat/a: adapt \['k'\] in the file, \['q', 'k'\] now"):
        lj.load_adapter(path, PARAMS, other)


def _fields(rule):
    return {k: getattr(rule, k) for k in ("rank", "alpha", "in_axes", "stack_axes", "slices", "slice_axis")}


def test_partitions_replicate_the_slice_axis_of_b():
    base = {"qkv": P(None, None, "model", None), "flat": P("data", "model"), "stack": P(None, "data", None, "model")}
    parts = lora_partitions(PARAMS, SPEC, base)
    assert parts["qkv"] == {"a": P(None, None), "b": P(None, None, "model", None)}
    assert parts["flat"] == {"a": P("data", None), "b": P(None, None)}
    assert parts["stack"] == {"a": P(None, "data", None), "b": P(None, None, None, "model", None)}


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (dict(slices="qkv"), "slices must be a tuple of names"),
        (dict(slices=("q",)), "names one slice"),
        (dict(slices=("q", "q")), "repeats a name"),
        (dict(slices=("q", "k", "v"), adapt=("x",)), "adapt names 'x', which is not one of slices"),
        (dict(adapt=("q",)), "adapt needs slices"),
        (dict(slice_axis=1), "slice_axis needs slices"),
        (dict(slices=("q", "k", "v"), mode="dora"), "slices need mode='lora'"),
        (dict(slices=("q", "k", "v"), slice_axis=1.0), "slice_axis must be an integer"),
    ],
)
def test_rule_refuses_bad_slices(rule, message):
    with pytest.raises(lj.SpecError, match=message):
        lj.Rule("qkv", in_axes=0, **rule)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (lj.Rule("qkv", rank=2, in_axes=0, slices=SLICES, slice_axis=0), "kernel axis 0 of qkv .* not an"),
        (lj.Rule("qkv", rank=2, in_axes=0, slices=("q", "k")), "axis 1 of qkv .* 3 entries, which do not split into 2"),
        (lj.Rule("qkv", rank=2, in_axes=0, slices=SLICES, slice_axis=5), r"slice_axis \(5,\) out of range .* at qkv"),
        (lj.Rule("flat", rank=5, slices=("a", "b", "c", "d", "e", "f")), r"rank 5 exceeds .* one slice of flat"),
    ],
)
def test_plan_refuses_slices_that_do_not_fit(rule, message):
    with pytest.raises(lj.SpecError, match=message):
        lj.plan(PARAMS, lj.LoraSpec([rule]))
    with pytest.raises(lj.SpecError, match="stored spec, rule 0: field 'slices' must be a list of names"):
        lj.LoraSpec.from_dict({"version": 1, "rules": [{"pattern": "qkv", "slices": "qkv"}]})
