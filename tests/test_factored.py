"""The factored path: same numbers as combine, no kernel-sized work, dropout only in training."""

import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import lora_jax as lj

pytestmark = pytest.mark.core


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):  # x [B, T, 6]
        return jnp.tanh(nn.Dense(6, name="dense")(x)), None


class EveryKernel(nn.Module):
    """Embed, Conv, remat Dense, DenseGeneral, Einsum, cond and an nn.scan stack, all with distinct shapes."""

    @nn.compact
    def __call__(self, tokens):  # tokens [B, T] int
        x = nn.Embed(11, 5, name="embed")(tokens)  # [11, 5]
        x = nn.Conv(7, (3,), name="conv")(x)  # [3, 5, 7]
        x = nn.remat(nn.Dense)(9, name="remat_dense")(x)  # [7, 9]
        x = nn.DenseGeneral((2, 4), name="qkv")(x)  # [9, 2, 4]
        w = self.param("einsum", nn.initializers.normal(0.3), (2, 4, 6))  # [heads, head_dim, out]
        x = jnp.einsum("bthd,hdo->bto", x, w)
        x = jax.lax.cond(x.sum() > 0, lambda a: 2 * a, lambda a: -a, x)
        x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="stack")(
            x, None
        )  # kernel [3, 6, 6]
        return x


SPEC = lj.LoraSpec(
    [
        lj.Rule("embed/embedding", rank=2),
        lj.Rule("conv/kernel", rank=2, out_axes=-1),
        lj.Rule("remat_dense/kernel", rank=3),
        lj.Rule("qkv/kernel", rank=2, in_axes=0),
        lj.Rule("einsum", rank=2, out_axes=-1),
        lj.Rule("stack/dense/kernel", rank=2, stack_axes=0),
    ]
)


@pytest.fixture(scope="module")
def setup():
    model = EveryKernel()
    tokens = jnp.arange(24).reshape(3, 8) % 11
    params = model.init(jax.random.key(0), tokens)["params"]
    lora = lj.init(jax.random.key(1), params, SPEC)
    # Nonzero B so the low-rank branch matters.
    lora = jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(2), x.shape), lora)

    def forward(p, tokens):
        return model.apply({"params": p}, tokens)

    return forward, params, lora, tokens


def _loss(out):
    return jnp.sum(jnp.sin(out) ** 2)


