"""The quantized frozen base (QLoRA): NF4 and int8 against independent references, and training on it.

References: the NF4 levels built here from the paper's definition (quantiles of N(0, 1), Python's
``statistics.NormalDist``), a NumPy NF4 written here block by block, and bitsandbytes' own NF4 of a
fixed matrix (``tests/fixtures/nf4``, made by ``scripts/make_nf4_fixture.py``).
"""

import functools
import itertools
from pathlib import Path
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import models, quant
from lora_jax.quant import Int8, Int8Array, Nf4, Nf4Array, QuantError

pytestmark = pytest.mark.core

FIXTURES = Path(__file__).parent / "fixtures"
BNB = FIXTURES / "nf4" / "bnb_nf4.npz"
TINY = np.finfo(np.float32).tiny


# --- independent references ------------------------------------------------------------------


def paper_nf4_levels() -> np.ndarray:
    """The 16 NF4 levels from QLoRA's definition (appendix E and bitsandbytes' create_normal_map).

    Quantiles of N(0, 1): 8 for the positive half and 7 for the negative half, at probabilities evenly
    spaced from 1 - delta to 1/2 (the 1/2 end dropped, zero added once), delta = (1/30 + 1/32) / 2, so the
    extremes are the quantiles of the outermost of 2 * 15 and 2 * 16 bins; divided by the largest.
    """
    normal = NormalDist()
    delta = (1 / 30 + 1 / 32) / 2
    positive = [normal.inv_cdf(p) for p in np.linspace(1 - delta, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(1 - delta, 0.5, 8)[:-1]]
    levels = np.sort(np.array([*positive, 0.0, *negative]))
    return levels / levels.max()


def numpy_nf4(x: np.ndarray, levels: np.ndarray, code: np.ndarray, block: int = 64, block2: int = 256) -> dict:
    """NF4 with double quantization, block by block in NumPy: nearest level by distance (ties to the lower)."""
    flat = x.astype(np.float32).ravel()
    blocks = -(-flat.size // block)
    codes, absmax = [], []
    for b in range(blocks):
        chunk = flat[b * block : (b + 1) * block]
        top = np.float32(np.abs(chunk).max())
        scaled = np.clip(chunk * (np.float32(1) / np.float32(max(top, TINY))), -1, 1)
        codes.append(np.argmin(np.abs(scaled[:, None] - levels[None, :]), axis=1))
        absmax.append(top)
    absmax = np.array(absmax, np.float32)
    offset = np.float32(absmax.mean(dtype=np.float32))
    centred = absmax - offset
    absmax_codes, scales = [], []
    for b in range(-(-blocks // block2)):
        chunk = centred[b * block2 : (b + 1) * block2]
        top = np.float32(np.abs(chunk).max())
        scaled = np.clip(chunk * (np.float32(1) / np.float32(max(top, TINY))), -1, 1)
        absmax_codes.append(np.argmin(np.abs(scaled[:, None] - code[None, :]), axis=1))
        scales.append(top)
    absmax_codes = np.concatenate(absmax_codes)
    scales = np.array(scales, np.float32)
    restored = code[absmax_codes] * np.repeat(scales, block2)[:blocks] + offset
    values = np.concatenate([levels[c] * m for c, m in zip(codes, restored)])
    return {
        "codes": np.concatenate(codes),
        "absmax_codes": absmax_codes,
        "dequantized": values[: flat.size].reshape(x.shape),
        "absmax": absmax,
    }


def unpack(packed: np.ndarray) -> np.ndarray:
    """Two 4-bit codes a byte, the first in the high nibble."""
    return np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)


def assert_within_nf4_error(restored, x) -> None:
    """Each value within half the widest gap between NF4 levels times its block's absmax (2% for the 8-bit absmax)."""
    blocks = np.asarray(x, np.float32).reshape(-1, 64)
    bound = np.abs(blocks).max(axis=1, keepdims=True) * np.max(np.diff(quant.NF4_LEVELS)) / 2 * 1.02
    assert np.all(np.abs(np.asarray(restored).reshape(-1, 64) - blocks) <= bound)


def gaussian(shape, seed=0, std=1.0) -> np.ndarray:
    return (std * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# --- the formats -------------------------------------------------------------------------------


def test_nf4_levels_are_the_papers_quantiles():
    levels = quant.NF4_LEVELS
    assert levels.shape == (16,) and levels.dtype == np.float32
    assert np.all(np.diff(levels) > 0)
    assert levels[0] == -1.0 and levels[-1] == 1.0 and levels[7] == 0.0  # an exact zero, 7 below, 8 above
    # bitsandbytes rounds delta to 0.9677083 and builds in float32: 2e-7 apart at most.
    np.testing.assert_allclose(levels, paper_nf4_levels(), rtol=0, atol=5e-7)
    np.testing.assert_array_equal(levels, np.load(BNB)["nf4_code"])  # bitsandbytes' table, as it quantized


def test_absmax_code_is_bitsandbytes_dynamic_map():
    code = quant.absmax_code()
    assert code.shape == (256,) and len(np.unique(code)) == 256 and np.all(np.diff(code) > 0)
    assert 0.0 in code and code[-1] == 1.0
    # Each decade 10^-6 .. 10^0 holds 2^k mantissas of each sign (k = 0 .. 6).
    positive = code[code > 0][:-1]
    for k in range(7):
        in_decade = (positive >= 10.0 ** (k - 6) * 0.1) & (positive < 10.0 ** (k - 6))
        assert in_decade.sum() == 2**k
    np.testing.assert_array_equal(np.sort(-code[(code < 0)]), positive)
    # Built in float64 and rounded once; bitsandbytes rounds torch.linspace in float32: 1 ulp apart at most.
    np.testing.assert_allclose(code, np.load(BNB)["absmax_code"], rtol=1.2e-7, atol=0)


def test_nf4_matches_numpy_reference():
    x = gaussian((97, 201), seed=1, std=0.02)  # 19,497 values: a partial last block, 2 absmax blocks
    x.reshape(-1)[64:128] = 0.0  # an all-zero block
    q = Nf4().quantize(jnp.asarray(x))
    ref = numpy_nf4(x, quant.NF4_LEVELS, quant.absmax_code())
    blocks = -(-x.size // 64)
    assert q.codes.shape == (blocks * 32,) and q.codes.dtype == jnp.uint8
    assert q.absmax_codes.shape == (blocks,) and q.absmax_scales.shape == (2,)
    np.testing.assert_array_equal(unpack(np.asarray(q.codes))[: x.size], ref["codes"][: x.size])
    np.testing.assert_array_equal(np.asarray(q.absmax_codes), ref["absmax_codes"])
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref["dequantized"], rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(q.dequantize()).reshape(-1)[64:128] == 0.0)


def test_nf4_packing_puts_the_first_code_in_the_high_nibble():
    x = np.tile(quant.NF4_LEVELS, 4).reshape(8, 8)  # one block whose values are the levels: codes 0..15
    q = Nf4().quantize(jnp.asarray(x))
    expected = [(2 * k << 4) | (2 * k + 1) for k in range(8)] * 4  # 0x01, 0x23, ..., 0xEF
    np.testing.assert_array_equal(np.asarray(q.codes), expected)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), x)  # the levels round-trip exactly


def test_nf4_matches_bitsandbytes():
    """bitsandbytes' NF4 of a fixed matrix (blocksize 64, compress_statistics=True, its CPU kernels).

    The 4-bit codes and the level of every value agree exactly. bitsandbytes' 8-bit quantizer of the
    absmax values does not always round to the nearest code: where it does not, ours (the nearest) is
    one code away, and that block's absmax differs by that step; the offset (a float32 mean) differs in
    the last bit.
    """
    f = np.load(BNB)
    x = f["x"]
    q = Nf4().quantize(jnp.asarray(x))
    codes = np.asarray(q.codes)
    np.testing.assert_array_equal(codes[: f["codes"].size], f["codes"])
    np.testing.assert_array_equal(unpack(codes)[x.size :], 7)  # padding: the code of 0.0
    np.testing.assert_allclose(np.asarray(q.offset), f["offset"], rtol=2e-7)
    np.testing.assert_allclose(np.asarray(q.absmax_scales), f["absmax_scales"], rtol=2e-7)

    ours, theirs = np.asarray(q.absmax_codes).astype(int), f["absmax_codes"].astype(int)
    differ = ours != theirs
    assert differ.mean() < 0.03 and np.all(np.abs(ours - theirs)[differ] == 1)
    # Where they differ, ours is the nearest code to the centred absmax.
    absmax = np.abs(np.pad(x.reshape(-1), (0, ours.size * 64 - x.size)).reshape(-1, 64)).max(axis=1)
    code = quant.absmax_code()
    scale = np.repeat(f["absmax_scales"], 256)[: ours.size]
    scaled = (absmax - f["offset"]) / scale
    assert np.all(np.abs(scaled - code[ours])[differ] <= np.abs(scaled - code[theirs])[differ])

    mine = np.asarray(q.dequantize()).reshape(-1)
    bnb = f["dequantized"].reshape(-1)
    same_block = np.repeat(~differ, 64)[: x.size]
    np.testing.assert_allclose(mine[same_block], bnb[same_block], rtol=1e-6, atol=1e-9)
    # In the other blocks each value is the same level times an absmax one code step away.
    bnb_absmax = code[theirs] * scale + f["offset"]
    our_absmax = np.asarray(q.absmax())
    level_of = lambda values, m: values / np.repeat(m, 64)[: x.size]  # noqa: E731
    np.testing.assert_allclose(level_of(mine, our_absmax), level_of(bnb, bnb_absmax), rtol=1e-5, atol=1e-6)


def test_double_quantization_round_trip():
    x = gaussian((300, 512), seed=2, std=0.05)  # 2,400 blocks: 10 absmax blocks
    q = Nf4().quantize(jnp.asarray(x))
    true_absmax = np.abs(x.reshape(-1, 64)).max(axis=1)
    restored = np.asarray(q.absmax())
    # Each block's absmax comes back within half a step of the 8-bit code times its block's scale.
    code = quant.absmax_code()
    steps = np.max(np.diff(code))
    bound = np.repeat(np.asarray(q.absmax_scales), 256)[: true_absmax.size] * steps / 2
    assert np.all(np.abs(restored - true_absmax) <= bound * (1 + 1e-5))
    assert np.abs(restored - true_absmax).max() / true_absmax.mean() < 0.01
    np.testing.assert_allclose(np.asarray(q.offset), true_absmax.mean(), rtol=1e-6)
    # Double quantization adds little to NF4's error: within 1% of float32 block scales.
    levels = quant.NF4_LEVELS[unpack(np.asarray(q.codes))].reshape(-1, 64)
    exact_scales = (levels * true_absmax[:, None]).reshape(x.shape)
    dq_error = np.sqrt(np.mean((np.asarray(q.dequantize()) - x) ** 2))
    assert dq_error <= 1.01 * np.sqrt(np.mean((exact_scales - x) ** 2))


def test_nf4_error_on_a_gaussian_matrix():
    """NF4 keeps about 9% relative RMS error on N(0, 1) weights, less than uniform 4-bit absmax (int4)."""
    x = gaussian((256, 1024), seed=3)
    error = np.sqrt(np.mean((np.asarray(Nf4().quantize(jnp.asarray(x)).dequantize()) - x) ** 2)) / x.std()
    blocks = x.reshape(-1, 64)
    top = np.abs(blocks).max(axis=1, keepdims=True)
    int4 = np.round(blocks / top * 7) / 7 * top
    int4_error = np.sqrt(np.mean((int4 - blocks) ** 2)) / x.std()
    assert 0.085 < error < 0.10
    assert error < 0.9 * int4_error


def test_int8_round_trip_within_half_a_step():
    x = gaussian((48, 6, 8), seed=4, std=0.1)
    x[:, 2, 3] = 0.0  # an all-zero channel
    for axes in [(-1,), (1, 2), (0, 2)]:
        q = Int8(channel_axes=axes).quantize(jnp.asarray(x))
        kept = tuple(a % 3 for a in axes)
        reduced = tuple(a for a in range(3) if a not in kept)
        scale = np.abs(x).max(axis=reduced, keepdims=True) / 127
        np.testing.assert_allclose(np.asarray(q.scales), scale, rtol=2e-7)
        codes = np.asarray(q.codes)
        assert codes.dtype == np.int8 and codes.min() >= -127
        np.testing.assert_array_equal(np.abs(codes).max(axis=reduced, keepdims=True)[scale > 0], 127)
        error = np.abs(np.asarray(q.dequantize()) - x)
        assert np.all(error <= np.broadcast_to(scale, x.shape) * (0.5 + 1e-6))
    q = Int8(channel_axes=(1, 2)).quantize(jnp.asarray(x))
    assert np.all(np.asarray(q.dequantize())[:, 2, 3] == 0.0)


def test_byte_counts():
    x = jnp.zeros((384, 1536))  # 9,216 blocks of 64, 36 absmax blocks
    nf4 = Nf4().quantize(x)
    assert quant.nbytes(nf4) == 9216 * 32 + 9216 + 36 * 4 + 4
    assert quant.nbytes(nf4) / x.nbytes <= 0.135
    int8 = Int8().quantize(x)
    assert quant.nbytes(int8) == 384 * 1536 + 1536 * 4
    assert quant.nbytes(int8) / x.nbytes <= 0.26
    tree = {"k": nf4, "b": jnp.zeros(7)}
    assert quant.nbytes(tree) == quant.nbytes(nf4) + 28
    assert quant.nbytes(jax.eval_shape(lambda: tree)) == quant.nbytes(tree)


# --- trees -------------------------------------------------------------------------------------


def _mlp_params(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        "hidden": {"kernel": 0.2 * jax.random.normal(keys[0], (32, 128)), "bias": jnp.zeros(128)},
        "mid": {"kernel": 0.1 * jax.random.normal(keys[1], (128, 64)), "bias": jnp.zeros(64)},
        "out": {"kernel": 0.1 * jax.random.normal(keys[2], (64, 1)), "bias": jnp.zeros(1)},
    }


RULES = ((r"hidden/kernel", "nf4"), (r"mid/kernel", Int8()))


def _mlp(params, x):
    h = jax.nn.gelu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    h = jax.nn.gelu(h @ params["mid"]["kernel"] + params["mid"]["bias"])
    return (h @ params["out"]["kernel"] + params["out"]["bias"])[:, 0]


def test_quantize_selects_by_rule_and_leaves_the_rest():
    params = _mlp_params()
    q = quant.quantize(params, RULES)
    assert isinstance(q["hidden"]["kernel"], Nf4Array) and isinstance(q["mid"]["kernel"], Int8Array)
    for path in [("hidden", "bias"), ("out", "kernel"), ("mid", "bias")]:
        assert q[path[0]][path[1]] is params[path[0]][path[1]]
    assert q["hidden"]["kernel"].shape == (32, 128) and q["hidden"]["kernel"].dtype == jnp.float32
    back = quant.dequantize(q)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    assert_within_nf4_error(back["hidden"]["kernel"], params["hidden"]["kernel"])
    assert quant.dequantize(q, jnp.bfloat16)["hidden"]["kernel"].dtype == jnp.bfloat16
    # A first matching rule wins; a predicate works as a pattern.
    q2 = quant.quantize(params, [("hidden/kernel", "int8"), (r"(hidden|mid)/kernel", "nf4")])
    assert isinstance(q2["hidden"]["kernel"], Int8Array) and isinstance(q2["mid"]["kernel"], Nf4Array)
    q3 = quant.quantize(params, [(lambda name, leaf: name.endswith("kernel") and leaf.shape[1] > 1, "int8")])
    assert isinstance(q3["hidden"]["kernel"], Int8Array) and not quant.is_quantized(q3["out"]["kernel"])


def test_quantize_and_dequantize_are_jittable():
    params = _mlp_params()
    eager = quant.quantize(params, RULES)
    jitted = jax.jit(quant.quantize, static_argnums=1)(params, RULES)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(jitted)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree_util.tree_leaves(quant.dequantize(eager)), jax.tree_util.tree_leaves(jax.jit(quant.dequantize)(jitted))
    ):
        np.testing.assert_allclose(a, b, rtol=2e-7)  # XLA may fuse absmax * scale + offset differently
    # Abstract trees, device_put and tree maps see the packed children.
    abstract = jax.eval_shape(lambda p: quant.quantize(p, RULES), params)
    assert abstract["hidden"]["kernel"].shape == (32, 128)
    assert isinstance(abstract["hidden"]["kernel"].codes, jax.ShapeDtypeStruct)
    assert quant.nbytes(abstract) == quant.nbytes(eager)
    moved = jax.device_put(eager)
    assert isinstance(moved["hidden"]["kernel"], Nf4Array)
    assert jax.tree_util.tree_map(lambda a: a, eager)["mid"]["kernel"].fmt == Int8()


def test_bad_input_is_refused():
    params = {**_mlp_params(), "ids": {"table": jnp.zeros((4, 4), jnp.int32)}}
    with pytest.raises(QuantError, match=r"unknown quantization format 'nf3'"):
        quant.quantize(params, [("hidden/kernel", "nf3")])
    with pytest.raises(QuantError, match=r"ids/table has dtype int32"):
        quant.quantize(params, [("ids/table", "int8")])
    with pytest.raises(QuantError, match=r"hidden/bias has shape \(128,\).*narrow the pattern"):
        quant.quantize(params, [(".*", "nf4")])
    with pytest.raises(QuantError, match=r"matches no leaf; closest paths: .*hidden/kernel"):
        quant.quantize(params, [("hiden/kernel", "nf4")])
    with pytest.raises(QuantError, match=r"hidden/kernel is already quantized \(nf4\)"):
        quant.quantize(quant.quantize(params, RULES), [("hidden/kernel", "int8")])
    with pytest.raises(QuantError, match=r"hidden/kernel with shape \(32, 128\): Int8\(channel_axes=\(2,\)\)"):
        quant.quantize(params, [("hidden/kernel", Int8(channel_axes=(2,)))])
    with pytest.raises(QuantError, match="pass a list of"):
        quant.quantize(params, ("hidden/kernel", "nf4"))
    with pytest.raises(QuantError, match="not a \\(pattern, format\\) pair"):
        quant.quantize(params, ["hidden/kernel"])
    with pytest.raises(QuantError, match="not a valid regex"):
        quant.quantize(params, [("hidden/(kernel", "nf4")])
    with pytest.raises(QuantError, match="positive even block size"):
        Nf4(block_size=63)
    assert issubclass(QuantError, lj.LoraError)


def test_nf4_pads_sizes_that_are_no_multiple_of_the_block():
    x = gaussian((7, 13), seed=5)
    q = Nf4().quantize(jnp.asarray(x))
    assert q.codes.shape == (64,)  # 91 values: two blocks of 64
    ref = numpy_nf4(x, quant.NF4_LEVELS, quant.absmax_code())
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref["dequantized"], rtol=1e-6)


