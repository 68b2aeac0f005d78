"""Adapter sets and one batch with an adapter per row: each row equals its own merged model, swaps never retrace."""

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import models, serve
from lora_jax.errors import AdapterMismatchError, LoraError, SpecError

FIXTURES = Path(__file__).parent / "fixtures" / "models"
# (rank, alpha, scaling) of each adapter: a set mixes ranks and scales.
SHAPES = [(2, 4.0, "standard"), (4, 16.0, "standard"), (3, 6.0, "rslora")]


def _adapters(model, params, targets, head=False, shapes=SHAPES, seed=0):
    """Adapters of ``targets`` with random nonzero factors (and heads), one per entry of ``shapes``."""
    rng = np.random.default_rng(seed)
    out = []
    for rank, alpha, scaling in shapes:
        spec = models.lora_spec(model, targets, rank=rank, alpha=alpha, scaling=scaling, head=head)
        shapes_only = jax.eval_shape(lambda p, spec=spec: lj.init(jax.random.key(0), p, spec), params)
        lora = jax.tree_util.tree_map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), shapes_only)
        out.append((lora, spec))
    return out


def _inputs(model, batch, length=7, seed=0):
    ids = jnp.asarray(np.random.default_rng(seed).integers(1, model.config.vocab_size, (batch, length)), jnp.int32)
    return ids, jnp.ones_like(ids).at[1, 5:].set(0)


def _logits(model):
    def fn(params, ids, mask):
        out = model.apply({"params": params}, ids, mask)
        return out if isinstance(out, jax.Array) else out.logits

    return fn


_MERGE = jax.jit(lj.merge, static_argnums=2)


def _merged(params, loras, k):
    return params if k < 0 else _MERGE(params, *loras[k])


CASES = [
    ("tiny_bert_cls", "qv", True, False),
    ("tiny_bert_cls", "qkvo", True, True),
    ("tiny_gpt2", "all-linear", False, False),
    ("tiny_llama", "all-linear", False, True),
]


@pytest.mark.parametrize(
    ("name", "targets", "head", "scan"), CASES, ids=["bert-cls", "bert-cls-scanned", "gpt2", "llama-scanned"]
)
def test_each_row_equals_its_own_merged_model(name, targets, head, scan):
    model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan)
    loras = _adapters(model, params, targets, head)
    lora_set = serve.adapter_set(params, loras, capacity=5)
    adapter_ids = jnp.array([0, 1, 2, -1, 1, 0, 2])
    ids, mask = _inputs(model, len(adapter_ids))
    fn = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no kernel falls back to W0 + s*A@B
        out = jax.jit(serve.per_example(fn))(params, lora_set, adapter_ids, ids, mask)
    reference = jax.jit(fn)
    base = reference(params, ids, mask)
    for row, k in enumerate(adapter_ids.tolist()):
        expected = reference(_merged(params, loras, k), ids, mask)[row]
        np.testing.assert_allclose(out[row], expected, rtol=0, atol=1e-5, err_msg=f"row {row}, adapter {k}")
        if k >= 0:  # the adapters matter, so equality with their own merged model means something
            assert float(jnp.abs(expected - base[row]).max()) > 1e-2
    if head:  # every adapter trains its own classifier head, gathered per row
        heads = [np.asarray(lora["classifier"]["kernel"]) for lora, _ in loras]
        assert not np.allclose(heads[0], heads[1])


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_slice_adapters_of_a_fused_kernel_serve_from_a_set(scan):
    """GPT-2's fused c_attn with q and v slice adapters: the set holds them as whole-kernel factors of rank 2r
    (zero off their slices), and each row equals its merged model."""
    model, params = models.from_pretrained(FIXTURES / "tiny_gpt2", fused_qkv=True, scan_layers=scan)
    loras = _adapters(model, params, "qv", shapes=SHAPES[:2])
    assert all(rule.slices for _, spec in loras for rule in spec.rules)
    lora_set = serve.adapter_set(params, loras, capacity=3)
    assert lora_set.rank == 8  # 2 slices of rank 4
    adapter_ids = jnp.array([1, -1, 0, 1])
    ids, mask = _inputs(model, len(adapter_ids))
    fn = _logits(model)
    out = jax.jit(serve.per_example(fn))(params, lora_set, adapter_ids, ids, mask)
    reference = jax.jit(fn)
    for row, k in enumerate(adapter_ids.tolist()):
        expected = reference(_merged(params, loras, k), ids, mask)[row]
        np.testing.assert_allclose(out[row], expected, rtol=0, atol=1e-5, err_msg=f"row {row}, adapter {k}")