def test_outputs_and_gradients_match_combine(setup):
    forward, params, lora, tokens = setup
    fast = lj.factored(forward, SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback anywhere in this model
        out = jax.jit(fast)(params, lora, tokens)
        grads = jax.jit(jax.grad(lambda ad: _loss(fast(params, ad, tokens))))(lora)
    ref = forward(lj.combine(params, lora, SPEC), tokens)
    ref_grads = jax.grad(lambda ad: _loss(forward(lj.combine(params, ad, SPEC), tokens)))(lora)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = ref_grads
        for key in path:
            r = r[key.key]
        # float32 sums run in a different order: 1e-5 relative to the gradient's scale.
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def _sub_jaxprs(eqn):
    for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else [param]:
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield inner


def _shapes_depending_on(jaxpr, tainted: set) -> list[tuple[int, ...]]:
    """Shapes of equation outputs that depend on a tainted input, through jit, scan, cond and remat.

    A sub-jaxpr's inputs line up with the last of its equation's inputs; a scan's carry is
    treated as tainted whenever any input is, which only makes the check stricter.
    """
    found = []
    for eqn in jaxpr.eqns:
        hit = any(not hasattr(v, "val") and v in tainted for v in eqn.invars)
        for inner in _sub_jaxprs(eqn):
            offset = len(eqn.invars) - len(inner.invars)
            inner_tainted = {
                iv
                for k, iv in enumerate(inner.invars)
                if hit and (eqn.primitive.name == "scan" or eqn.invars[offset + k] in tainted)
            }
            found += _shapes_depending_on(inner, inner_tainted)
        if hit:
            tainted.update(eqn.outvars)
            found += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
    return found


def test_training_step_never_forms_a_kernel_shaped_value(setup):
    """No value that depends on the adapters has an adapted kernel's shape: no W0 + s*A@B, no dW."""
    forward, params, lora, tokens = setup
    kernel_shapes = {t.shape for t in lj.plan(params, SPEC)}

    def shapes(fn):
        closed = jax.make_jaxpr(jax.value_and_grad(lambda ad: _loss(fn(ad))))(lora)
        return set(_shapes_depending_on(closed.jaxpr, set(closed.jaxpr.invars)))

    materialized = shapes(lambda ad: forward(lj.combine(params, ad, SPEC), tokens))
    fast = shapes(lambda ad: lj.factored(forward, SPEC)(params, ad, tokens))
    assert kernel_shapes <= materialized  # the check sees what combine forms ...
    assert not kernel_shapes & fast  # ... and the factored step forms none of it, forward or backward


def test_no_gradient_for_frozen_leaves(setup):
    """With one kernel adapted, no frozen kernel (adapted or not) gets a gradient-shaped value."""
    forward, params, _, tokens = setup
    spec = lj.LoraSpec([lj.Rule("qkv/kernel", rank=2, in_axes=0)])
    lora = lj.init(jax.random.key(0), params, spec)
    frozen = {tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params) if "bias" not in str(p)}

    def shapes(fn):
        closed = jax.make_jaxpr(jax.grad(lambda ad: _loss(fn(ad))))(lora)
        return set(_shapes_depending_on(closed.jaxpr, set(closed.jaxpr.invars)))

    assert (9, 2, 4) in shapes(lambda ad: forward(lj.combine(params, ad, spec), tokens))
    assert not frozen & shapes(lambda ad: lj.factored(forward, spec)(params, ad, tokens))


def test_dropout_only_with_an_rng(setup):
    forward, params, lora, tokens = setup
    spec = lj.LoraSpec([lj.Rule(r.pattern, **{**_rule_kwargs(r), "dropout": 0.5}) for r in SPEC.rules])
    fast = jax.jit(lj.factored(forward, spec))
    eval_out = fast(params, lora, tokens)
    np.testing.assert_allclose(eval_out, forward(lj.combine(params, lora, spec), tokens), rtol=1e-5, atol=1e-5)
    train_a = fast(params, lora, tokens, dropout_rng=jax.random.key(7))
    train_b = fast(params, lora, tokens, dropout_rng=jax.random.key(7))
    train_c = fast(params, lora, tokens, dropout_rng=jax.random.key(8))
    np.testing.assert_array_equal(train_a, train_b)
    assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_c)
    # Dropout acts on the adapter branch only: with B = 0 the base output is untouched.
    zero_b = lj.init(jax.random.key(1), params, spec)
    np.testing.assert_allclose(
        fast(params, zero_b, tokens, dropout_rng=jax.random.key(7)), forward(params, tokens), rtol=1e-6, atol=1e-6
    )


def _rule_kwargs(rule):
    fields = ("rank", "in_axes", "out_axes", "stack_axes")
    return {f: getattr(rule, f) for f in fields}


def test_unsupported_use_falls_back_and_says_so():
    params = {"w": jax.random.normal(jax.random.key(0), (6, 4))}
    spec = lj.LoraSpec([lj.Rule("w", rank=2)])
    lora = lj.init(jax.random.key(1), params, spec)
    lora["w"]["b"] = jnp.ones((2, 4))

    def fn(p, x):  # a weight penalty reads the kernel itself, which has no low-rank form
        return x @ p["w"], jnp.sum(p["w"] ** 2)

    x = jnp.ones((3, 6))
    with pytest.warns(UserWarning, match=r"factored: w: it meets `integer_pow`"):
        out, penalty = lj.factored(fn, spec)(params, lora, x)
    ref_out, ref_penalty = fn(lj.combine(params, lora, spec), x)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    np.testing.assert_allclose(penalty, ref_penalty, rtol=1e-6)