# --- the library on a quantized base ------------------------------------------------------------

SPEC = lj.LoraSpec([lj.Rule("hidden/kernel", rank=4, alpha=8), lj.Rule("mid/kernel", rank=4), lj.trainable("out/.*")])


def _nonzero_lora(params, spec=SPEC, seed=1):
    lora = lj.init(jax.random.key(seed), params, spec)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape), x.dtype), lora)


def test_plan_and_describe_see_the_logical_shapes():
    params = _mlp_params()
    q = quant.quantize(params, RULES)
    assert [(t.name, t.shape, t.dtype) for t in lj.plan(q, SPEC)] == [
        (t.name, t.shape, t.dtype) for t in lj.plan(params, SPEC)
    ]
    assert lj.describe(q, SPEC).base_size == lj.describe(params, SPEC).base_size
    assert str(lj.describe(q, SPEC)) == str(lj.describe(params, SPEC))
    assert lj.adapters.signature(q, SPEC) == lj.adapters.signature(params, SPEC)


def test_combine_and_factored_on_a_quantized_base():
    q = quant.quantize(_mlp_params(), RULES)
    plain = quant.dequantize(q)
    lora = _nonzero_lora(q)
    combined = lj.combine(q, lora, SPEC)
    assert not any(quant.is_quantized(leaf) for _, leaf in lj.paths.flatten(combined)[0])
    for a, b in zip(jax.tree_util.tree_leaves(combined), jax.tree_util.tree_leaves(lj.combine(plain, lora, SPEC))):
        np.testing.assert_array_equal(a, b)

    x = jax.random.normal(jax.random.key(5), (16, 32))
    forward = lj.factored(_mlp, SPEC)
    np.testing.assert_allclose(jax.jit(forward)(q, lora, x), _mlp(combined, x), rtol=1e-5, atol=1e-6)
    loss_f = lambda lora: jnp.mean(forward(q, lora, x) ** 2)  # noqa: E731
    loss_c = lambda lora: jnp.mean(_mlp(lj.combine(q, lora, SPEC), x) ** 2)  # noqa: E731
    grads_f, grads_c = jax.jit(jax.grad(loss_f))(lora), jax.jit(jax.grad(loss_c))(lora)
    for a, b in zip(jax.tree_util.tree_leaves(grads_f), jax.tree_util.tree_leaves(grads_c)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Gradients go to the adapters only: the base is not an argument of grad, and none comes back for it.
    assert jax.tree_util.tree_structure(grads_f) == jax.tree_util.tree_structure(lora)


def test_init_reads_the_dequantized_base():
    q = quant.quantize(_mlp_params(), RULES)
    dora = lj.LoraSpec([lj.Rule("hidden/kernel", rank=4, mode="dora")])
    got = lj.init(jax.random.key(0), q, dora)
    want = lj.init(jax.random.key(0), quant.dequantize(q), dora)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("factored", [True, False])
def test_training_on_an_nf4_base(factored):
    params = _mlp_params()
    q = quant.quantize(params, [(r"(hidden|mid)/kernel", "nf4")])
    before = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(q)]
    x = jax.random.normal(jax.random.key(7), (64, 32))
    batch = {"x": x, "y": jnp.sin(x[:, 0]) + 0.5 * x[:, 1]}
    loss_fn = lambda p, b, rng: jnp.mean((_mlp(p, b["x"]) - b["y"]) ** 2)  # noqa: E731
    tx = optax.adam(1e-2)
    lora = lj.init(jax.random.key(1), q, SPEC)
    state = tx.init(lora)
    step = jax.jit(lj.training.train_step(loss_fn, SPEC, tx, factored=factored))
    losses = []
    for _ in range(30):
        lora, state, loss = step(q, lora, state, batch, None)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree_util.tree_leaves(q)))