def _dora(lora, spec, params, seed):
    """``lora`` as a DoRA adapter of the same factors, with a magnitude away from ``||W0||``."""
    dora = lj.LoraSpec([dataclasses.replace(rule, mode="dora") if rule.mode == "lora" else rule for rule in spec.rules])
    fresh = lj.init(jax.random.key(seed), params, dora)
    rng = np.random.default_rng(seed)

    def fill(path, new):
        keys = tuple(getattr(k, "key", None) for k in path)
        node = lora
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return new * (1.0 + 0.2 * rng.normal(size=new.shape)).astype(np.float32)  # m
            node = node[key]
        return node

    return jax.tree_util.tree_map_with_path(fill, fresh), dora


@pytest.mark.parametrize(
    ("name", "scan"),
    [("tiny_bert_cls", False), pytest.param("tiny_llama", True, marks=pytest.mark.slow)],
    ids=["bert", "llama-scan"],
)
def test_dora_and_lora_adapters_share_a_set_each_row_equal_to_its_merged_model(name, scan):
    """DoRA rows serve ``g (x W0 + s (x A) B)`` with ``g = m / ||W0 + s A B||`` from the slot, equal to merging the
    DoRA adapter (whose merge matches PEFT); LoRA rows and the base's stay as they were in the same set."""
    model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan)
    targets, head = ("qv", True) if name == "tiny_bert_cls" else ("all-linear", False)
    loras = _adapters(model, params, targets, head)
    loras[1] = _dora(*loras[1], params, seed=1)
    lora_set = serve.adapter_set(params, loras, capacity=4)
    assert sorted(lora_set.gains) == sorted(lora_set.scales)  # every kernel takes DoRA, as adapter 1 is DoRA there
    adapter_ids = jnp.array([1, 0, -1, 2, 1])
    ids, mask = _inputs(model, len(adapter_ids))
    fn = _logits(model)
    forward = jax.jit(serve.per_example(fn))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = forward(params, lora_set, adapter_ids, ids, mask)
    reference = jax.jit(fn)
    for row, k in enumerate(adapter_ids.tolist()):
        expected = reference(_merged(params, loras, k), ids, mask)[row]
        np.testing.assert_allclose(out[row], expected, rtol=0, atol=1e-5, err_msg=f"row {row}, adapter {k}")
    # The gains matter: the same factors served as LoRA give other outputs.
    as_lora = reference(_MERGE(params, _strip_magnitudes(loras[1][0]), _as_lora(loras[1][1])), ids, mask)[0]
    assert float(jnp.abs(as_lora - out[0]).max()) > 1e-2
    # A DoRA adapter added to a slot emptied of a LoRA one; the freed slot's gain was reset to 1.
    emptied = serve.remove(lora_set, 0)
    assert all(float(jnp.abs(g[0] - 1.0).max()) == 0.0 for g in emptied.gains.values())
    refilled, slot = serve.add(params, *loras[1], emptied)
    assert slot == 0
    again = forward(params, refilled, jnp.array([0, 1]), ids[:2], mask[:2])
    for row in range(2):
        expected = reference(_merged(params, loras, 1), ids, mask)[row]
        np.testing.assert_allclose(again[row], expected, rtol=0, atol=1e-5)
    # A set built from LoRA specs alone holds no gains and refuses a DoRA adapter, naming the kernel.
    plain = serve.adapter_set(params, [loras[0]], capacity=2)
    assert plain.gains == {}
    with pytest.raises(SpecError, match=r"the adapter is DoRA there, and the set's slots hold no gain"):
        serve.add(params, *loras[1], plain)
    # empty_set of a DoRA spec takes both kinds.
    from_spec = serve.empty_set(params, loras[1][1], 2, rank=4)
    from_spec, _ = serve.add(params, *loras[0], from_spec)
    from_spec, _ = serve.add(params, *loras[1], from_spec)
    both = forward(params, from_spec, jnp.array([1, 0]), ids[:2], mask[:2])
    for row, k in enumerate([1, 0]):
        expected = reference(_merged(params, loras, k), ids, mask)[row]
        np.testing.assert_allclose(both[row], expected, rtol=0, atol=1e-5)