def test_nnx_and_plain_functions():
    graphdef, state = nnx.split(nnx.Linear(5, 3, rngs=nnx.Rngs(0)))
    spec = lj.LoraSpec([lj.Rule("kernel", rank=2)])
    lora = lj.init(jax.random.key(0), state, spec)
    lora["kernel"]["b"] = jnp.ones((2, 3))
    x = jnp.ones((4, 5))

    def forward(s, x):
        return nnx.merge(graphdef, s)(x)

    np.testing.assert_allclose(
        lj.factored(forward, spec)(state, lora, x), forward(lj.combine(state, lora, spec), x), rtol=1e-6
    )


def test_bfloat16_base_with_float32_adapters():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32)).astype(jnp.bfloat16)}
    spec = lj.LoraSpec([lj.Rule("w", rank=4)])
    lora = lj.init(jax.random.key(1), params, spec)
    lora["w"]["b"] = 0.1 * jax.random.normal(jax.random.key(2), (4, 32))
    x = jax.random.normal(jax.random.key(3), (8, 64)).astype(jnp.bfloat16)
    out = lj.factored(lambda p, x: x @ p["w"], spec)(params, lora, x)
    assert out.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float32) @ np.asarray(lj.merge({"w": params["w"].astype(jnp.float32)}, lora, spec)["w"])
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=0.05, atol=0.1)


def test_default_table_covers_every_primitive():
    from lora_jax.factored import DEFAULT_HANDLERS

    assert set(DEFAULT_HANDLERS) == {
        "convert_element_type",
        "transpose",
        "dot_general",
        "conv_general_dilated",
        "gather",
        "scan",
        "cond",
        "remat2",
        "checkpoint",
        "pjit",
        "jit",
        "closed_call",
        "core_call",
    }
    with pytest.raises(TypeError):
        DEFAULT_HANDLERS["dot_general"] = None  # read-only: extend through factored(..., handlers=)


def _one_kernel():
    params = {"w": jax.random.normal(jax.random.key(0), (6, 4))}
    spec = lj.LoraSpec([lj.Rule("w", rank=2)])
    lora = lj.init(jax.random.key(1), params, spec)
    lora["w"]["b"] = jax.random.normal(jax.random.key(2), (2, 4))
    return params, spec, lora, jax.random.normal(jax.random.key(3), (3, 6))