def test_factored_and_combine_steps_agree_on_an_nf4_base():
    q = quant.quantize(_mlp_params(), [(r"(hidden|mid)/kernel", "nf4")])
    x = jax.random.normal(jax.random.key(8), (32, 32))
    batch = {"x": x, "y": jnp.cos(x[:, 0])}
    loss_fn = lambda p, b, rng: jnp.mean((_mlp(p, b["x"]) - b["y"]) ** 2)  # noqa: E731
    tx = optax.sgd(0.1)
    lora = _nonzero_lora(q)
    out = [
        jax.jit(lj.training.train_step(loss_fn, SPEC, tx, factored=f))(q, lora, tx.init(lora), batch, None)
        for f in (True, False)
    ]
    np.testing.assert_allclose(out[0][2], out[1][2], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(out[0][0]), jax.tree_util.tree_leaves(out[1][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_an_nf4_base_holds_fewer_step_argument_bytes():
    """XLA's argument bytes of one factored step fall by at least the base's byte saving."""
    params = _mlp_params()
    rules = [(r"(hidden|mid)/kernel", "nf4")]
    q = quant.quantize(params, rules)
    x = jnp.ones((8, 32))
    batch = {"x": x, "y": x[:, 0]}
    loss_fn = lambda p, b, rng: jnp.mean((_mlp(p, b["x"]) - b["y"]) ** 2)  # noqa: E731
    tx = optax.adam(1e-2)
    lora = lj.init(jax.random.key(1), params, SPEC)
    step = jax.jit(lj.training.train_step(loss_fn, SPEC, tx))

    def arguments(base):
        return step.lower(base, lora, tx.init(lora), batch, None).compile().memory_analysis().argument_size_in_bytes

    saving = quant.nbytes(params) - quant.nbytes(q)
    assert saving > 0.8 * (32 * 128 + 128 * 64) * 4
    assert arguments(params) - arguments(q) >= saving


def _mlp_transposed(params, x):
    """``_mlp`` reading the mid kernel through a transpose: a use that is not a product with the kernel itself."""
    h = jax.nn.gelu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    h = jax.nn.gelu(jnp.einsum("bi,oi->bo", h, params["mid"]["kernel"].T) + params["mid"]["bias"])
    return (h @ params["out"]["kernel"] + params["out"]["bias"])[:, 0]


def _mlp_bfloat16(params, x):
    """``_mlp`` computing in bfloat16 from float32 params: each kernel is cast before its product."""
    bf16 = jnp.bfloat16
    h = jax.nn.gelu(x.astype(bf16) @ params["hidden"]["kernel"].astype(bf16) + params["hidden"]["bias"].astype(bf16))
    h = jax.nn.gelu(h @ params["mid"]["kernel"].astype(bf16) + params["mid"]["bias"].astype(bf16))
    return (h.astype(jnp.float32) @ params["out"]["kernel"] + params["out"]["bias"])[:, 0]


def _kept(fn, base, lora, spec, x, recompute):
    """The shapes and dtypes the factored ``fn`` keeps from its forward pass for its backward pass."""
    forward = lj.factored(fn, spec, recompute_dequantized=recompute)
    _, backward = jax.vjp(lambda lora, x: forward(base, lora, x), lora, x)
    return [(leaf.shape, leaf.dtype) for leaf in jax.tree_util.tree_leaves(backward)]


def test_the_backward_pass_keeps_codes_not_dequantized_kernels():
    """What the factored step keeps from forward to backward: the NF4 codes of each kernel, adapted or not.

    Kept float copies of the base would cost more than the base saved; on a float base the same step does keep
    the kernels (they are what ``dx = dy W0ᵀ`` needs), so this tells the two apart.
    """
    params = _mlp_params()
    spec = lj.LoraSpec([lj.Rule("hidden/kernel", rank=4)])
    q = quant.quantize(params, [(r"(hidden|mid)/kernel", "nf4")])
    lora = _nonzero_lora(q, spec)
    x = jax.random.normal(jax.random.key(3), (8, 32))
    kernel_shapes = {(32, 128), (128, 64)}

    def floats(kept):
        return {shape for shape, dtype in kept if dtype == jnp.float32}

    assert floats(_kept(_mlp, params, lora, spec, x, True)) >= kernel_shapes
    # A product with a quantized kernel keeps its codes, whether or not the step recomputes the rest, and when
    # the kernel is cast to the compute dtype first.
    for fn in (_mlp, _mlp_bfloat16):
        for recompute in (True, False):
            on_codes = _kept(fn, q, lora, spec, x, recompute)
            assert not any(shape in kernel_shapes for shape, _ in on_codes)
            assert sum(1 for _, dtype in on_codes if dtype == jnp.uint8) >= 2
    # A kernel that reaches its product through another operation (here a transpose) is read as an array: the
    # step keeps that array, a float copy.
    assert (64, 128) in floats(_kept(_mlp_transposed, q, lora, spec, x, False))
    # Through combine (train_step's factored=False) the frozen kernel, whose dx the adapter below needs, is
    # dequantized again too.
    for factored in (True, False):
        step = lj.training.train_step(
            lambda p, b, rng: jnp.sum(_mlp(p, b) ** 2),
            spec,
            optax.sgd(0.1),
            factored=factored,
            recompute_dequantized=True,
        )
        _, backward = jax.vjp(lambda lora: step.loss(q, lora, x, None), lora)
        assert (128, 64) not in [leaf.shape for leaf in jax.tree_util.tree_leaves(backward)]
    # The same gradients as on the dequantized copy of the base, whichever way the kernel is read.
    for fn, recompute in itertools.product((_mlp, _mlp_transposed, _mlp_bfloat16), (False, True)):
        forward = lj.factored(fn, spec, recompute_dequantized=recompute)
        grads = [
            jax.grad(lambda lora, x, base: jnp.sum(forward(base, lora, x) ** 2), argnums=(0, 1))(lora, x, base)
            for base in (q, quant.dequantize(q))
        ]
        for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_a_quantized_kernel_is_dequantized_next_to_its_product(fmt):
    """XLA's temporaries of a factored training step on a deep quantized MLP hold about one float kernel.

    Dequantizing each kernel at its product, after its input (forward) or its output's cotangent (backward)
    exists, keeps the float copies from all being alive at once: with twelve 4 MiB kernels, all twelve would be
    48 MiB (XLA:CPU's default scheduler runs a dequantization that waits for nothing first).
    """
    width, depth = 1024, 12
    keys = jax.random.split(jax.random.key(0), depth)
    params = {f"l{i}": {"kernel": 0.03 * jax.random.normal(keys[i], (width, width))} for i in range(depth)}

    def deep(params, x):
        for i in range(depth):
            x = jnp.tanh(x @ params[f"l{i}"]["kernel"])
        return x

    spec = lj.LoraSpec([lj.Rule(r"l\d+/kernel", rank=4)])
    q = quant.quantize(params, [(r".*kernel", fmt)])
    lora = lj.init(jax.random.key(1), params, spec)
    x = jnp.ones((64, width))
    forward = lj.factored(deep, spec, recompute_dequantized=False)
    grad = jax.jit(jax.grad(lambda lora, base: jnp.sum(forward(base, lora, x))))
    temp = grad.lower(lora, q).compile().memory_analysis().temp_size_in_bytes
    kernel = width * width * 4
    assert temp < 3 * kernel, f"{temp / kernel:.1f} kernels of temporaries"


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_a_non_finite_input_never_gives_finite_wrong_rows(fmt):
    """Each row of a product with a quantized kernel is the dequantized copy's row, or NaN: never a wrong number.

    (The dequantization waits for the input through a value that is 0 for a finite input; a NaN or infinity
    where it looks makes the whole product NaN, so no row is computed from altered codes.)
    """
    params = _mlp_params()
    spec = lj.LoraSpec([lj.Rule("hidden/kernel", rank=4)])
    q = quant.quantize(params, [(r"(hidden|mid)/kernel", fmt)])
    lora = _nonzero_lora(q, spec)
    forward = lj.factored(_mlp, spec)
    for bad in (jnp.nan, jnp.inf):
        x = jax.random.normal(jax.random.key(3), (8, 32)).at[0, 0].set(bad)
        got = np.asarray(forward(q, lora, x))
        want = np.asarray(forward(quant.dequantize(q), lora, x))
        finite = np.isfinite(got)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)
        assert not np.isfinite(got[0])


def test_merge_a_quantized_base_to_a_plain_tree_and_quantize_again():
    q = quant.quantize(_mlp_params(), RULES)
    lora = _nonzero_lora(q)
    for dtype in (jnp.float32, jnp.bfloat16):
        merged = lj.merge(q, lora, SPEC, dtype=dtype)
        leaves = [leaf for _, leaf in lj.paths.flatten(merged)[0]]
        assert not any(quant.is_quantized(leaf) for leaf in leaves)
        assert all(leaf.dtype == dtype for leaf in leaves)
        want = lj.merge(quant.dequantize(q), lora, SPEC)  # float32
        for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(want)):
            # Rounded once to the dtype: within half a bfloat16 ulp (2^-8 relative) of the float32 merge.
            rtol = 2**-8 if dtype == jnp.bfloat16 else 1e-6
            np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=rtol, atol=1e-30)
    merged = lj.merge(q, lora, SPEC)
    assert merged["hidden"]["kernel"].dtype == jnp.float32  # each leaf's own (logical) dtype
    again = quant.quantize(merged, RULES)
    assert isinstance(again["hidden"]["kernel"], Nf4Array)
    assert_within_nf4_error(quant.dequantize(again)["hidden"]["kernel"], merged["hidden"]["kernel"])