def _as_lora(spec):
    return lj.LoraSpec([dataclasses.replace(rule, mode="lora") if rule.mode == "dora" else rule for rule in spec.rules])


def _strip_magnitudes(lora):
    if isinstance(lora, dict):
        return {k: _strip_magnitudes(v) for k, v in lora.items() if k != "m"}
    return lora


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_rows_on_a_quantized_base_dequantize_each_kernel_once(scan):
    """Serving on an int8 base: each row equals its merged model on the dequantized base, and no kernel is
    dequantized once per row (no float array of a kernel's shape with a leading row axis is formed)."""
    model, plain = models.from_pretrained(FIXTURES / "tiny_llama", scan_layers=scan)
    q = lj.quantize(plain, models.quant_rules(model, "int8"))
    base = lj.dequantize(q)
    loras = _adapters(model, plain, "all-linear")
    lora_set = serve.adapter_set(plain, loras, capacity=3)
    adapter_ids = jnp.array([0, 1, 2, -1, 1])
    ids, mask = _inputs(model, len(adapter_ids))
    fn = _logits(model)
    forward = serve.per_example(fn)
    out = jax.jit(forward)(q, lora_set, adapter_ids, ids, mask)
    reference = jax.jit(fn)
    for row, k in enumerate(adapter_ids.tolist()):
        expected = reference(_merged(base, loras, k), ids, mask)[row]
        np.testing.assert_allclose(out[row], expected, rtol=0, atol=1e-5, err_msg=f"row {row}, adapter {k}")
    kernels = {
        leaf.shape
        for leaf in jax.tree_util.tree_leaves(q, is_leaf=lj.quant.is_quantized)
        if lj.quant.is_quantized(leaf)
    }
    per_row = {(len(adapter_ids), *shape) for shape in kernels} | {
        shape[:1] + (len(adapter_ids),) + shape[1:] for shape in kernels
    }
    text = str(jax.make_jaxpr(forward)(q, lora_set, adapter_ids, ids, mask))
    for shape in per_row:
        assert f"f32[{','.join(map(str, shape))}]" not in text, f"a kernel dequantized per row: {shape}"


def test_padding_to_the_set_rank_adds_zeros_and_scales_are_data():
    model, params = models.from_pretrained(FIXTURES / "tiny_gpt2")
    loras = _adapters(model, params, "qv")
    lora_set = serve.adapter_set(params, loras, capacity=4)
    assert lora_set.rank == 4 and lora_set.capacity == 4 and lora_set.slots() == [0, 1, 2]
    path = ("decoder", "layer_0", "attention", "query", "kernel")
    stacked = lj.paths.nested_get(lora_set.lora, path)
    for slot, (lora, spec) in enumerate(loras):
        a, b = (np.asarray(lj.paths.nested_get(lora, path)[key]) for key in ("a", "b"))
        rank = a.shape[-1]
        np.testing.assert_array_equal(stacked["a"][slot, ..., :rank], a)
        np.testing.assert_array_equal(stacked["b"][slot, :rank], b)
        assert not np.any(stacked["a"][slot, ..., rank:]) and not np.any(stacked["b"][slot, rank:])
        assert float(lora_set.scales["/".join(path)][slot]) == pytest.approx(spec.rules[0].scale)
    assert not np.any(stacked["a"][3]) and float(lora_set.scales["/".join(path)][3]) == 0.0
    # The set spec is static and carries scale 1 everywhere: the scales are data.
    assert {rule.scale for rule in lora_set.spec.rules} == {1.0}
    # Memory: N slots of (in + out) * R float32 per kernel, plus the scales and the slot flags.
    targets = [t for t in lj.plan(params, lora_set.spec)]
    per_slot = sum((t.layout.in_size + t.layout.out_size) * 4 for t in targets) * 4
    assert lora_set.nbytes == 4 * per_slot + 4 * 4 * len(targets) + 4


