"""Sharding checks on 8 fake CPU devices; run by tests/test_sharding.py in a subprocess.

Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts,
which the main pytest process cannot set once JAX is imported.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import lora_jax
from lora_jax import distributed as dist

HERE = pathlib.Path(__file__).parent


def _load(name: str, path: pathlib.Path):
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses (flax modules) look their module up here
    module_spec.loader.exec_module(module)
    return module


tm = _load("_multidevice_model", HERE / "_multidevice_model.py")

MESHES = [((8,), ("data",)), ((2, 4), ("data", "model")), ((4, 2), ("data", "model"))]
STEPS = 3
TOL = dict(rtol=1e-5, atol=1e-5)


def setup_module() -> None:
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


# One compile each instead of many eager ops.
_merge = jax.jit(lora_jax.merge, static_argnums=2)
_init = jax.jit(lora_jax.init, static_argnums=2)


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def _close(got, want) -> None:
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL), got, want)


def _same_sharding(array: jax.Array, want: NamedSharding, name: str) -> None:
    assert array.sharding.is_equivalent_to(want, array.ndim), f"{name}: {array.sharding} != {want}"


def _check_tree(tree, shardings, what: str) -> None:
    for (path, leaf), (_, want) in zip(lora_jax.paths.flatten(tree)[0], lora_jax.paths.flatten(shardings)[0]):
        _same_sharding(leaf, want, f"{what}/{lora_jax.paths.path_str(path)}")


@functools.cache
def _initial() -> tuple[dict, dict, dict]:
    """Unrolled base params, adapters and batch; the scanned ones are these stacked."""
    params = _host(tm.make_params(False))
    return params, _host(_init(jax.random.key(3), params, tm.lora_spec(False))), tm.make_batch()


def _initial_for(scanned: bool) -> tuple[dict, dict, dict]:
    params, lora, batch = _initial()
    if scanned:
        return _host(tm.stack_layers(params)), _host(tm.stack_layers(lora)), batch
    return params, lora, batch


@functools.cache
def _reference():
    """``STEPS`` adamw steps of the unrolled model on one device, no shardings."""
    params, lora, batch = _initial()
    device = jax.devices()[0]
    tx = tm.make_tx()
    params, lora = jax.device_put((params, lora), device)
    opt_state = jax.jit(tx.init)(lora)
    step = jax.jit(tm.make_step(False, tx))
    losses = []
    for _ in range(STEPS):
        lora, opt_state, loss = step(params, lora, opt_state, batch, None)
        losses.append(float(loss))
    return _host(lora), _host(opt_state), losses


def _sharded_run(mesh_shape, names, scanned: bool, factored: bool):
    host_params, lora0, batch = _initial_for(scanned)
    mesh = dist.make_mesh(mesh_shape, names)
    tx = tm.make_tx()
    spec = tm.lora_spec(scanned)
    base_specs = dist.partitions(host_params, tm.base_rules(names, scanned), mesh)
    sh = dist.train_shardings(host_params, spec, base_specs, mesh, tx, data_axes="data")
    params = jax.device_put(host_params, sh.params)
    lora = jax.device_put(lora0, sh.lora)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(lora)
    step = dist.jit_step(tm.make_step(scanned, tx, factored=factored), sh)
    batch = jax.device_put(batch, sh.batch)
    losses = []
    for _ in range(STEPS):
        lora, opt_state, loss = step(params, lora, opt_state, batch, None)
        losses.append(float(loss))
    return sh, base_specs, host_params, params, lora, opt_state, losses


# Every mesh, both layouts on (2, 4), the factored path once; each case compiles a step, so not all twelve.
TRAIN_CASES = [
    (MESHES[0], False, False),
    (MESHES[1], False, False),
    (MESHES[1], True, False),
    (MESHES[2], True, False),
    (MESHES[1], True, True),
]


@pytest.mark.parametrize(
    "mesh,scanned,factored",
    TRAIN_CASES,
    ids=["8-unrolled", "2x4-unrolled", "2x4-scanned", "4x2-scanned", "2x4-scanned-factored"],
)
def test_training_matches_one_device(mesh, scanned, factored):
    mesh_shape, names = mesh
    sh, base_specs, host_params, params, lora, opt_state, losses = _sharded_run(mesh_shape, names, scanned, factored)
    # Every adapter and optimizer-state leaf carries the sharding its rule says.
    _check_tree(lora, sh.lora, "lora")
    _check_tree(opt_state, sh.opt_state, "opt_state")
    _check_tree(params, sh.params, "params")
    # Same numbers as one device; the scanned model agrees with the unrolled one.
    want_lora, want_state, want_losses = _reference()
    if scanned:
        want_lora = tm.stack_layers(want_lora)
        want_state = jax.tree_util.tree_map(
            lambda x: tm.stack_layers(x) if isinstance(x, dict) and "layer_0" in x else x,
            want_state,
            is_leaf=lambda x: isinstance(x, dict) and "layer_0" in x,
        )
    _close(lora, want_lora)
    _close(opt_state, want_state)
    np.testing.assert_allclose(losses, want_losses, **TOL)
    # Training never writes the base.
    jax.tree_util.tree_map(np.testing.assert_array_equal, _host(params), host_params)
    # The rules really shard: adapters use every mesh axis.
    lora_specs = jax.tree_util.tree_leaves(dist.lora_partitions(host_params, tm.lora_spec(scanned), base_specs))
    used = {
        axis for s in lora_specs for entry in s if entry for axis in ((entry,) if isinstance(entry, str) else entry)
    }
    assert used == set(names)


@pytest.mark.parametrize("mesh_shape,names", MESHES, ids=["8", "2x4", "4x2"])
def test_merge_keeps_shardings(mesh_shape, names):
    mesh = dist.make_mesh(mesh_shape, names)
    spec = tm.lora_spec(True)
    host_params = _initial_for(True)[0]
    base_specs = dist.partitions(host_params, tm.base_rules(names, True), mesh)
    sh = dist.train_shardings(host_params, spec, base_specs, mesh)
    lora = _init(jax.random.key(0), host_params, spec)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lora)  # B != 0, so merge changes the kernels
    lora = jax.device_put(lora, sh.lora)
    params = jax.device_put(host_params, sh.params)
    want = _host(_merge(host_params, _host(lora), spec))

    merged = dist.sharded_merge(params, lora, spec)
    _check_tree(merged, sh.params, "merged")
    _close(merged, want)

    # Each device adds its own slice of A @ B to its slice of W: no collectives at all.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    jitted = dist.shardings._jitted_merge(False, treedef, tuple(x.sharding for x in leaves))
    compiled = jitted.lower(params, lora, spec).compile()
    hlo = compiled.as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert op not in hlo, op

    donated = dist.sharded_merge(params, lora, spec, donate=True)
    _check_tree(donated, sh.params, "merged")
    _close(donated, want)
    # Adapted kernels are updated in place; the head, replaced by its trained copy, is not aliased.
    assert all(params["layers"][n]["kernel"].is_deleted() for n in ("query", "key", "value", "out", "up", "down"))


DP_TX = optax.sgd(0.1, momentum=0.9)


@functools.cache
def _dp_reference():
    """``STEPS`` sgd steps on one device over the full 16-row batch."""
    params, lora, _ = _initial()
    batch = tm.make_batch(batch=16)
    step = jax.jit(tm.make_step(False, DP_TX))
    state = DP_TX.init(lora)
    losses = []
    for _ in range(STEPS):
        lora, state, loss = step(params, lora, state, batch, None)
        losses.append(float(loss))
    return _host(lora), losses


@pytest.mark.parametrize(
    "factored,varying", [(False, True), (False, False), (True, False)], ids=["combine-vma", "combine", "factored"]
)
def test_shard_map_data_parallel_matches_one_device(factored, varying):
    params, lora, _ = _initial()
    batch = tm.make_batch(batch=16)
    mesh = dist.make_mesh((8,), ("data",))
    local = tm.make_step(False, DP_TX, factored=factored, axis_name="data", mark_varying=varying)
    step = dist.shard_map_step(local, mesh, "data")
    state = DP_TX.init(lora)
    losses = []
    for _ in range(STEPS):
        lora, state, loss = step(params, lora, state, batch, None)
        losses.append(float(loss))
    want_lora, want_losses = _dp_reference()
    _close(lora, want_lora)
    np.testing.assert_allclose(losses, want_losses, **TOL)


def test_pmap_data_parallel_matches_one_device():
    params, lora, _ = _initial()
    n = jax.local_device_count()
    step = dist.pmap_step(tm.make_step(False, DP_TX, axis_name="data"), "data")
    params, lora, state = dist.replicate((params, lora, DP_TX.init(lora)), n)
    batch = dist.split_batch(tm.make_batch(batch=16), n)
    losses = []
    for _ in range(STEPS):
        lora, state, loss = step(params, lora, state, batch, None)
        losses.append(float(loss[0]))
    want_lora, want_losses = _dp_reference()
    _close(jax.tree_util.tree_map(lambda x: x[0], lora), want_lora)
    np.testing.assert_allclose(losses, want_losses, **TOL)


def test_wrappers_refuse_a_step_that_does_not_average():
    mesh = dist.make_mesh((8,), ("data",))
    with pytest.raises(lora_jax.LoraError, match=r"shard_map_step .* axis_name='data'"):
        dist.shard_map_step(tm.make_step(False, DP_TX), mesh, "data")
    with pytest.raises(lora_jax.LoraError, match=r"pmap_step .* axis_name='data'"):
        dist.pmap_step(tm.make_step(False, DP_TX, axis_name="batch"), "data")


def test_dropout_rng_under_shard_map():
    """LoRA dropout under shard_map: a key changes the loss, the same key gives the same update."""
    params, _, _ = _initial()
    spec = lora_jax.LoraSpec(
        [lora_jax.Rule(r".*/(up|down)/kernel", rank=2, dropout=0.5), lora_jax.trainable("head/.*")]
    )
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, _init(jax.random.key(3), params, spec))  # B != 0
    mesh = dist.make_mesh((8,), ("data",))
    step = dist.shard_map_step(
        lora_jax.training.train_step(tm.loss_fn(False), spec, DP_TX, axis_name="data"),
        mesh,
        donate=False,
    )
    out = step(params, lora, DP_TX.init(lora), tm.make_batch(batch=16), jax.random.key(0))
    again = step(params, lora, DP_TX.init(lora), tm.make_batch(batch=16), jax.random.key(0))
    plain = step(params, lora, DP_TX.init(lora), tm.make_batch(batch=16), None)
    _close(out[0], again[0])
    assert float(out[2]) != float(plain[2])


def test_bad_mesh_axis_and_divisibility():
    mesh = dist.make_mesh((8,), ("data",))
    params = _initial()[0]
    with pytest.raises(dist.ShardingError, match=r"layer_0/\w+/kernel: .*'model'"):
        dist.partitions(params, tm.tp_table("model"), mesh)
    with pytest.raises(dist.ShardingError, match=r"layer_0/query/kernel.*'data'.*size 8"):
        dist.partitions(params, [(r".*/query/kernel", dist.column_parallel("data", out_ndim=2))], mesh)
    # A partition that fit one mesh is checked again against another.
    specs = dist.partitions(params, [(r"embed/embedding", PartitionSpec("data"))], mesh)
    with pytest.raises(dist.ShardingError, match=r"embed/embedding.*'data'"):
        dist.check_partitions(params, specs, dist.make_mesh((2, 4), ("x", "y")))


def test_bundled_model_merge_on_a_2d_mesh():
    models = pytest.importorskip("lora_jax.models")
    model, host_params = models.from_pretrained(HERE / "fixtures" / "models" / "tiny_llama", scan_layers=True)
    mesh = dist.make_mesh((4, 2), ("data", "model"))
    spec = models.lora_spec(model, "all-linear", rank=2)
    base_specs = dist.partitions(host_params, models.partition_rules(), mesh)
    sh = dist.train_shardings(host_params, spec, base_specs, mesh)
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, _init(jax.random.key(0), host_params, spec))
    want = _host(_merge(host_params, lora, spec))
    params = jax.device_put(host_params, sh.params)
    merged = dist.sharded_merge(params, jax.device_put(lora, sh.lora), spec)
    _check_tree(merged, sh.params, "merged")
    _close(merged, want)


def test_quantized_base_trains_sharded():
    """An NF4 base trains on a 2x4 mesh as on one device: its kernels replicated, everything else as the rules say."""
    from lora_jax import quant

    params, lora0, batch = _initial()
    kernels = r".*/(query|value|key|out|up|down)/kernel"
    base = quant.quantize(params, [(kernels, "nf4")])
    mesh = dist.make_mesh((2, 4), ("data", "model"))
    rules = tm.base_rules(("data", "model"), False)
    with pytest.raises(dist.ShardingError, match="can only be replicated"):
        dist.partitions(base, rules, mesh)
    base_specs = dist.partitions(base, [(kernels, None), *rules], mesh)
    tx = tm.make_tx()
    sh = dist.train_shardings(base, tm.lora_spec(False), base_specs, mesh, tx, data_axes="data")
    runs = []
    for sharded in (False, True):
        step = tm.make_step(False, tx, factored=True)
        if sharded:
            placed = jax.device_put((base, lora0, batch), (sh.params, sh.lora, sh.batch))
            opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(placed[1])
            step = dist.jit_step(step, sh)
        else:
            placed = jax.device_put((base, lora0, batch), jax.devices()[0])
            opt_state = jax.jit(tx.init)(placed[1])
            step = jax.jit(step)
        params, lora, batch_on = placed
        losses = []
        for _ in range(STEPS):
            lora, opt_state, loss = step(params, lora, opt_state, batch_on, None)
            losses.append(float(loss))
        runs.append((_host(lora), losses))
    _close(runs[1][0], runs[0][0])
    np.testing.assert_allclose(runs[1][1], runs[0][1], **TOL)
    assert runs[0][1][-1] < runs[0][1][0]  # it trains


def test_chunked_lm_loss_keeps_the_batch_sharded():
    from lora_jax import training

    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(16, 33, 8)).astype(np.float32)
    head = rng.normal(size=(8, 50)).astype(np.float32)
    ids = rng.integers(0, 50, (16, 33)).astype(np.int32)
    mask = (rng.random((16, 33)) > 0.2).astype(np.float32)

    def loss(hidden, head, ids, mask):
        total, count = training.chunked_next_token_nll(hidden, head, ids, mask, 5)  # 32 positions: a remainder
        return total / count

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    expected = grad(hidden, head, ids, mask)
    mesh = dist.make_mesh((8,), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    placed = jax.device_put((hidden, ids, mask), rows)
    compiled = grad.lower(placed[0], head, placed[1], placed[2]).compile()
    # The chunks run along the positions: no row moves between devices, only the sums are reduced.
    assert "all-gather" not in compiled.as_text() and "all-to-all" not in compiled.as_text()
    got = compiled(placed[0], head, placed[1], placed[2])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    _close(jax.device_get(got[1]), jax.device_get(expected[1]))
    assert got[1][0].sharding.is_equivalent_to(rows, 3)