# --- loading ---------------------------------------------------------------------------------------


@functools.cache
def _load(name: str, quantize: str | None = None, scan_layers: bool = False):
    """``from_pretrained`` of a fixture model, once per module (its arrays are immutable)."""
    return models.from_pretrained(FIXTURES / "models" / name, quantize=quantize, scan_layers=scan_layers)


@pytest.mark.parametrize(
    ("name", "fmt"), [("tiny_llama", "nf4"), ("tiny_llama", "int8"), ("tiny_bert_cls", "int8"), ("tiny_gpt2", "nf4")]
)
def test_from_pretrained_quantizes_the_linear_kernels(name, fmt):
    model, plain = _load(name)
    _, q = _load(name, fmt)
    linears = {t.path for t in lj.plan(plain, models.lora_spec(model, "all-linear"))}
    found = {path: leaf for path, leaf in lj.paths.flatten(q)[0] if quant.is_quantized(leaf)}
    assert set(found) == linears and len(found) == 2 * len(models.ARCHITECTURES.of(model).linears_for(model.config))
    assert all(leaf.fmt.name == fmt for leaf in found.values())
    # Everything else (embeddings, norms, biases, heads) loads as it does unquantized.
    flat_plain = dict(lj.paths.flatten(plain)[0])
    for path, leaf in lj.paths.flatten(q)[0]:
        if path not in linears:
            np.testing.assert_array_equal(leaf, flat_plain[path])
    # Quantizing while loading equals quantizing the loaded tree with the same rules.
    again = quant.quantize(plain, models.quant_rules(model, fmt))
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(q)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(q)):
        np.testing.assert_array_equal(a, b)
    if fmt == "int8":  # a scale per output channel, from the registry's output axes
        heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
        query = next(leaf for path, leaf in found.items() if "query" in path)
        out = next(leaf for path, leaf in found.items() if path[-3:] == ("attention", "out", "kernel"))
        assert query.scales.shape == (1, heads, head_dim) and out.scales.shape == (1, 1, model.config.hidden_size)