def test_swaps_within_capacity_do_not_retrace():
    model, params = models.from_pretrained(FIXTURES / "tiny_bert_cls")
    loras = _adapters(model, params, "qv", head=True, shapes=[*SHAPES, (1, 2.0, "standard")])
    lora_set = serve.empty_set(params, loras[0][1], capacity=3, rank=4)
    fn = _logits(model)
    run = serve.per_example(fn)
    traces = []

    @jax.jit
    def forward(params, lora_set, adapter_ids, ids, mask):
        traces.append(1)  # a Python counter: runs once per trace
        return run(params, lora_set, adapter_ids, ids, mask)

    adapter_ids = jnp.array([0, 1, -1, 0])
    ids, mask = _inputs(model, 4)

    reference = jax.jit(fn)

    def check(lora_set, slot_adapters):
        out = forward(params, lora_set, adapter_ids, ids, mask)
        for row, slot in enumerate(adapter_ids.tolist()):
            k = -1 if slot < 0 else slot_adapters[slot]
            np.testing.assert_allclose(out[row], reference(_merged(params, loras, k), ids, mask)[row], atol=1e-5)

    lora_set, slot = serve.add(params, *loras[0], lora_set)
    assert slot == 0
    lora_set, slot = serve.add(params, *loras[1], lora_set)
    assert slot == 1
    check(lora_set, {0: 0, 1: 1})
    lora_set = serve.replace(params, *loras[2], lora_set, 1)  # another rank and scaling in the same slot
    check(lora_set, {0: 0, 1: 2})
    lora_set = serve.remove(lora_set, 0)
    lora_set, slot = serve.add(params, *loras[3], lora_set)  # the freed slot, rank 1
    assert slot == 0
    check(lora_set, {0: 3, 1: 2})
    lora_set, slot = serve.add(params, *loras[1], lora_set)
    assert slot == 2 and lora_set.slots() == [0, 1, 2]
    check(lora_set, {0: 3, 1: 2})
    assert len(traces) == 1

    # Once warm, swapping compiles nothing at all: neither the forward nor the slot writes.
    compiled = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        lora_set = serve.replace(params, *loras[0], lora_set, 2)
        lora_set = serve.remove(lora_set, 1)
        lora_set, slot = serve.add(params, *loras[2], lora_set)
        jax.block_until_ready(forward(params, lora_set, adapter_ids, ids, mask))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert slot == 1 and compiled == [] and len(traces) == 1
    check(lora_set, {0: 3, 1: 2, 2: 0})


def test_an_empty_slot_is_nan_under_jit_and_refused_outside():
    model, params = models.from_pretrained(FIXTURES / "tiny_bert_cls")
    loras = _adapters(model, params, "qv", head=True)
    lora_set = serve.adapter_set(params, loras[:1], capacity=2)
    fn = _logits(model)
    run = serve.per_example(fn)
    ids, mask = _inputs(model, 3)
    traced = jax.jit(run)(params, lora_set, jnp.array([1, 5, -1]), ids, mask)  # an empty slot, one out of range
    # Under jit the ids cannot be refused: their rows come out NaN, never the base's answer; -1 is the base.
    assert np.isnan(np.asarray(traced)[:2]).all()
    np.testing.assert_allclose(traced[2], jax.jit(fn)(params, ids, mask)[2], atol=1e-5)
    with pytest.raises(LoraError, match=r"adapter_ids\[0\] = 1 names an empty slot"):
        run(params, lora_set, jnp.array([1, 0, 0]), ids, mask)
    with pytest.raises(LoraError, match=r"adapter_ids\[2\] = 2 is no slot of the set \(0 .. 1, or -1"):
        run(params, lora_set, jnp.array([0, -1, 2]), ids, mask)
    with pytest.raises(LoraError, match=r"adapter_ids\[1\] = -2 is no slot"):
        serve.check_ids(lora_set, np.array([0, -2]))
    with pytest.raises(LoraError, match="1-dim integer array"):
        run(params, lora_set, jnp.zeros((3, 1), jnp.int32), ids, mask)
    with pytest.raises(LoraError, match="1-dim integer array"):
        run(params, lora_set, jnp.zeros((3,)), ids, mask)


