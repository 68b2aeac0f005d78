"""Partition rules, adapter and optimizer-state partitions, and their errors.

Partition derivation runs here against abstract meshes; everything that needs
several devices runs in ``_multidevice_sharding.py`` in a subprocess with 8
fake CPU devices (this process's JAX is already up with one).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

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

MESH_2D = AbstractMesh((2, 4), ("data", "model"))
MESH_1D = AbstractMesh((8,), ("data",))


def _abstract_params(scanned: bool):
    model = tm.TinyLM(scanned=scanned)
    tokens = jax.ShapeDtypeStruct((1, tm.SEQ), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def sds(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# partitions ---------------------------------------------------------------


def test_first_matching_rule_wins_and_partitions_are_padded():
    params = {"a": {"kernel": sds(4, 8)}, "b": {"kernel": sds(4, 8), "bias": sds(8)}}
    rules = [(r"a/.*", P(None, "model")), (r".*/kernel", P("data")), (r"b/bias", None)]
    parts = dist.partitions(params, rules, MESH_2D)
    assert parts == {"a": {"kernel": P(None, "model")}, "b": {"kernel": P("data", None), "bias": P(None)}}


def test_unmatched_leaves_take_the_default_or_fail_when_strict():
    params = {"x": sds(4, 4), "y": sds(8)}
    assert dist.partitions(params, [("x", P("data"))]) == {"x": P("data", None), "y": P(None)}
    assert dist.partitions(params, [("x", P("data"))], default=P("model"))["y"] == P("model")
    with pytest.raises(dist.ShardingError, match=r"^y: no partition rule"):
        dist.partitions(params, [("x", P("data"))], strict=True)


def test_fsdp_shards_the_largest_divisible_dimension():
    params = {
        "w": sds(12, 32),  # 32 is the largest and divisible by 8
        "odd": sds(24, 9),  # 9 is not; 24 is
        "tiny": sds(3),  # nothing divisible: replicated
        "stack": sds(16, 8, 8),  # the layer axis is skipped
    }
    rules = [("stack", dist.fsdp("data", skip_leading=1)), (r".*", dist.fsdp("data"))]
    specs = dist.partitions(params, rules, MESH_1D)
    assert specs == {
        "w": P(None, "data"),
        "odd": P("data", None),
        "tiny": P(None),
        "stack": P(None, "data", None),
    }
    small = dist.partitions({"b": sds(16)}, dist.fsdp_rules("data", min_size=64), MESH_1D)
    assert small == {"b": P(None)}


def test_megatron_rules_for_dense_kernels():
    params = {
        "attn": {n: {"kernel": sds(16, 16), "bias": sds(16)} for n in ("query", "key", "value", "out")},
        "mlp": {"up_proj": {"kernel": sds(16, 64)}, "down_proj": {"kernel": sds(64, 16)}},
        "norm": {"scale": sds(16)},
    }
    specs = dist.partitions(params, dist.tensor_parallel_rules("model"), MESH_2D)
    for name in ("query", "key", "value"):
        assert specs["attn"][name] == {"kernel": P(None, "model"), "bias": P("model")}
    assert specs["attn"]["out"] == {"kernel": P("model", None), "bias": P(None)}
    assert specs["mlp"] == {"up_proj": {"kernel": P(None, "model")}, "down_proj": {"kernel": P("model", None)}}
    assert specs["norm"]["scale"] == P(None)

    both = dist.partitions(params, dist.fsdp_tp_rules("data", "model"), MESH_2D)
    assert both["attn"]["query"]["kernel"] == P("data", "model")
    assert both["attn"]["out"]["kernel"] == P("model", "data")
    assert both["mlp"]["up_proj"]["kernel"] == P("data", "model")
    assert both["norm"]["scale"] == P("data")


def test_partition_rules_take_predicates_like_spec_rules():
    params = {"a": {"kernel": sds(8, 16), "bias": sds(16)}, "layers": {"kernel": sds(2, 8, 16)}}

    def matrix(path, leaf):
        return leaf.ndim == 2

    parts = dist.partitions(params, [(matrix, P("data")), (r".*/bias", P("model"))], MESH_2D)
    assert parts == {"a": {"kernel": P("data", None), "bias": P("model")}, "layers": {"kernel": P(None, None, None)}}
    # The same matcher as LoraSpec rules: a predicate sees the /-joined path and the abstract leaf.
    seen = []
    dist.partitions(params, [(lambda path, leaf: seen.append((path, leaf.shape)) or False, None)])
    assert sorted(seen) == [("a/bias", (16,)), ("a/kernel", (8, 16)), ("layers/kernel", (2, 8, 16))]
    # A predicate for the scan stack combines with the tensor-parallel regexes.
    stacked = lambda path, leaf: path.startswith("layers/")  # noqa: E731
    tp = [(r"(.*/)?kernel", dist.column_parallel("model"))]
    by_regex = dist.partitions(params, dist.fsdp_tp_rules("data", "model", tp=tp, stacked=r"layers/.*"), MESH_2D)
    by_predicate = dist.partitions(params, dist.fsdp_tp_rules("data", "model", tp=tp, stacked=stacked), MESH_2D)
    assert by_predicate == by_regex
    assert by_regex["layers"]["kernel"] == P(None, "data", "model")


def test_model_tables_unrolled_and_scanned():
    unrolled = dist.partitions(_abstract_params(False), tm.base_rules(("data", "model"), False), MESH_2D)
    scanned = dist.partitions(
        jax.eval_shape(tm.stack_layers, _abstract_params(False)), tm.base_rules(("data", "model"), True), MESH_2D
    )
    layer, stack = unrolled["layer_0"], scanned["layers"]
    # [D, H, Dh]: heads over model, width over data; the scan axis stays whole.
    assert layer["query"]["kernel"] == P("data", "model", None)
    assert stack["query"]["kernel"] == P(None, "data", "model", None)
    assert layer["out"]["kernel"] == P("model", None, "data")
    assert stack["out"]["kernel"] == P(None, "model", None, "data")
    assert layer["up"]["kernel"] == P("data", "model")
    assert stack["down"]["kernel"] == P(None, "model", "data")


MODELS = HERE / "fixtures" / "models"


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name", ["tiny_bert_cls", "tiny_gpt2", "tiny_llama"])
def test_model_rules_for_the_bundled_models(name, scan):
    models = pytest.importorskip("lora_jax.models")
    model, params = models.from_pretrained(MODELS / name, scan_layers=scan)
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    mesh = AbstractMesh((4, 2), ("data", "model"))
    specs = dist.partitions(params, models.partition_rules(), mesh)
    flat = {"/".join(p): s for p, s in lora_jax.paths.flatten(specs)[0]}
    layer = "layers" if scan else "layer_0"
    lead = (None,) if scan else ()
    stack = next(k.rsplit(f"/{layer}/", 1)[0] for k in flat if f"/{layer}/" in k)
    attn, mlp = f"{stack}/{layer}/attention", f"{stack}/{layer}/mlp"
    # Heads over model; embedding width over data; the layer axis whole.
    assert flat[f"{attn}/query/kernel"] == P(*lead, "data", "model", None)
    assert flat[f"{attn}/value/kernel"] == P(*lead, "data", "model", None)
    assert flat[f"{attn}/out/kernel"] == P(*lead, "model", None, "data")
    up, down = {"tiny_bert_cls": ("intermediate", "output"), "tiny_gpt2": ("fc", "proj")}.get(name, ("up", "down"))
    assert flat[f"{mlp}/{up}/kernel"] == P(*lead, "data", "model")
    assert flat[f"{mlp}/{down}/kernel"] == P(*lead, "model", "data")
    assert all(isinstance(s, P) for s in flat.values())

    spec = models.lora_spec(model, "all-linear", rank=2)
    lora_parts = dist.lora_partitions(params, spec, specs)
    for path, leaf in lora_jax.paths.flatten(dist.abstract_lora(params, spec))[0]:
        dist.check_partition("/".join(path), leaf.shape, lora_jax.paths.nested_get(lora_parts, path), dict(mesh.shape))
    tp_only = dist.partitions(params, models.partition_rules(None, "model"), mesh)
    assert not any("data" in str(s) for s in jax.tree_util.tree_leaves(tp_only))


# lora_partitions, state_partitions, train_shardings ------------------------------------------


@pytest.mark.parametrize("scanned", [False, True])
def test_lora_partitions_follow_the_kernel(scanned):
    params = _abstract_params(False)
    if scanned:
        params = jax.eval_shape(tm.stack_layers, params)
    base = dist.partitions(params, tm.base_rules(("data", "model"), scanned), MESH_2D)
    specs = dist.lora_partitions(params, tm.lora_spec(scanned), base)
    lora = dist.abstract_lora(params, tm.lora_spec(scanned))
    assert jax.tree_util.tree_structure(specs) == jax.tree_util.tree_structure(lora)
    lead = (None,) if scanned else ()
    layer = specs["layers"] if scanned else specs["layer_0"]
    # query W [D, H, Dh] = P(data, model, None): A [D, r], B [r, H, Dh].
    assert layer["query"]["kernel"] == {"a": P(*lead, "data", None), "b": P(*lead, None, "model", None)}
    # out W [H, Dh, D] = P(model, None, data): A [H, Dh, r], B [r, D].
    assert layer["out"]["kernel"] == {"a": P(*lead, "model", None, None), "b": P(*lead, None, "data")}
    # down W [F, D] = P(model, data).
    assert layer["down"]["kernel"] == {"a": P(*lead, "model", None), "b": P(*lead, None, "data")}
    # A fully trainable leaf keeps the base's partition.
    assert specs["head"] == base["head"]
    for path, leaf in lora_jax.paths.flatten(lora)[0]:
        dist.check_partition("/".join(path), leaf.shape, lora_jax.paths.nested_get(specs, path), dict(MESH_2D.shape))


def _small_lora():
    params = {"enc": {"query": {"kernel": sds(16, 32)}}, "head": {"kernel": sds(32, 4)}}
    spec = lora_jax.LoraSpec([lora_jax.Rule(r"enc/.*", rank=2), lora_jax.trainable(r"head/.*")])
    base = {"enc": {"query": {"kernel": P("data", "model")}}, "head": {"kernel": P(None, "model")}}
    return params, spec, base, dist.abstract_lora(params, spec), dist.lora_partitions(params, spec, base)


def test_state_partitions_mirror_the_trainable_tree():
    params, _, base, lora, lora_parts = _small_lora()
    specs = dist.state_partitions(lora, lora_parts, optax.adamw(1e-3))
    adam = specs[0]
    assert adam.count == P()
    assert adam.mu == lora_parts and adam.nu == lora_parts

    combined = {"base": params, "lora": lora}
    tx = lora_jax.adapter_only(optax.adam(1e-3))
    specs = dist.state_partitions(combined, {"base": base, "lora": lora_parts}, tx)
    assert jax.tree_util.tree_structure(specs) == jax.tree_util.tree_structure(jax.eval_shape(tx.init, combined))
    inner = specs.inner_states["trainable"].inner_state[0]
    assert inner.mu["lora"] == lora_parts
    assert inner.count == P()


def test_state_partitions_come_from_optax_not_from_paths():
    _, _, _, lora, lora_parts = _small_lora()
    # Momentum inside a chain, behind a transformation with no state.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    assert dist.state_partitions(lora, lora_parts, tx)[1][0].trace == lora_parts
    # Adafactor keeps row and column statistics of another shape than the param: they are replicated.
    big = {"w": sds(256, 512), "v": sds(8)}
    big_parts = {"w": P("data", "model"), "v": P("data")}
    tx = optax.adafactor(1e-3)
    state = jax.eval_shape(tx.init, big)
    specs = dist.state_partitions(big, big_parts, tx)
    assert jax.tree_util.tree_structure(specs) == jax.tree_util.tree_structure(state)
    factored = next(
        s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: hasattr(x, "v_row")) if hasattr(s, "v_row")
    )
    factored_specs = next(
        s for s in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: hasattr(x, "v_row")) if hasattr(s, "v_row")
    )
    assert factored.v_row["w"].shape == (256,) and factored_specs.v_row["w"] == P()
    assert factored.v_col["w"].shape == (512,) and factored_specs.v_col["w"] == P()
    assert factored.v["v"].shape == (8,) and factored_specs.v["v"] == P("data")
    assert factored_specs.count == P()
    for leaf, part in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(specs)):
        dist.check_partition("state", leaf.shape, part, dict(MESH_2D.shape))
    # A state leaf under a path suffix of the tree, but not one of optax's copies of it, stays replicated.
    keyed = {"mu": {"w": sds(256, 512)}}
    tricky = optax.GradientTransformation(lambda p: {"extra": {"mu": {"w": jnp.zeros((256, 512))}}}, None)
    assert dist.state_partitions(keyed, {"mu": {"w": P("data")}}, tricky) == {"extra": {"mu": {"w": P()}}}


def test_train_shardings_cover_every_leaf():
    mesh = dist.make_mesh((1, 1), ("data", "model"))
    params = _abstract_params(False)
    base = dist.partitions(params, tm.base_rules(("data", "model"), False), mesh)
    tx = tm.make_tx()
    sh = dist.train_shardings(params, tm.lora_spec(False), base, mesh, tx)
    lora = dist.abstract_lora(params, tm.lora_spec(False))
    state = jax.eval_shape(tx.init, lora)
    assert jax.tree_util.tree_structure(sh.opt_state) == jax.tree_util.tree_structure(state)
    assert jax.tree_util.tree_structure(sh.lora) == jax.tree_util.tree_structure(lora)
    assert all(isinstance(s, NamedSharding) for s in jax.tree_util.tree_leaves(sh.opt_state))
    assert sh.batch.spec == P("data") and sh.replicated.spec == P()
    assert sh.step_inputs == (sh.params, sh.lora, sh.opt_state, sh.batch, sh.replicated)
    assert sh.step_outputs == (sh.lora, sh.opt_state, sh.replicated)
    combined = dist.train_shardings(params, tm.lora_spec(False), base, mesh, lora_jax.adapter_only(tx), combined=True)
    assert combined.opt_state is not None


def test_sharded_merge_on_one_device():
    mesh = dist.make_mesh((1,), ("data",))
    params = tm.make_params(False)
    spec = tm.lora_spec(False)
    base = dist.partitions(params, dist.fsdp_rules("data"), mesh)
    sh = dist.train_shardings(params, spec, base, mesh)
    # Jitted: eager init and merge dispatch op by op, which is slow on CPU.
    lora = jax.jit(lora_jax.init, static_argnums=2)(jax.random.key(0), params, spec)
    lora = jax.tree_util.tree_map(lambda x: x + 0.5, lora)
    placed = jax.device_put(params, sh.params)
    merged = dist.sharded_merge(placed, jax.device_put(lora, sh.lora), spec)
    want = jax.jit(lora_jax.merge, static_argnums=2)(params, lora, spec)
    for got, ref, src in zip(*(jax.tree_util.tree_leaves(t) for t in (merged, want, placed))):
        assert got.sharding == src.sharding
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# Errors ------------------------------------------------------------------------


def test_unknown_mesh_axis_names_path_and_axis():
    params = {"enc": {"query": {"kernel": sds(16, 32)}}}
    with pytest.raises(dist.ShardingError, match=r"enc/query/kernel: .*'model'.*\('data',\)"):
        dist.partitions(params, dist.tensor_parallel_rules("model"), MESH_1D)
    with pytest.raises(dist.ShardingError, match=r"enc/query/kernel: fsdp rule names mesh axis 'fsdp'"):
        dist.partitions(params, dist.fsdp_rules("fsdp"), MESH_1D)
    with pytest.raises(lora_jax.LoraError):
        dist.partitions(params, dist.fsdp_rules("fsdp"), MESH_1D)


def test_indivisible_dimension_names_path_axis_and_sizes():
    params = {"enc": {"query": {"kernel": sds(16, 12)}}}
    with pytest.raises(dist.ShardingError, match=r"enc/query/kernel: dimension 1 .* size 12.*'model' of size 8"):
        dist.partitions(params, [(r".*", P(None, "model"))], AbstractMesh((8,), ("model",)))
    with pytest.raises(dist.ShardingError, match=r"'data'×'model' of size 8"):
        dist.partitions(params, [(r".*", P(None, ("data", "model")))], MESH_2D)


def test_malformed_partitions():
    params = {"w": sds(8, 8)}
    with pytest.raises(dist.ShardingError, match=r"^w: .* 3 entries"):
        dist.partitions(params, [("w", P("data", None, None))])
    with pytest.raises(dist.ShardingError, match=r"^w: .*'data' twice"):
        dist.partitions(params, [("w", P("data", "data"))])
    with pytest.raises(dist.ShardingError, match=r"^w: an fsdp rule needs the mesh"):
        dist.partitions(params, dist.fsdp_rules("data"))
    with pytest.raises(dist.ShardingError, match=r"^w: partition rule gave"):
        dist.partitions(params, [("w", lambda *_: "data")])
    spec = lora_jax.LoraSpec([lora_jax.Rule("w", rank=2)])
    with pytest.raises(dist.ShardingError, match=r"^w: the base partitions tree has no PartitionSpec"):
        dist.lora_partitions(params, spec, {"v": P()})
    with pytest.raises(ValueError, match=r"partition rule '\(': pattern is not a valid regex"):
        dist.partitions(params, [("(", P())])


# Several devices -------------------------------------------------------------


@pytest.mark.slow  # a subprocess compiling about twenty sharded steps; CI runs it with the slow tests
def test_on_eight_devices():
    """Meshes (8,), (2, 4), (4, 2): shardings, agreement with one device, merge, shard_map, pmap."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "_multidevice_sharding.py")]
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=HERE.parent)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"multi-device checks timed out:\n{err.stdout}\n{err.stderr}")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
