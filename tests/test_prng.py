"""THREEFRY_UNROLLED draws JAX's own Threefry bits; the train step uses it and so trains exactly as before."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend.random import threefry_2x32

import lora_jax as lj
from lora_jax.prng import THREEFRY_UNROLLED, threefry2x32, unrolled
from lora_jax.training import train_step

pytestmark = pytest.mark.core

SHAPES = [(1,), (7,), (3, 5), (4, 33, 17)]


def pair(seed: int) -> tuple[jax.Array, jax.Array]:
    key = jax.random.key(seed)
    return key, jax.random.wrap_key_data(jax.random.key_data(key), impl=THREEFRY_UNROLLED)


def test_hash_equals_jax_threefry():
    key = jax.random.key_data(jax.random.key(7))
    counts = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32))
    x0, x1 = threefry2x32(key, counts[:32], counts[32:])
    np.testing.assert_array_equal(jnp.concatenate([x0, x1]), threefry_2x32(key, counts))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.uint16, jnp.uint32])
def test_bits_equal_default_keys(shape, dtype):
    default, fast = pair(1234)
    np.testing.assert_array_equal(jax.random.bits(fast, shape, dtype), jax.random.bits(default, shape, dtype))


@pytest.mark.parametrize("draw", ["uniform", "normal", "bernoulli", "split", "fold_in", "permutation"])
def test_derived_draws_equal_default_keys(draw):
    default, fast = pair(99)
    calls = {
        "uniform": lambda k: jax.random.uniform(k, (5, 6)),
        "normal": lambda k: jax.random.normal(k, (5, 6)),
        "bernoulli": lambda k: jax.random.bernoulli(k, 0.9, (64, 8)),
        "split": lambda k: jax.random.key_data(jax.random.split(k, 5)),
        "fold_in": lambda k: jax.random.key_data(jax.random.fold_in(jax.random.fold_in(k, 3), 2**31 + 5)),
        "permutation": lambda k: jax.random.permutation(k, 50),
    }
    np.testing.assert_array_equal(jax.jit(calls[draw])(fast), calls[draw](default))


@pytest.mark.parametrize("seed", [0, 5, 2**31 - 1])
def test_seed_equals_default(seed):
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.key(seed, impl=THREEFRY_UNROLLED)), jax.random.key_data(jax.random.key(seed))
    )


def test_unrolled_converts_threefry_keys_only():
    typed = jax.random.key(3)
    assert str(jax.random.key_impl(unrolled(typed))) == "tfu"
    assert str(jax.random.key_impl(unrolled(jax.random.PRNGKey(3)))) == "tfu"  # raw uint32 [2]
    np.testing.assert_array_equal(jax.random.key_data(unrolled(typed)), jax.random.key_data(typed))
    rbg = jax.random.key(3, impl="rbg")
    assert unrolled(rbg) is rbg


def test_lowering_has_no_loops():
    # The point of the module: no `while` in the lowered program (JAX's CPU lowering of Threefry loops).
    _, fast = pair(0)
    text = jax.jit(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 1), 0.9, (128,))).lower(fast).as_text()
    assert "while" not in text
    default_text = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (128,))).lower(jax.random.key(0)).compile().as_text()
    assert "while" in default_text  # if JAX stops looping on CPU, this module can go


def test_train_step_draws_the_same_dropout_masks():
    # A model with dropout and LoRA dropout: the loss under the step's key equals the loss under the default key.
    def loss_fn(params, batch, rng):
        h = batch["x"] @ params["w"]
        if rng is not None:
            keep = jax.random.bernoulli(rng, 0.8, h.shape)
            h = jnp.where(keep, h / 0.8, 0.0)
        return jnp.mean(h**2)

    params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    spec = lj.LoraSpec([lj.Rule("w", rank=2, dropout=0.3)])
    lora = lj.init(jax.random.key(1), params, spec)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lora)
    batch = {"x": jax.random.normal(jax.random.key(2), (4, 8))}
    step = train_step(loss_fn, spec, optax.sgd(0.1))
    rng = jax.random.key(5)
    loss_fast = step(params, lora, step.tx.init(lora), batch, rng)[2]
    loss_default = step.loss(params, lora, batch, rng)  # the default key, not converted
    assert float(loss_fast) == pytest.approx(float(loss_default), rel=1e-6)
    assert float(loss_fast) != pytest.approx(float(step.loss(params, lora, batch, None)), rel=1e-3)