def test_custom_handler_is_called_and_can_add_a_primitive():
    from lora_jax.factored import DEFAULT_HANDLERS

    params, spec, lora, x = _one_kernel()
    calls = []

    def counting_dot(interp, eqn, values):
        calls.append(eqn.primitive.name)
        return DEFAULT_HANDLERS["dot_general"](interp, eqn, values)

    def materialized_pow(interp, eqn, values):  # a new primitive: one handler, no warning
        return interp.run_plain(eqn, [v.materialize() for v in values])

    def fn(p, x):
        return x @ p["w"], jnp.sum(p["w"] ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, penalty = lj.factored(fn, spec, handlers={"dot_general": counting_dot, "integer_pow": materialized_pow})(
            params, lora, x
        )
    assert calls == ["dot_general"]
    ref_out, ref_penalty = fn(lj.combine(params, lora, spec), x)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(penalty, ref_penalty, rtol=1e-5)


def test_handler_returning_none_falls_back_and_says_so():
    params, spec, lora, x = _one_kernel()
    declined = []

    def decline(interp, eqn, values):
        declined.append(eqn.primitive.name)

    def fn(p, x):
        return x @ p["w"]

    with pytest.warns(UserWarning, match=r"factored: w: it meets `dot_general`, which has no low-rank form"):
        out = lj.factored(fn, spec, handlers={"dot_general": decline})(params, lora, x)
    assert declined == ["dot_general"]
    np.testing.assert_allclose(out, fn(lj.combine(params, lora, spec), x), rtol=1e-5, atol=1e-5)


def test_primitive_mapped_to_none_takes_the_materialized_fallback(setup):
    """Without a dot_general handler every Dense-like kernel is materialized; Conv and Embed stay factored."""
    forward, params, lora, tokens = setup
    declined = lj.factored(forward, SPEC, handlers={"dot_general": lambda interp, eqn, values: None})
    removed = lj.factored(forward, SPEC, handlers={"dot_general": None})
    with pytest.warns(UserWarning) as record:
        out = removed(params, lora, tokens)
    messages = [str(w.message) for w in record if str(w.message).startswith("lora_jax.factored")]
    assert {m.split(": ")[1] for m in messages} == {"remat_dense/kernel", "qkv/kernel", "einsum", "stack/dense/kernel"}
    assert all("it meets `dot_general`" in m for m in messages)
    with pytest.warns(UserWarning, match="it meets `dot_general`"):
        np.testing.assert_array_equal(declined(params, lora, tokens), out)
    np.testing.assert_allclose(out, forward(lj.combine(params, lora, SPEC), tokens), rtol=1e-5, atol=1e-5)


def test_handlers_must_be_functions_or_none():
    with pytest.raises(lj.LoraError, match="handler for `dot_general`"):
        lj.factored(lambda p, x: x, SPEC, handlers={"dot_general": "fast"})


def test_factored_forwards_keyword_arguments():
    """Array keywords are traced, flags reach the function as Python values."""

    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x, *, scale=None, deterministic=True):
            h = nn.Dropout(0.5)(nn.Dense(4)(x), deterministic=deterministic)  # needs a Python bool
            return h if scale is None else h * scale

    model, x = Scaled(), jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    spec = lj.LoraSpec([lj.Rule("Dense_0/kernel", rank=2)])
    lora = jax.tree_util.tree_map(lambda a: a + 0.1, lj.init(jax.random.key(1), params, spec))
    forward = lj.factored(lambda p, x, **kw: model.apply({"params": p}, x, **kw), spec)
    scale = jnp.arange(4.0)
    got = jax.jit(lambda p, a, x, s: forward(p, a, x, scale=s, deterministic=True))(params, lora, x, scale)
    want = model.apply({"params": lj.combine(params, lora, spec)}, x, scale=scale)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_combine_warns_that_it_cannot_apply_dropout():
    params = {"w": jnp.ones((4, 3))}
    spec = lj.LoraSpec([lj.Rule("w", rank=2, dropout=0.1)])
    lora = lj.init(jax.random.key(0), params, spec)
    with pytest.warns(UserWarning, match="factored path"):
        lj.combine(params, lora, spec)