def test_quant_rules_follow_the_layout():
    """GPT-2's registry lists the fused qkv kernel beside q, k and v: each layout gets rules for its own kernels."""
    for fused in (False, True):
        model, plain = models.from_pretrained(FIXTURES / "models" / "tiny_gpt2", fused_qkv=fused)
        q = quant.quantize(plain, models.quant_rules(model, "nf4"))  # a rule that matched nothing would raise
        names = {lj.paths.path_str(path) for path, leaf in lj.paths.flatten(q)[0] if quant.is_quantized(leaf)}
        assert any("attention/qkv" in name for name in names) == fused
        assert any("attention/query" in name for name in names) != fused


def test_from_pretrained_int8_scanned_equals_unrolled():
    """int8's scale per layer and output channel makes a scanned stack the unrolled layers, stacked."""
    _, unrolled = _load("tiny_llama", "int8")
    model, scanned = _load("tiny_llama", "int8", scan_layers=True)
    stacked = models.stack_layers(quant.dequantize(unrolled))
    for (p, leaf), (_, want) in zip(lj.paths.flatten(quant.dequantize(scanned))[0], lj.paths.flatten(stacked)[0]):
        np.testing.assert_array_equal(leaf, want, err_msg=lj.paths.path_str(p))
    kernels = [leaf for _, leaf in lj.paths.flatten(scanned)[0] if quant.is_quantized(leaf)]
    assert kernels and all(leaf.scales.shape[0] == model.config.num_hidden_layers for leaf in kernels)


