"""The recipes in docs/recipes.md run as written and do what their text says."""

import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def _section(title: str) -> str:
    """Return the text of the ``## title`` section of docs/recipes.md."""
    text = RECIPES.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match is not None, f"docs/recipes.md has no section {title!r}"
    return match.group(1)


def _run(title: str) -> dict:
    """Execute the Python blocks of a section in order, in one namespace, and return it."""
    blocks = re.findall(r"```python\n(.*?)```", _section(title), flags=re.S)
    assert blocks
    scope: dict = {"__name__": "recipe"}
    for block in blocks:
        exec(compile(block, str(RECIPES), "exec"), scope)
    return scope


def _leaves(tree) -> list[np.ndarray]:
    """Return the leaves as NumPy arrays (RNG keys as their key data); a leaked tracer fails here."""
    out = []
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def _kernel(state) -> np.ndarray:
    return np.asarray(state["blocks"]["linear"]["kernel"][...])


@pytest.fixture(scope="module")
def nnx_recipe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no factored fallback, no deprecation on the way
        return _run("Flax NNX: keep the base apart, serve a merged copy")


def test_nnx_recipe_trains_the_scanned_kernels(nnx_recipe):
    s = nnx_recipe
    losses = s["losses"]
    assert len(losses) == 40 and losses[-1] < 0.3 * losses[0]
    # One adapter per scanned layer, and B moved away from zero in each.
    assert s["lora"]["blocks"]["linear"]["kernel"]["a"].shape == (3, 16, 4)
    b = np.asarray(s["lora"]["blocks"]["linear"]["kernel"]["b"])
    assert b.shape == (3, 4, 16) and np.all(np.abs(b).reshape(3, -1).max(axis=1) > 0)
    # The step carried BatchNorm's running statistics and Dropout's RNG counts forward.
    rest = s["rest"]
    assert float(np.abs(np.asarray(rest["blocks"]["norm"]["mean"][...])).max()) > 0
    np.testing.assert_array_equal(np.asarray(rest["blocks"]["dropout"]["rngs"]["count"][...]), [40, 40, 40])


def test_nnx_recipe_keeps_the_base_bit_for_bit(nnx_recipe):
    s = nnx_recipe
    # A fresh model with the same seed holds the untrained base; the kept copy equals it exactly, even after
    # the unsafe block wrote the merged weights into the model.
    _, fresh, _ = nnx.split(s["Net"](nnx.Rngs(0)), nnx.Param, ...)
    kept = s["params"]
    assert jax.tree_util.tree_structure(kept) == jax.tree_util.tree_structure(fresh)
    for got, want in zip(_leaves(kept), _leaves(fresh)):
        np.testing.assert_array_equal(got, want)
    # The state split before the copy is the model's own: the unsafe update changed it too.
    assert not np.array_equal(_kernel(s["state"]), _kernel(fresh))


def test_nnx_recipe_merged_serving_equals_unmerged(nnx_recipe):
    s = nnx_recipe
    np.testing.assert_allclose(np.asarray(s["served"]), np.asarray(s["unmerged"]), rtol=1e-5, atol=1e-5)
    # A second merge from the kept base gives the same numbers, bit for bit.
    for got, want in zip(_leaves(s["merged_again"]), _leaves(s["merged"])):
        np.testing.assert_array_equal(got, want)
    # The serving model owns its Variables: its weights are the merged ones, the kept base is not.
    _, serving_params, _ = nnx.split(s["serving"], nnx.Param, ...)
    np.testing.assert_array_equal(_kernel(serving_params), _kernel(s["merged"]))
    assert not np.array_equal(_kernel(serving_params), _kernel(s["params"]))


def test_nnx_recipe_unsafe_update_overwrites_the_split_state(nnx_recipe):
    s = nnx_recipe
    lj, lora, spec, params = s["lj"], s["lora"], s["spec"], s["params"]
    base, merged = _kernel(params), _kernel(s["merged"])
    # The state split from the model now holds the merged weights ...
    np.testing.assert_array_equal(_kernel(s["unsafe_state"]), merged)
    # ... so merging it again adds the adapter a second time: W0 + 2 s A@B.
    delta = merged - base
    assert float(np.abs(delta).max()) > 1e-3
    np.testing.assert_allclose(_kernel(s["merged_twice"]), base + 2 * delta, rtol=1e-5, atol=1e-5)
    # unmerge of the overwritten state is the only way back to the base.
    np.testing.assert_allclose(_kernel(lj.unmerge(s["unsafe_state"], lora, spec)), base, rtol=1e-5, atol=1e-5)


def test_nnx_recipe_copy_is_needed_inside_grad(nnx_recipe):
    s = nnx_recipe
    lj, graphdef, params, rest, spec, x, y = (s[k] for k in ("lj", "graphdef", "params", "rest", "spec", "x", "y"))
    with pytest.raises(Exception, match="different trace level"):
        jax.grad(s["loss_without_copy"])(s["lora"])

    def loss_with_copy(lora):  # the same closure with copy=True
        model = nnx.merge(graphdef, lj.combine(params, lora, spec), rest, copy=True)
        model.train()
        return jnp.mean((model(x) - y) ** 2)

    grads = jax.grad(loss_with_copy)(s["lora"])
    assert float(np.abs(np.asarray(grads["blocks"]["linear"]["kernel"]["b"])).max()) > 0
    # Neither call left a tracer in the Variables held outside the trace: they still convert to numbers.
    assert all(np.isfinite(leaf).all() for leaf in _leaves(rest))