def test_fused_attention_kernels_take_the_low_rank_path():
    """Gemma-style qkv_einsum [3, N, D, H] and kv_einsum [2, K, D, H]: the stack axis is a free output axis."""
    d, n, h, k = 16, 4, 8, 2
    params = {
        "qkv_einsum": {"w": jax.random.normal(jax.random.key(0), (3, n, d, h))},
        "kv_einsum": {"w": jax.random.normal(jax.random.key(1), (2, k, d, h))},
    }

    def attend(p, x):
        q, key, value = jnp.einsum("BTD,SNDH->SBTNH", x, p["qkv_einsum"]["w"])
        k2, v2 = jnp.einsum("BSD,CKDH->CBSKH", x, p["kv_einsum"]["w"])
        return q.sum(-1) + key.sum(-1) + value.sum(-1), k2 + v2

    spec = lj.LoraSpec(
        [
            lj.Rule("qkv_einsum/w", rank=2, stack_axes=0, in_axes=2),
            lj.Rule("kv_einsum/w", rank=2, stack_axes=0, in_axes=2),
        ]
    )
    lora = jax.tree_util.tree_map(lambda a: a + 0.1, lj.init(jax.random.key(2), params, spec))
    x = jax.random.normal(jax.random.key(3), (2, 5, d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the materialized kernel
        got = lj.factored(attend, spec)(params, lora, x)
        grads = jax.grad(lambda a: lj.factored(attend, spec)(params, a, x)[0].sum())(lora)
    want = attend(lj.combine(params, lora, spec), x)
    want_grads = jax.grad(lambda a: attend(lj.combine(params, a, spec), x)[0].sum())(lora)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
    for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def _stack_contracted():
    """A [3, 4, 5] kernel whose stack axis the function contracts (it is really an input axis)."""
    params = {"w": jax.random.normal(jax.random.key(0), (3, 4, 5))}
    spec = lj.LoraSpec([lj.Rule("w", rank=2, stack_axes=0)])
    lora = jax.tree_util.tree_map(lambda a: a + 0.1, lj.init(jax.random.key(1), params, spec))

    def fn(p, x):  # x [B, 3, 4]
        return jnp.einsum("bsi,sio->bo", x, p["w"])

    return params, spec, lora, fn


def _factored_warnings(record) -> list:
    return [w for w in record if str(w.message).startswith("lora_jax.factored")]


def test_fallback_warning_points_at_the_callers_line_once_per_function():
    params, spec, lora, fn = _stack_contracted()
    fast = jax.jit(lj.factored(fn, spec))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        out = fast(params, lora, jnp.ones((2, 3, 4)))
        first = _factored_warnings(record)
        fast(params, lora, jnp.ones((5, 3, 4)))  # a new shape: jit traces again, the warning is not repeated
    assert len(first) == 1 and len(_factored_warnings(record)) == 1
    assert first[0].filename == __file__ and first[0].lineno == line
    np.testing.assert_allclose(out, fn(lj.combine(params, lora, spec), jnp.ones((2, 3, 4))), rtol=1e-5, atol=1e-5)
    # Another factored function of the same fn says it again (the memory is the function's, not global).
    with pytest.warns(UserWarning, match="stack axis 0"):
        lj.factored(fn, spec)(params, lora, jnp.ones((2, 3, 4)))


def test_fallback_warning_names_the_axis_and_the_fix():
    params, spec, lora, fn = _stack_contracted()
    with pytest.warns(UserWarning) as record:
        lj.factored(fn, spec)(params, lora, jnp.ones((2, 3, 4)))
    (message,) = [str(w.message) for w in _factored_warnings(record)]
    assert message.startswith("lora_jax.factored: w: it meets `dot_general`: kernel axis 0 (stack axis 0 of the rule)")
    assert "is contracted: a stack axis must be a batch or output axis of the contraction" in message
    assert "give this axis in in_axes instead of stack_axes" in message


@pytest.mark.parametrize(
    ("rule", "subscripts", "expected"),
    [
        # [D, H, Dh] with only D as input, but the function contracts D and H: H is an output axis.
        (
            dict(in_axes=0),
            "bdh,dho->bo",
            r"contraction is over kernel axis 0 \(input axis 0 of the rule\), kernel axis 1 \(output axis 0",
        ),
        # [D, H, Dh] with D and H as inputs, but only D is contracted: H comes out.
        (
            dict(in_axes=(0, 1)),
            "bd,dho->bho",
            r"kernel axis 1 \(input axis 1 of the rule\) is not contracted.*out_axes",
        ),
        # [S, D, O] with S as an input, but the function maps over S (one matrix per index).
        (
            dict(in_axes=(0, 1)),
            "sbd,sdo->sbo",
            r"kernel axis 0 \(input axis 0 of the rule\) is a batch axis.*stack_axes",
        ),
    ],
)
def test_fallback_warning_for_each_dot_general_problem(rule, subscripts, expected):
    params = {"w": jax.random.normal(jax.random.key(0), (3, 4, 5))}
    spec = lj.LoraSpec([lj.Rule("w", rank=2, **rule)])
    lora = jax.tree_util.tree_map(lambda a: a + 0.1, lj.init(jax.random.key(1), params, spec))
    x_sub, w_sub = subscripts.split("->")[0].split(",")
    sizes = {"b": 2, **dict(zip(w_sub, params["w"].shape))}
    x = jax.random.normal(jax.random.key(2), tuple(sizes[c] for c in x_sub))

    def fn(p, x):
        return jnp.einsum(subscripts, x, p["w"])

    with pytest.warns(UserWarning, match=expected):
        out = lj.factored(fn, spec)(params, lora, x)
    np.testing.assert_allclose(out, fn(lj.combine(params, lora, spec), x), rtol=1e-5, atol=1e-5)


def test_rule_matching_a_leaf_that_is_no_matrix_warns_once_naming_it():
    """A broad pattern catches DenseGeneral's bias [2, 4]: one warning for it, none for the kernel."""

    class Qkv(nn.Module):
        @nn.compact
        def __call__(self, x):  # x [B, 6]
            return nn.DenseGeneral((2, 4), name="qkv")(x)  # kernel [6, 2, 4], bias [2, 4]

    model, x = Qkv(), jnp.ones((3, 6))
    params = model.init(jax.random.key(0), x)["params"]
    spec = lj.LoraSpec([lj.Rule(r"qkv/.*", rank=2, in_axes=0)])
    lora = jax.tree_util.tree_map(lambda a: a + 0.1, lj.init(jax.random.key(1), params, spec))
    fast = lj.factored(lambda p, x: model.apply({"params": p}, x), spec)
    with pytest.warns(UserWarning) as record:
        out = fast(params, lora, x)
        fast(params, lora, jnp.ones((5, 6)))  # once per function, not per call
    (message,) = [str(w.message) for w in _factored_warnings(record)]
    assert message.startswith("lora_jax.factored: qkv/bias: rule 'qkv/.*' matches this leaf of shape [2, 4]")
    assert "never an operand of dot_general, conv or gather here (it meets `reshape`" in message
    assert "narrow the pattern" in message and "'.../kernel'" in message
    np.testing.assert_allclose(out, model.apply({"params": lj.combine(params, lora, spec)}, x), rtol=1e-5, atol=1e-5)

    # A kernel reshaped before its product is still a matrix: the warning is the reshape's fallback.
    reshaped = {"w": jax.random.normal(jax.random.key(0), (6, 2, 2))}
    spec = lj.LoraSpec([lj.Rule("w", rank=2, in_axes=0)])
    lora = jax.tree_util.tree_map(lambda a: a + 0.1, lj.init(jax.random.key(1), reshaped, spec))
    with pytest.warns(UserWarning) as record:
        lj.factored(lambda p, x: x @ p["w"].reshape(6, 4), spec)(reshaped, lora, jnp.ones((3, 6)))
    (message,) = [str(w.message) for w in _factored_warnings(record)]
    assert message.startswith("lora_jax.factored: w: it meets `reshape`") and "never an operand" not in message


def test_output_scales_multiply_a_kernels_output_columns_and_bad_ones_are_refused():
    """``output_scales`` gives ``g * (W0 + s A @ B)`` per output column (a served DoRA adapter's gain)."""
    model, x = nn.Dense(4), jnp.arange(6.0).reshape(2, 3)
    params = model.init(jax.random.key(0), x)["params"]
    spec = lj.LoraSpec([lj.Rule("kernel", rank=2)])
    lora = jax.tree_util.tree_map(lambda a: a + 0.1, lj.init(jax.random.key(1), params, spec))
    forward = lj.factored(lambda p, x: model.apply({"params": p}, x), spec)
    gain = jnp.array([0.5, 1.0, 2.0, -1.0])
    got = jax.jit(lambda p, a, x, g: forward(p, a, x, output_scales={"kernel": g}))(params, lora, x, gain)
    combined = lj.combine(params, lora, spec)
    want = model.apply({"params": {**combined, "kernel": combined["kernel"] * gain}}, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(lj.LoraError, match=r"output_scales names 'bias', which is no LoRA kernel of the spec"):
        forward(params, lora, x, output_scales={"bias": gain})
    with pytest.raises(lj.LoraError, match=r"output_scales\['kernel'\] has shape \(3,\); .* = \(4,\)"):
        forward(params, lora, x, output_scales={"kernel": jnp.ones(3)})