def test_quantized_model_runs_close_to_the_full_precision_one():
    ids = jnp.asarray(np.load(FIXTURES / "models" / "tiny_llama" / "expected.npz")["input_ids"])
    model, plain = _load("tiny_llama")
    spec = models.lora_spec(model, "qv", rank=2)
    forward = jax.jit(lj.factored(lambda p, x: model.apply({"params": p}, x).logits, spec))
    combined = jax.jit(lambda base, lora, x: model.apply({"params": lj.combine(base, lora, spec)}, x).logits)
    # Random tiny weights: NF4's ~9% noise per weight compounds over two layers; int8's ~1% hardly does.
    errors = {}
    for fmt, tolerance in (("int8", 0.02), ("nf4", 0.4)):
        _, q = _load("tiny_llama", fmt)
        lora = _nonzero_lora(q, spec)
        logits = forward(q, lora, ids)
        np.testing.assert_allclose(logits, combined(q, lora, ids), atol=1e-4)
        lora_reference = combined(plain, lora, ids)
        errors[fmt] = np.linalg.norm(logits - lora_reference) / np.linalg.norm(lora_reference)
        assert errors[fmt] < tolerance, (fmt, errors[fmt])
    assert errors["int8"] < errors["nf4"] / 5


def test_recomputation_by_default_where_the_scheduler_runs_it_late(monkeypatch):
    """None decides by the backend: not under XLA:CPU's default scheduler, which would run it early."""
    from lora_jax import scheduling

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert not scheduling.recomputation_saves_memory()
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {models.MEMORY_SCHEDULER_FLAG}")
    assert scheduling.recomputation_saves_memory()
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert scheduling.recomputation_saves_memory()


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_recompute_dequantized_must_be_a_bool_or_none(value):
    with pytest.raises(QuantError, match=r"factored: recompute_dequantized=.*give True, False or None"):
        lj.factored(_mlp, SPEC, recompute_dequantized=value)
    with pytest.raises(QuantError, match=r"train_step: recompute_dequantized=.*give True, False or None"):
        lj.training.train_step(lambda p, b, rng: 0.0, SPEC, optax.sgd(0.1), recompute_dequantized=value)