def test_inputs_without_one_row_per_id_are_refused():
    model, params = models.from_pretrained(FIXTURES / "tiny_bert_cls")
    lora_set = serve.adapter_set(params, _adapters(model, params, "qv")[:1])
    run = jax.jit(serve.per_example(_logits(model)))
    ids, mask = _inputs(model, 3)
    with pytest.raises(LoraError, match=r"positional argument \[1\] has shape \(3, 7\), whose axis 0 .* not B = 2"):
        run(params, lora_set, jnp.array([0, -1]), ids[:2], mask)
    with pytest.raises(LoraError, match=r"has 2 axes, so it has no example axis 2"):
        serve.per_example(_logits(model), in_axes=2)(params, lora_set, jnp.array([0, 0, -1]), ids, mask)
    with pytest.raises(LoraError, match="no input has an example axis"):
        serve.per_example(_logits(model), in_axes=None)(params, lora_set, jnp.array([0, 0, -1]), ids, mask)
    # An input all rows share is named with None.
    shared = jax.jit(serve.per_example(_logits(model), in_axes=(0, None)))
    out = shared(params, lora_set, jnp.array([0, -1]), ids[:2], jnp.ones((1, 7), jnp.int32))
    np.testing.assert_allclose(out, run(params, lora_set, jnp.array([0, -1]), ids[:2], jnp.ones((2, 7), jnp.int32)))


def test_a_kernel_without_a_low_rank_form_is_refused_not_formed_per_row():
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    spec = lj.LoraSpec([lj.Rule("dense/kernel", rank=2)])
    lora = lj.init(jax.random.key(0), params, spec)
    lora_set = serve.adapter_set(params, [(lora, spec)])

    def fn(params, x):
        kernel = params["dense"]["kernel"]
        return x @ kernel + jnp.sum(kernel)  # the sum meets the kernel itself

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LoraError, match=r"dense/kernel: it meets `reduce_sum`.*would form W0 \+ s\*A_i@B_i"):
            serve.per_example(fn)(params, lora_set, jnp.array([0]), jnp.ones((1, 4)))


def test_adapters_that_do_not_fit_the_set_are_refused():
    model, params = models.from_pretrained(FIXTURES / "tiny_gpt2")
    (lora, spec), (big, big_spec), _ = _adapters(model, params, "qv")
    lora_set = serve.adapter_set(params, [(lora, spec)], capacity=2)  # rank 2
    with pytest.raises(SpecError, match=r"rank 4 exceeds the set's rank 2; build the set with rank=4"):
        serve.add(params, big, big_spec, lora_set)
    other = models.lora_spec(model, "qkv", rank=2)
    with pytest.raises(AdapterMismatchError, match=r"attention/key/kernel, which the set does not hold"):
        serve.add(params, lj.init(jax.random.key(0), params, other), other, lora_set)
    fewer = models.lora_spec(model, ["q"], rank=2)
    with pytest.raises(AdapterMismatchError, match=r"the set holds .*value/kernel, which the adapter's spec"):
        serve.add(params, lj.init(jax.random.key(0), params, fewer), fewer, lora_set)
    dora = models.lora_spec(model, "qv", rank=2, mode="dora")
    with pytest.raises(SpecError, match=r"query/kernel: the adapter is DoRA there, and the set's slots hold no gain"):
        serve.add(params, lj.init(jax.random.key(0), params, dora), dora, lora_set)
    # Other axes for the same kernel: [D, H, Dh] with the heads as inputs instead of outputs.
    axes = lj.LoraSpec([lj.Rule(r".*/(query|value)/kernel", rank=2, in_axes=(0, 1))])
    with pytest.raises(AdapterMismatchError, match=r"mode and axes \('lora', \(\), \(0, 1\), \(2,\)\)"):
        serve.add(params, lj.init(jax.random.key(0), params, axes), axes, lora_set)
    lora_set, _ = serve.add(params, lora, spec, lora_set)
    with pytest.raises(LoraError, match="all 2 slots hold adapters"):
        serve.add(params, lora, spec, lora_set)
    with pytest.raises(LoraError, match="slot 1 holds an adapter; use replace"):
        serve.add(params, lora, spec, lora_set, slot=1)
    with pytest.raises(LoraError, match=r"slot 2 is not one of 0 .. 1"):
        serve.replace(params, lora, spec, lora_set, 2)
    emptied = serve.remove(lora_set, 1)
    with pytest.raises(LoraError, match="slot 1 is empty; use add"):
        serve.replace(params, lora, spec, emptied, 1)
    with pytest.raises(LoraError, match="slot 1 is already empty"):
        serve.remove(emptied, 1)
    with pytest.raises(LoraError, match="capacity must be a positive integer"):
        serve.empty_set(params, spec, 0)
    with pytest.raises(LoraError, match="3 adapters do not fit a capacity of 2"):
        serve.adapter_set(params, [(lora, spec)] * 3, capacity=2)
    with pytest.raises(SpecError, match=r"rank 99 exceeds min\(in, out\)"):
        serve.empty_set(params, spec, 2, rank=99)


