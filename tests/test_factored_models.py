"""The factored path on the bundled models, unrolled and scanned: the numbers of combine, no fallback."""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import models

FIXTURES = Path(__file__).parent / "fixtures" / "models"
CASES = [("tiny_bert_cls", "qkvo"), ("tiny_gpt2", "all-linear"), ("tiny_llama", "all-linear")]


def _inputs(model, seed=0):
    vocab = model.config.vocab_size
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (2, 7)), jnp.int32)
    return ids, jnp.ones_like(ids).at[1, 5:].set(0)


def _logits(model):
    def fn(params, ids, mask):
        out = model.apply({"params": params}, ids, mask)
        return out if isinstance(out, jax.Array) else out.logits

    return fn


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name,targets", CASES)
def test_factored_matches_combine(name, targets, scan):
    model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan)
    spec = models.lora_spec(model, targets, rank=4, alpha=8)
    lora = lj.init(jax.random.key(0), params, spec)
    lora = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)
    ids, mask = _inputs(model)
    fn = _logits(model)
    fast = lj.factored(fn, spec)

    def loss_fast(lora):
        return jnp.mean(jnp.tanh(fast(params, lora, ids, mask)))

    def loss_ref(lora):
        return jnp.mean(jnp.tanh(fn(lj.combine(params, lora, spec), ids, mask)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every adapted kernel takes the factored route
        out, grads = jax.jit(jax.value_and_grad(loss_fast))(lora)
        logits = jax.jit(fast)(params, lora, ids, mask)
    ref_out, ref_grads = jax.jit(jax.value_and_grad(loss_ref))(lora)
    np.testing.assert_allclose(logits, jax.jit(fn)(lj.combine(params, lora, spec), ids, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
