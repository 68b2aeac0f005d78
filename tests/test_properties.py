"""Property tests: combine == merge == a NumPy reference, unmerge inverts merge, scaling factors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj

pytestmark = pytest.mark.core


@st.composite
def kernels(draw):
    """A kernel shape with a random split into stack, input and output axes."""
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    order = draw(st.permutations(range(ndim)))
    n_stack = draw(st.integers(0, ndim - 2))
    n_in = draw(st.integers(1, ndim - n_stack - 1))
    stack = tuple(sorted(order[:n_stack]))
    inputs = tuple(order[n_stack : n_stack + n_in])
    outputs = tuple(order[n_stack + n_in :])
    in_size = math.prod(shape[a] for a in inputs)
    out_size = math.prod(shape[a] for a in outputs)
    rank = draw(st.integers(1, min(in_size, out_size)))
    scaling = draw(st.sampled_from(["standard", "rslora"]))
    alpha = draw(st.floats(0.5, 32.0))
    return shape, stack, inputs, outputs, rank, scaling, alpha


def numpy_reference(w, a, b, stack, inputs, outputs, scale):
    """W0 + s * A @ B by explicit loops over the stacked axes, in float64."""
    stack_shape = tuple(w.shape[s] for s in stack)
    in_shape = tuple(w.shape[i] for i in inputs)
    out_shape = tuple(w.shape[o] for o in outputs)
    moved = np.transpose(w.astype(np.float64), stack + inputs + outputs).copy()
    for idx in np.ndindex(*stack_shape):
        a2 = a[idx].reshape(math.prod(in_shape), -1).astype(np.float64)
        b2 = b[idx].reshape(-1, math.prod(out_shape)).astype(np.float64)
        moved[idx] += scale * (a2 @ b2).reshape(in_shape + out_shape)
    return np.transpose(moved, np.argsort(stack + inputs + outputs))


@settings(max_examples=20, deadline=None)
@given(kernels(), st.integers(0, 2**31 - 1))
def test_combine_merge_match_reference_and_unmerge_inverts(kernel, seed):
    shape, stack, inputs, outputs, rank, scaling, alpha = kernel
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=shape).astype(np.float32)}
    rule = lj.Rule("w", rank=rank, alpha=alpha, scaling=scaling, stack_axes=stack, in_axes=inputs, out_axes=outputs)
    spec = lj.LoraSpec([rule])
    lora = lj.init(jax.random.key(seed), params, spec)
    target = lj.plan(params, spec)[0]
    lora["w"]["b"] = jnp.asarray(rng.normal(size=target.b_shape).astype(np.float32))

    expected = numpy_reference(
        params["w"], np.asarray(lora["w"]["a"]), np.asarray(lora["w"]["b"]), stack, inputs, outputs, rule.scale
    )
    combined = np.asarray(jax.jit(lj.combine, static_argnums=2)(params, lora, spec)["w"])
    merged = np.asarray(jax.jit(lj.merge, static_argnums=2)(params, lora, spec)["w"])
    np.testing.assert_allclose(combined, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(combined, merged)  # one code path, same compiled program
    eager = np.asarray(lj.merge(params, lora, spec)["w"])
    np.testing.assert_allclose(eager, merged, rtol=1e-6, atol=1e-7)  # XLA may fuse a multiply-add
    restored = np.asarray(lj.unmerge({"w": merged}, lora, spec)["w"])
    np.testing.assert_allclose(restored, params["w"], rtol=1e-5, atol=1e-5)


@given(st.integers(1, 256), st.floats(0.1, 256.0))
def test_scaling_factors(rank, alpha):
    assert lj.Rule("w", rank=rank, alpha=alpha).scale == alpha / rank
    assert lj.Rule("w", rank=rank, alpha=alpha, scaling="rslora").scale == alpha / math.sqrt(rank)


def test_scale_is_applied_as_documented():
    params = {"w": np.zeros((4, 4), np.float32)}
    for scaling, factor in (("standard", 16 / 4), ("rslora", 16 / 2)):
        spec = lj.LoraSpec([lj.Rule("w", rank=4, alpha=16, scaling=scaling)])
        lora = {"w": {"a": jnp.eye(4), "b": jnp.eye(4)}}
        np.testing.assert_array_equal(lj.merge(params, lora, spec)["w"], factor * np.eye(4))