def _decode_logits(model, run_prefill, run_step, ids, mask, steps=2):
    """Logits of the prompt and of ``steps`` greedy decode steps, through a KV cache."""
    batch, prompt = ids.shape
    cache = models.cache_for(model, batch, prompt + steps)
    slot_mask = jnp.concatenate([mask, jnp.ones((batch, steps), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    out = run_prefill(ids, slot_mask, cache, positions)
    logits = [out.logits]
    lengths = jnp.sum(mask, axis=1)
    for step in range(steps):
        nxt = jnp.argmax(out.logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        out = run_step(nxt, slot_mask, out.cache, prompt + step, (lengths + step)[:, None])
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize(("name", "scan"), [("tiny_gpt2", False), ("tiny_llama", True)], ids=["gpt2", "llama-scanned"])
def test_kv_cache_generation_with_an_adapter_per_row(name, scan):
    model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan)
    loras = _adapters(model, params, "all-linear", seed=3)
    loras[2] = _dora(*loras[2], params, seed=3)  # a DoRA adapter among LoRA ones: its gains reach every step
    lora_set = serve.adapter_set(params, loras, capacity=4)
    adapter_ids = jnp.array([0, 1, -1, 2, 1])
    ids, mask = _inputs(model, len(adapter_ids), length=5)
    mask = jnp.ones_like(ids).at[2, :2].set(0)  # left padding

    # Prefill and decode logits through the cache, per row, against the merged model's.
    run = serve.per_example(
        lambda p, *inputs, **options: model.apply({"params": p}, *inputs, **options),
        kwarg_axes={"cache": 1},
        out_axes=models.DecoderOutput(0, 1),  # pyright: ignore[reportArgumentType]
    )

    step = jax.jit(
        lambda s, i, m, c, at, pos: run(params, s, adapter_ids, i, m, cache=c, cache_index=at, position_ids=pos)
    )
    got = _decode_logits(
        model,
        lambda i, m, c, pos: step(lora_set, i, m, c, 0, pos),
        lambda i, m, c, at, pos: step(lora_set, i, m, c, at, pos),
        ids,
        mask,
    )
    plain = jax.jit(
        lambda p, i, m, c, at, pos: model.apply({"params": p}, i, m, cache=c, cache_index=at, position_ids=pos)
    )
    merged = {k: _merged(params, loras, k) for k in set(adapter_ids.tolist())}
    wanted = {
        k: _decode_logits(
            model,
            lambda i, m, c, pos, p=p: plain(p, i, m, c, 0, pos),
            lambda i, m, c, at, pos, p=p: plain(p, i, m, c, at, pos),
            ids,
            mask,
        )
        for k, p in merged.items()
    }
    for row, k in enumerate(adapter_ids.tolist()):
        for g, w in zip(got, wanted[k]):
            np.testing.assert_allclose(g[row], w[row], rtol=0, atol=1e-5, err_msg=f"row {row}, adapter {k}")

    # generate: the same tokens as each row's merged model, and one trace for all the set's contents.
    calls = []

    def count(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, models.CausalLM):
            calls.append(1)  # runs while generate is traced, never when its compiled loop runs
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(count):
        tokens = models.generate(model, params, ids, 4, lora_set=lora_set, adapter_ids=adapter_ids, attention_mask=mask)
        traced = len(calls)
        swapped = serve.replace(params, *loras[0], lora_set, 1)
        swapped_tokens = models.generate(
            model, params, ids, 4, lora_set=swapped, adapter_ids=adapter_ids, attention_mask=mask
        )
        assert len(calls) == traced > 0
    want = {k: models.generate(model, p, ids, 4, attention_mask=mask) for k, p in merged.items()}
    for row, k in enumerate(adapter_ids.tolist()):
        np.testing.assert_array_equal(tokens[row], want[k][row], err_msg=f"row {row}, adapter {k}")
        swapped_k = 0 if k == 1 else k  # slot 1 now holds adapter 0
        np.testing.assert_array_equal(swapped_tokens[row], want[swapped_k][row], err_msg=f"row {row} after the swap")
    assert not np.array_equal(tokens, want[-1])  # the adapters change what is generated


def test_generate_refuses_mixed_or_partial_adapter_arguments():
    model, params = models.from_pretrained(FIXTURES / "tiny_gpt2")
    (lora, spec), *_ = _adapters(model, params, "qv")
    lora_set = serve.adapter_set(params, [(lora, spec)])
    ids = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="give both lora_set and adapter_ids"):
        models.generate(model, params, ids, 2, lora_set=lora_set)
    with pytest.raises(ValueError, match="not both"):
        models.generate(model, params, ids, 2, lora=lora, spec=spec, lora_set=lora_set, adapter_ids=jnp.array([0, 0]))
    with pytest.raises(ValueError, match=r"one id per prompt, shape \(2,\)"):
        models.generate(model, params, ids, 2, lora_set=lora_set, adapter_ids=jnp.array([0, 0, 0]))
    with pytest.raises(LoraError, match="names an empty slot|is no slot"):
        models.generate(model, params, ids, 2, lora_set=lora_set, adapter_ids=jnp.array([0, 1]))


def test_serving_needs_only_the_core():
    """``lora_jax.serve`` runs with every optional package blocked (no flax), on a model of plain jax."""
    code = (
        "import sys\n"
        "for name in ('flax', 'orbax', 'tensorflow_datasets', 'matplotlib', 'tokenizers', 'safetensors', 'tqdm'):\n"
        "    sys.modules[name] = None\n"
        "import jax, jax.numpy as jnp, numpy as np, lora_jax as lj\n"
        "params = {'dense': {'kernel': jnp.ones((4, 3))}}\n"
        "pairs = []\n"
        "for r, alpha in ((1, 4.0), (2, 2.0)):\n"
        "    spec = lj.LoraSpec([lj.Rule('dense/kernel', rank=r, alpha=alpha)])\n"
        "    lora = {'dense': {'kernel': {'a': jnp.full((4, r), 0.5), 'b': jnp.full((r, 3), 0.25)}}}\n"
        "    pairs.append((lora, spec))\n"
        "lora_set = lj.serve.adapter_set(params, pairs)\n"
        "fn = lambda p, x: x @ p['dense']['kernel']\n"
        "out = lj.serve.per_example(fn)(params, lora_set, jnp.array([1, -1, 0]), jnp.ones((3, 4)))\n"
        "print(np.asarray(out).tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # x W0 = 4 per column; s (x A) B adds s * r * (4 * 0.5) * 0.25: 1 for r=2 (s=1), 2 for r=1 (s=4).
    assert json.loads(done.stdout) == [[5.0] * 3, [4.0] * 3, [6.0] * 3]