def test_layers_of_a_stack_dequantize_to_its_slices():
    stack = jax.random.normal(jax.random.key(4), (3, 32, 64))
    for fmt in (Nf4(absmax_block_size=8), Int8(channel_axes=(0, 2)), Int8()):
        q = quant.quantize_array(stack, fmt)
        whole = q.dequantize()
        per_layer = jax.lax.map(lambda layer: layer.dequantize(), q.layers())
        np.testing.assert_allclose(per_layer, whole, rtol=1e-6, err_msg=str(fmt))  # FMA may round apart
    # Blocks of absmax codes that straddle two layers do not split: the stack is dequantized whole.
    assert quant.quantize_array(stack, Nf4()).layers() is None  # 32 blocks a layer, absmax blocks of 256
    assert quant.quantize_array(stack[0], Nf4(absmax_block_size=8)).layers() is None  # a row: one block
    assert quant.quantize_array(jnp.ones((4, 512)), Nf4(absmax_block_size=8)).layers() is not None  # eight
    assert quant.quantize_array(jnp.ones((3, 40)), Nf4(absmax_block_size=1)).layers() is None  # 40 per layer


@pytest.mark.parametrize("fmt", ["int8", Nf4(absmax_block_size=16)], ids=["int8", "nf4"])
def test_a_scanned_quantized_stack_is_dequantized_a_layer_at_a_time(fmt):
    """Inside the scan each step dequantizes its own layer: no float stack is formed, nor kept for the backward pass.

    (The tiny model's 64 x 64 kernels hold 64 NF4 blocks a layer, so absmax blocks of 16 split at layers.)
    """
    ids = jnp.asarray(np.load(FIXTURES / "models" / "tiny_llama" / "expected.npz")["input_ids"])
    model, scanned = _load("tiny_llama", scan_layers=True)
    q = quant.quantize(scanned, models.quant_rules(model, fmt))
    spec = models.lora_spec(model, "qv", rank=2)
    lora = _nonzero_lora(q, spec)
    loss = lambda p, x: jnp.sum(model.apply({"params": p}, x).logits ** 2)  # noqa: E731
    stacks = {leaf.shape for _, leaf in lj.paths.flatten(q)[0] if quant.is_quantized(leaf)}
    assert stacks and all(shape[0] == model.config.num_hidden_layers for shape in stacks)
    layer_shapes = {shape[1:] for shape in stacks}

    def float_values(base):
        forward = functools.partial(lj.factored(loss, spec, recompute_dequantized=True), base, x=ids)
        jaxpr = jax.make_jaxpr(lambda lora: jax.vjp(forward, lora))(lora)
        found = set()

        def visit(jaxpr):
            for eqn in jaxpr.eqns:
                found.update(tuple(v.aval.shape) for v in eqn.outvars if v.aval.dtype == jnp.float32)
                for param in eqn.params.values():
                    for sub in param if isinstance(param, (tuple, list)) else [param]:
                        inner = getattr(sub, "jaxpr", sub)
                        if isinstance(inner, jax.extend.core.Jaxpr):
                            visit(inner)

        visit(jaxpr.jaxpr)
        return found, jax.tree_util.tree_leaves(jax.vjp(forward, lora)[1])

    formed, kept = float_values(q)
    assert not formed & stacks  # never a whole float stack
    assert formed & layer_shapes  # one layer at a time
    assert not any(leaf.shape in stacks and leaf.dtype == jnp.float32 for leaf in kept)
    plain_formed, plain_kept = float_values(quant.dequantize(q))
    assert any(leaf.shape in stacks and leaf.dtype == jnp.float32 for leaf in plain_kept)
    # The same loss and gradients as on the dequantized copy of the base.
    grads = [
        jax.value_and_grad(lambda adapters, b: lj.factored(loss, spec)(b, adapters, ids))(lora, b)
        for b in (q, quant.dequantize(q))
    ]
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads[0][1]), jax.tree_util.tree_leaves(grads[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_from_pretrained_refuses_an_unknown_format():
    with pytest.raises(QuantError, match="unknown quantization format 'int4'"):
        models.from_pretrained(FIXTURES / "models" / "tiny_llama", quantize="int4")
    model, _ = _load("tiny_llama")
    with pytest.raises(QuantError, match="give 'int8'"):
        models.quant_rules(model, Int8())


def test_minilm_byte_ratios(minilm_dir):
    """The QLoRA goals on a real model: NF4 kernels <= 0.135 x their float32 bytes, int8 <= 0.26 x."""
    _, plain = models.from_pretrained(minilm_dir)
    flat_plain = dict(lj.paths.flatten(plain)[0])
    for fmt, goal in (("nf4", 0.135), ("int8", 0.26)):
        _, q = models.from_pretrained(minilm_dir, quantize=fmt)
        kernels = {path: leaf for path, leaf in lj.paths.flatten(q)[0] if quant.is_quantized(leaf)}
        assert len(kernels) == 6 * 6  # q, k, v, o, intermediate, output in 6 layers
        ratio = quant.nbytes(list(kernels.values())) / quant.nbytes([flat_plain[p] for p in kernels])
        assert ratio <= goal, (fmt, ratio)
        assert quant.nbytes(q) < quant.nbytes(plain)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_partitions_refuse_to_shard_a_quantized_leaf(fmt):
    from jax.sharding import PartitionSpec

    from lora_jax.distributed import ShardingError, partitions

    params = {"dense": {"kernel": jnp.ones((128, 64)), "bias": jnp.ones(64)}}
    quantized = quant.quantize(params, [("dense/kernel", fmt)])
    with pytest.raises(ShardingError, match=r"dense/kernel: a quantized leaf .* can only be replicated"):
        partitions(quantized, [(".*kernel", PartitionSpec(None, "model"))])
    # Replicated: one empty partition, which fits each of its arrays; the unquantized bias may be sharded.
    found = partitions(quantized, [(".*kernel", None), (".*bias", PartitionSpec("model"))])
    assert found == {"dense": {"kernel": PartitionSpec(), "bias": PartitionSpec("model")}}
