"""The core transform on three kinds of model: Flax linen, Flax NNX, a plain function."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import lora_jax as lj

pytestmark = pytest.mark.core


class LinenNet(nn.Module):
    """Embed -> Conv -> DenseGeneral (two out axes) -> Dense head: every kernel kind."""

    @nn.compact
    def __call__(self, tokens):  # tokens [B, T] int
        x = nn.Embed(32, 16, name="embed")(tokens)  # [B, T, 16]
        x = nn.Conv(16, (3,), name="conv")(x)  # kernel [3, 16, 16]
        x = nn.gelu(x)
        x = nn.DenseGeneral((4, 8), name="proj")(x)  # kernel [16, 4, 8]
        x = x.reshape(*x.shape[:-2], 32).mean(axis=1)
        return nn.Dense(3, name="head")(x)[:, 0]


LINEN_SPEC = lj.LoraSpec(
    [
        lj.Rule("embed/embedding", rank=4),
        lj.Rule("conv/kernel", rank=4, out_axes=(-1,)),
        lj.Rule("proj/kernel", rank=4, in_axes=(0,)),
        lj.trainable("head/.*"),
    ]
)


def _regression_batch(key, n=32):
    tokens = jax.random.randint(key, (n, 6), 0, 32)
    target = jnp.sin(tokens.sum(axis=1).astype(jnp.float32) / 10.0)
    return tokens, target


def _train(loss_fn, params, lora, spec, steps=25, lr=3e-2):
    """Adam steps of ``loss_fn(params, None, None)`` on ``lora``, through ``combine``."""
    tx = optax.adam(lr)
    state = tx.init(lora)
    step = jax.jit(lj.training.train_step(loss_fn, spec, tx, factored=False))
    losses = []
    for _ in range(steps):
        lora, state, value = step(params, lora, state, None, None)
        losses.append(float(value))
    return lora, losses


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_linen_model_end_to_end():
    model = LinenNet()
    tokens, target = _regression_batch(jax.random.key(1))
    params = model.init(jax.random.key(0), tokens)["params"]
    base_copy = jax.tree_util.tree_map(np.array, params)
    lora = lj.init(jax.random.key(2), params, LINEN_SPEC)

    forward = jax.jit(lambda p: model.apply({"params": p}, tokens))
    np.testing.assert_array_equal(forward(lj.combine(params, lora, LINEN_SPEC)), forward(params))

    def loss(p, batch, rng):
        return jnp.mean((model.apply({"params": p}, tokens) - target) ** 2)

    lora, losses = _train(loss, params, lora, LINEN_SPEC)
    assert losses[-1] < 0.5 * losses[0]
    _assert_trees_equal(params, base_copy)

    combined_out = forward(lj.combine(params, lora, LINEN_SPEC))
    merged = jax.jit(lj.merge, static_argnums=2)(params, lora, LINEN_SPEC)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(forward(merged), combined_out, atol=1e-5)
    # The trained head really moved, and merge carried it.
    assert not np.allclose(merged["head"]["kernel"], params["head"]["kernel"])
    np.testing.assert_array_equal(merged["head"]["kernel"], lora["head"]["kernel"])


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.inp = nnx.Linear(8, 32, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(32, 32, rngs=rngs) for _ in range(2)])
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):  # x [B, 8]
        x = nnx.relu(self.inp(x))
        for block in self.blocks:
            x = x + nnx.relu(block(x))
        return self.out(x)[:, 0]


def test_nnx_model_end_to_end():
    graphdef, params = nnx.split(NnxNet(nnx.Rngs(0)))
    base_copy = jax.tree_util.tree_map(np.array, params)
    spec = lj.LoraSpec([lj.Rule(r"(inp|blocks/\d+)/kernel", rank=4, alpha=8)])
    assert [t.name for t in lj.plan(params, spec)] == ["blocks/0/kernel", "blocks/1/kernel", "inp/kernel"]
    lora = lj.init(jax.random.key(1), params, spec)
    x = jax.random.normal(jax.random.key(2), (64, 8))
    target = jnp.tanh(x[:, 0] * x[:, 1])

    def forward(state):
        return nnx.merge(graphdef, state)(x)

    np.testing.assert_array_equal(jax.jit(forward)(lj.combine(params, lora, spec)), jax.jit(forward)(params))

    def loss(p, batch, rng):
        return jnp.mean((forward(p) - target) ** 2)

    lora, losses = _train(loss, params, lora, spec, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]
    _assert_trees_equal(params, base_copy)
    merged = lj.merge(params, lora, spec)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(forward(merged), forward(lj.combine(params, lora, spec)), atol=1e-5)


def _plain_forward(params, x):  # x [B, 6]
    h = jnp.tanh(x @ params["w1"] + params["b1"])  # w1 [6, 24]
    h = jnp.einsum("bi,ihd->bhd", h, params["w2"])  # w2 [24, 3, 8]
    return h.reshape(h.shape[0], -1) @ params["w3"]  # w3 [24, 1]


def test_plain_function_end_to_end():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(keys[0], (6, 24)) / 3,
        "b1": jnp.zeros(24),
        "w2": jax.random.normal(keys[1], (24, 3, 8)) / 5,
        "w3": jax.random.normal(keys[2], (24, 1)) / 5,
    }
    spec = lj.LoraSpec([lj.Rule("w1", rank=2), lj.Rule("w2", rank=3, in_axes=0)])
    lora = lj.init(jax.random.key(1), params, spec)
    x = jax.random.normal(keys[3], (64, 6))
    target = jnp.sin(x.sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(_plain_forward(lj.combine(params, lora, spec), x), _plain_forward(params, x))

    def loss(p, batch, rng):
        return jnp.mean((_plain_forward(p, x) - target) ** 2)

    lora, losses = _train(loss, params, lora, spec, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0]
    merged = lj.merge(params, lora, spec)
    np.testing.assert_allclose(_plain_forward(merged, x), _plain_forward(lj.combine(params, lora, spec), x), atol=1e-5)


def test_combined_tree_with_mask_trains_only_adapters():
    model = LinenNet()
    tokens, target = _regression_batch(jax.random.key(1))
    params = model.init(jax.random.key(0), tokens)["params"]
    tree = {"base": params, "lora": lj.init(jax.random.key(2), params, LINEN_SPEC)}
    tx = lj.adapter_only(optax.adam(3e-2))
    state = tx.init(tree)

    base_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2}
    state_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape")}
    adapter_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(tree["lora"])}
    # Optimizer moments exist for adapters and the trainable head, never for a frozen kernel.
    assert adapter_shapes <= state_shapes
    frozen_only = base_shapes - adapter_shapes
    assert frozen_only and not (frozen_only & state_shapes)

    def loss(tree):
        p = lj.combine(tree["base"], tree["lora"], LINEN_SPEC)
        return jnp.mean((model.apply({"params": p}, tokens) - target) ** 2)

    @jax.jit
    def step(tree, state):
        value, grads = jax.value_and_grad(loss)(tree)
        updates, state = tx.update(grads, state, tree)
        return optax.apply_updates(tree, updates), state, value

    first = None
    for _ in range(20):
        tree, state, value = step(tree, state)
        first = value if first is None else first
    assert value < 0.5 * first
    _assert_trees_equal(tree["base"], params)


def test_init_keys_depend_on_path_only():
    params = {"x": {"kernel": jnp.ones((8, 8))}, "y": {"kernel": jnp.ones((8, 8))}}
    both = lj.init(jax.random.key(0), params, lj.LoraSpec([lj.Rule(".*/kernel", rank=2)]))
    only_y = lj.init(jax.random.key(0), {"y": params["y"]}, lj.LoraSpec([lj.Rule(".*/kernel", rank=2)]))
    reordered = lj.init(
        jax.random.key(0), {"y": params["y"], "x": params["x"]}, lj.LoraSpec([lj.Rule(".*/kernel", rank=2)])
    )
    np.testing.assert_array_equal(both["y"]["kernel"]["a"], only_y["y"]["kernel"]["a"])
    np.testing.assert_array_equal(both["x"]["kernel"]["a"], reordered["x"]["kernel"]["a"])
    assert not np.array_equal(both["x"]["kernel"]["a"], both["y"]["kernel"]["a"])
    assert not np.any(both["x"]["kernel"]["b"])


@pytest.mark.parametrize("init,check", [("kaiming_uniform", "bound"), ("gaussian", "std")])
def test_init_distribution(init, check):
    params = {"w": jnp.zeros((400, 300))}
    spec = lj.LoraSpec([lj.Rule("w", rank=64, init=init)])
    a = np.asarray(lj.init(jax.random.key(0), params, spec)["w"]["a"])
    assert a.shape == (400, 64) and a.dtype == np.float32
    if check == "bound":
        bound = 1 / np.sqrt(400)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.05)
    else:
        np.testing.assert_allclose(a.std(), 1 / 64, rtol=0.05)


def test_bfloat16_base_keeps_dtype_and_float32_adapters():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32)).astype(jnp.bfloat16)}
    spec = lj.LoraSpec([lj.Rule("w", rank=4)])
    lora = lj.init(jax.random.key(1), params, spec)
    assert lora["w"]["a"].dtype == jnp.float32 and lora["w"]["b"].dtype == jnp.float32
    lora["w"]["b"] = jax.random.normal(jax.random.key(2), (4, 32)) * 1e-2
    merged = lj.merge(params, lora, spec)
    assert merged["w"].dtype == jnp.bfloat16
    exact = np.asarray(params["w"], np.float32) + spec.rules[0].scale * (
        np.asarray(lora["w"]["a"], np.float64) @ np.asarray(lora["w"]["b"], np.float64)
    )
    # One rounding to bfloat16 from the float32 sum: within half a bf16 ulp.
    ulp = np.spacing(np.abs(exact).astype(np.float32)) * 2.0**16
    assert np.all(np.abs(np.asarray(merged["w"], np.float32) - exact) <= ulp / 2 + 1e-6)


def test_describe_reports_counts_and_table():
    params = {"enc": {"q": {"kernel": jnp.zeros((384, 384))}, "v": {"kernel": jnp.zeros((384, 12, 32))}}}
    spec = lj.LoraSpec([lj.Rule("enc/q/kernel", rank=8), lj.Rule("enc/v/kernel", rank=8, in_axes=0)])
    report = lj.describe(params, spec)
    assert report.adapter_size == 2 * 8 * (384 + 384)
    assert report.base_size == 2 * 384 * 384
    text = str(report)
    assert "enc/v/kernel" in text and "in(0,) out(1, 2)" in text
    assert "12,288" in text  # trainable total
    assert report.trainable_fraction == pytest.approx(12288 / (2 * 384 * 384))


def test_spec_is_hashable_and_static():
    spec = lj.LoraSpec([lj.Rule("w", rank=2), lj.trainable("b")])
    same = lj.LoraSpec([lj.Rule("w", rank=2), lj.trainable("b")])
    assert hash(spec) == hash(same) and spec == same
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    lora = lj.init(jax.random.key(0), params, spec)
    out = jax.jit(lj.combine, static_argnames="spec")(params, lora, spec=spec)
    np.testing.assert_array_equal(out["w"], params["w"])


def test_fully_trainable_leaves_need_no_base_value():
    """Full fine-tuning can hold one copy: the base of a trainable leaf may be abstract."""
    params = {"w": jnp.ones((4, 3)), "head": jnp.ones((3, 2))}
    spec = lj.LoraSpec([lj.Rule("w", rank=2), lj.trainable("head")])
    lora = lj.init(jax.random.key(0), params, spec)
    abstract_head = {**params, "head": jax.ShapeDtypeStruct((3, 2), jnp.float32)}
    out = lj.combine(abstract_head, lora, spec)
    np.testing.assert_array_equal(out["head"], lora["head"])
    fast = lj.factored(lambda p, x: x @ p["w"] @ p["head"], spec)(abstract_head, lora, jnp.ones((1, 4)))
    np.testing.assert_allclose(fast, jnp.ones((1, 4)) @ params["w"] @ lora["head"])


def test_library_uses_public_jax_apis_only():
    """An earlier JAX LoRA transform died on jax._src: the library never reaches into JAX's internals."""
    import pathlib
    import re

    root = pathlib.Path(lj.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bjax\._src\b|\bjax\.interpreters\b|\bjaxlib\.", line)
    ]
    assert offenders == []
