"""Bad input fails early, with a message that names the path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

pytestmark = pytest.mark.core

PARAMS = {
    "encoder": {
        "query": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)},
        "value": {"kernel": jnp.ones((16, 2, 4))},
    },
    "ids": jnp.arange(6).reshape(2, 3),
}


def test_rule_matching_nothing_lists_closest_paths():
    with pytest.raises(lj.SpecError, match=r"matches no leaf; closest paths: encoder/query/kernel"):
        lj.plan(PARAMS, lj.LoraSpec([lj.Rule("encoder/querry/kernel")]))


def test_rule_shadowed_by_earlier_rules():
    spec = lj.LoraSpec([lj.freeze("encoder/.*"), lj.Rule("encoder/query/kernel", rank=2)])
    with pytest.raises(lj.SpecError, match="all taken by earlier rules"):
        lj.plan(PARAMS, spec)


def test_rank_above_min_in_out():
    with pytest.raises(lj.SpecError, match=r"rank 9 exceeds min\(in, out\) = 8 for encoder/query/kernel"):
        lj.plan(PARAMS, lj.LoraSpec([lj.Rule("encoder/query/kernel", rank=9)]))


def test_non_float_kernel():
    with pytest.raises(lj.SpecError, match="matched ids of dtype int32"):
        lj.plan(PARAMS, lj.LoraSpec([lj.Rule("ids", rank=1)]))


def test_missing_axes_name_the_rule():
    with pytest.raises(lj.SpecError, match=r"rule 'value' matched encoder/value/kernel .* needs in_axes"):
        lj.plan(PARAMS, lj.LoraSpec([lj.Rule(".*value/kernel", name="value")]))


@pytest.mark.parametrize(
    "axes",
    [dict(in_axes=(0,), out_axes=(1,)), dict(in_axes=(0, 1), out_axes=(1, 2)), dict(in_axes=(3,))],
)
def test_axes_that_do_not_cover_the_kernel(axes):
    with pytest.raises(lj.SpecError, match="encoder/value/kernel"):
        lj.plan(PARAMS, lj.LoraSpec([lj.Rule(".*value/kernel", **axes)]))


def test_vector_cannot_take_lora():
    with pytest.raises(lj.SpecError, match="encoder/query/bias"):
        lj.plan(PARAMS, lj.LoraSpec([lj.Rule("encoder/query/bias")]))


def test_bad_rule_arguments():
    with pytest.raises(ValueError, match="rank"):
        lj.Rule("w", rank=0)
    with pytest.raises(ValueError, match="dropout"):
        lj.Rule("w", dropout=1.0)
    with pytest.raises(ValueError, match="regex"):
        lj.Rule("w[")
    with pytest.raises(ValueError, match="mode"):
        lj.Rule("w", mode="adapt")


SPEC = lj.LoraSpec([lj.Rule("encoder/query/kernel", rank=2), lj.Rule("encoder/value/kernel", rank=2, in_axes=0)])


def test_adapter_with_missing_path():
    lora = lj.init(jax.random.key(0), PARAMS, SPEC)
    del lora["encoder"]["value"]
    with pytest.raises(lj.AdapterMismatchError, match="no leaf at encoder/value/kernel/a"):
        lj.combine(PARAMS, lora, SPEC)


def test_adapter_with_extra_path():
    lora = lj.init(jax.random.key(0), PARAMS, SPEC)
    lora["encoder"]["key"] = {"kernel": {"a": jnp.ones((16, 2)), "b": jnp.ones((2, 8))}}
    with pytest.raises(lj.AdapterMismatchError, match="leaf at encoder/key/kernel/a that the spec does not adapt"):
        lj.merge(PARAMS, lora, SPEC)


def test_adapter_with_wrong_shape():
    lora = lj.init(jax.random.key(0), PARAMS, SPEC)
    lora["encoder"]["query"]["kernel"]["b"] = jnp.zeros((2, 9))
    with pytest.raises(lj.AdapterMismatchError, match=r"encoder/query/kernel/b has shape \(2, 9\), expected \(2, 8\)"):
        lj.combine(PARAMS, lora, SPEC)


def test_adapter_for_another_base():
    lora = lj.init(jax.random.key(0), PARAMS, SPEC)
    other = {"encoder": {"query": {"kernel": jnp.ones((16, 4))}, "value": {"kernel": jnp.ones((16, 2, 4))}}}
    with pytest.raises(lj.AdapterMismatchError, match="encoder/query/kernel/b"):
        lj.combine(other, lora, SPEC)


def test_combine_refuses_dropout():
    spec = lj.LoraSpec([lj.Rule("encoder/query/kernel", rank=2, dropout=0.1)])
    lora = lj.init(jax.random.key(0), PARAMS, spec)
    with pytest.raises(lj.LoraError, match="factored"):
        lj.combine(PARAMS, lora, spec, dropout_rng=jax.random.key(1))
    # Without an RNG (evaluation) dropout is off and combine works.
    lj.combine(PARAMS, lora, spec)


def test_nothing_is_modified_in_place():
    params = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    before = params["w"].copy()
    spec = lj.LoraSpec([lj.Rule("w", rank=2)])
    lora = lj.init(jax.random.key(0), params, spec)
    lora["w"]["b"] = jnp.ones((2, 4))
    lora_before = jax.tree_util.tree_map(np.array, lora)
    merged = lj.merge(params, lora, spec)
    lj.unmerge(merged, lora, spec)
    np.testing.assert_array_equal(params["w"], before)
    for x, y in zip(jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(lora_before)):
        np.testing.assert_array_equal(x, y)
