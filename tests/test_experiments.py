"""Each experiment script runs at its smoke size and writes its results."""

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import experiments

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(experiments.__path__))


def load(name: str):
    return importlib.import_module(f"experiments.{name}")


@pytest.mark.parametrize("name", MODULES)
def test_experiment_is_a_module_of_the_package(name):
    source = (ROOT / "experiments" / f"{name}.py").read_text()
    assert "sys.path" not in source
    assert load(name).__name__ == f"experiments.{name}"


def test_experiments_run_as_modules_from_the_repository_root():
    done = subprocess.run(
        [sys.executable, "-m", "experiments.quickstart", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "--smoke" in done.stdout


def test_quickstart_smoke(tmp_path):
    result = load("quickstart").main(["--smoke", "--results-dir", str(tmp_path)])
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert result["accuracy"] > result["base_accuracy"] + 0.2
    assert result["gap"] < 1e-5
    table = (tmp_path / "quickstart_smoke.md").read_text()
    assert "trainable parameters" in table and "jax" in table
    assert (tmp_path / "quickstart_smoke.png").stat().st_size > 1000


def _tracked_results() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ROOT / "experiments" / "results").iterdir())}


def test_finetune_minilm_smoke(tmp_path, capsys):
    minilm, run = load("finetune_minilm"), tmp_path / "run"
    tracked = _tracked_results()
    result = minilm.main(["--smoke", "--out", str(run)])
    assert result["agree"] == result["total"] == 64
    assert result["gap"] < 1e-4
    assert 0.0 <= result["score"] <= 1.0
    # qv r=8 on six layers plus the head: a few hundred kilobytes on disk.
    assert 73_728 * 4 < result["adapter_bytes"] < 400_000
    assert (run / "adapter.safetensors").is_file()
    # By default everything goes to the run directory: no tracked file is modified.
    assert "dev accuracy" in (run / "finetune_minilm_smoke.md").read_text()
    assert (run / "finetune_minilm_smoke.png").is_file()
    assert _tracked_results() == tracked
    # A second run into it refuses, before training, to replace what the first saved.
    saved = (run / "adapter.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        minilm.main(["--smoke", "--out", str(run)])
    assert exit_.value.code == 2
    assert f"{run / 'adapter.safetensors'} exists; pass --overwrite" in capsys.readouterr().err
    assert (run / "adapter.safetensors").read_bytes() == saved


@pytest.mark.parametrize(
    ("name", "args", "saved"),
    [
        ("finetune", ["--config", '{"method": "lora"}'], "adapter.safetensors"),
        ("finetune", ["--config", '{"method": "lora"}'], "summary.json"),
        ("finetune", ["--config", '{"method": "head"}'], "summary.json"),
        ("finetune", ["--config", '{"method": "full"}'], "adapter.safetensors"),  # full FT keeps its weights
        ("finetune_minilm", ["--smoke"], "adapter.safetensors"),
        ("finetune_minilm", ["--smoke"], "finetune_minilm_smoke.md"),
        ("finetune_minilm", [], "finetune_minilm.png"),
    ],
)
def test_experiment_never_replaces_a_saved_file_unasked(tmp_path, capsys, name, args, saved):
    out = tmp_path / "run"
    out.mkdir()
    (out / saved).write_bytes(b"a user's file")
    with pytest.raises(SystemExit) as exit_:
        load(name).main([*args, "--out", str(out)])  # refused before any work
    assert exit_.value.code == 2
    assert f"{out / saved} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (out / saved).read_bytes() == b"a user's file"


@pytest.mark.parametrize(
    ("name", "saved"),
    [
        ("bench_batching", "bench_batching_smoke.md"),
        ("bench_dropout", "bench_dropout_smoke.md"),
        ("bench_latency", "bench_latency_smoke.png"),
        ("bench_memory", "bench_memory_smoke.md"),
        ("bench_remat", "bench_remat_smoke.md"),
        ("bench_serving", "bench_serving_smoke.png"),
        ("bench_train", "bench_train_smoke.md"),
        ("glue", "glue_smoke.png"),
        ("glue_budget", "glue_budget_smoke.md"),
        ("profile_step", "profile_minilm_lora-factored_current_smoke.md"),
        ("quickstart", "quickstart_smoke.png"),
        ("rank_sweep", "rank_sweep_smoke.md"),
        ("subspace", "subspace_smoke_spectrum.png"),
        ("variants", "variants_smoke.md"),
        ("finetune_minilm", "finetune_minilm_smoke.png"),  # an explicit --results-dir too
    ],
)
def test_results_are_never_replaced_unasked(tmp_path, capsys, name, saved):
    (tmp_path / saved).write_bytes(b"a user's file")
    with pytest.raises(SystemExit) as exit_:
        load(name).main(["--smoke", "--results-dir", str(tmp_path)])  # refused before any work
    assert exit_.value.code == 2
    assert f"{tmp_path / saved} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / saved).read_bytes() == b"a user's file"


def test_multiprocess_train_never_replaces_a_saved_file_unasked(tmp_path, capsys):
    (tmp_path / "lora.npz").write_bytes(b"a user's file")
    for out in ("lora.npz", "lora"):  # np.savez adds .npz
        with pytest.raises(SystemExit):
            load("multiprocess_train").main(["--num-processes", "1", "--out", str(tmp_path / out)])
        assert f"{tmp_path / 'lora.npz'} exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "lora.npz").read_bytes() == b"a user's file"


def test_embeddings_never_replaces_a_saved_file_unasked(tmp_path):
    (tmp_path / "table.md").write_text("a user's file")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.embeddings", "--out", str(tmp_path / "table.md")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2 and f"{tmp_path / 'table.md'} exists; pass --overwrite" in done.stderr
    assert (tmp_path / "table.md").read_text() == "a user's file"


@pytest.mark.slow  # about a minute; CI runs it with the slow tests
def test_glue_rank_sweep_and_subspace_smoke(tmp_path):
    cache, results = tmp_path / "cache", tmp_path / "results"
    glue = load("glue").main(["--smoke", "--cache", str(cache), "--results-dir", str(results)])
    assert {r["config"]["method"] for r in glue} == {"lora", "head"}
    assert glue[0]["trainable"] > glue[1]["trainable"] > 0 and glue[0]["peak_rss_mib"] > 100
    sweep = load("rank_sweep").main(["--smoke", "--cache", str(cache), "--results-dir", str(results)])
    assert [r["config"]["rank"] for r in sweep] == [1, 8]
    assert sweep[1]["dir"] == glue[0]["dir"]  # the shared configuration trained once
    study = load("subspace").main(["--smoke", "--cache", str(cache), "--results-dir", str(results)])
    for values in study["maps"].values():
        assert values.min() >= -1e-9 and values.max() <= 1 + 1e-9
    for name in ("glue_smoke", "rank_sweep_smoke", "subspace_smoke"):
        assert (results / f"{name}.md").read_text().count("|") > 10
        assert (results / f"{name}.png").stat().st_size > 1000


def test_subspace_similarity_reference():
    subspace = load("subspace")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 8))
    same = subspace.similarity(a, a @ rng.normal(size=(8, 8)))  # same column space
    np.testing.assert_allclose(same[-1, -1], 1.0, atol=1e-9)
    orthogonal = np.linalg.qr(rng.normal(size=(64, 16)))[0]
    np.testing.assert_allclose(subspace.similarity(orthogonal[:, :8], orthogonal[:, 8:]), 0.0, atol=1e-12)
    # phi(i, j) against the definition for one entry.
    b = rng.normal(size=(64, 12))
    u1, u2 = np.linalg.svd(a, full_matrices=False)[0], np.linalg.svd(b, full_matrices=False)[0]
    expected = np.linalg.norm(u1[:, :3].T @ u2[:, :5]) ** 2 / 3
    np.testing.assert_allclose(subspace.similarity(a, b)[2, 4], expected, rtol=1e-10)


@pytest.mark.parametrize("name", ["minilm", "gpt2-small"])
def test_bench_train_workload_without_dropout_ignores_the_key(name):
    import jax

    bench_train = load("bench_train")
    losses = {}
    for dropout in (True, False):
        _, params, batch, _, loss = bench_train.workload(name, 8, smoke=True, dropout=dropout)
        losses[dropout] = [float(loss(params, batch, jax.random.key(seed))) for seed in (0, 1)]
    assert losses[True][0] != losses[True][1]  # dropout on: the key changes the masks
    assert losses[False][0] == losses[False][1]  # every rate zero: nothing random is left


def test_bench_train_decoder_workload_with_a_chunked_loss_is_the_same_loss():
    bench_train = load("bench_train")
    _, params, batch, _, whole = bench_train.workload("gpt2-small", 8, smoke=True)
    _, _, _, _, chunked = bench_train.workload("gpt2-small", 8, smoke=True, chunk=3)
    import jax

    np.testing.assert_allclose(jax.jit(chunked)(params, batch, None), jax.jit(whole)(params, batch, None), rtol=1e-5)
    job = {"workload": "gpt2-small", "length": 256, "method": "lora-factored", "chunk": 32}
    assert bench_train.row_key(job) == ("gpt2-small", 256, "lora-factored, LM loss in chunks of 32")


@pytest.mark.slow  # four processes, each compiling a training step; CI runs it with the slow tests
def test_bench_train_smoke(tmp_path):
    out = load("bench_train").main(["--smoke", "--results-dir", str(tmp_path), "--name", "train_named"])
    by_method = {r["method"]: r for r in out["results"] if "remat" not in r and "dropout" not in r}
    assert set(by_method) == {"full", "lora-combine", "lora-factored"}
    assert sorted(r["method"] for r in out["results"] if r.get("dropout") is False) == ["full", "lora-factored"]
    # Adapters and their moments are a small fraction of full fine-tuning's.
    assert by_method["lora-factored"]["optimizer_bytes"] < 0.1 * by_method["full"]["optimizer_bytes"]
    assert by_method["lora-factored"]["trainable_bytes"] == by_method["lora-combine"]["trainable_bytes"]
    low_memory = [r for r in out["results"] if r.get("remat") == "nothing_saveable"]
    assert len(low_memory) == 1 and low_memory[0]["xla_temp_bytes"] < by_method["lora-factored"]["xla_temp_bytes"]
    save_dots = [r for r in out["results"] if r.get("remat") == "dots_saveable"]
    assert len(save_dots) == 1 and save_dots[0]["scheduler"] == "memory"
    # Rematerialization recomputes the same values: the same loss after the same steps.
    for row in low_memory + save_dots:
        np.testing.assert_allclose(row["loss"], by_method["lora-factored"]["loss"], rtol=1e-5)
    assert all(r["step_ms"] > 0 and np.isfinite(r["loss"]) for r in out["results"])
    assert "XLA flags chosen" in (tmp_path / "train_named.md").read_text()
    assert not (tmp_path / "bench_train_smoke.md").exists()


@pytest.mark.slow  # a traced training step; CI runs it with the slow tests
def test_profile_step_smoke(tmp_path):
    profile = load("profile_step")
    out = profile.main(["--smoke", "--results-dir", str(tmp_path)])
    # The trace saw the step's ops, and most of their time is attributed to a named part of the model.
    assert out["op_ms"] > 0 and out["by_kind"]
    named = sum(ms for part, ms in out["by_part"].items() if part != "other")
    assert named > 0.5 * out["op_ms"]
    assert {"MLP", "attention projections", "attention core"} <= set(out["by_part"])
    text = (tmp_path / "profile_minilm_lora-factored_current_smoke.md").read_text()
    assert "By model part" in text and "By XLA op kind" in text


def test_profile_parts_and_kinds():
    profile = load("profile_step")
    assert profile.kind_of("copy_bitcast_fusion.12") == "copy_bitcast_fusion"
    assert profile.kind_of("ynn_fusion") == "ynn_fusion"
    name = "jit(advance)/transpose(jvp(BertForSequenceClassification))/bert/encoder/layer_0/attention/query/dot_general"
    assert profile.part_of(name) == "attention projections"
    assert profile.part_of("jit(advance)/jvp()/bert/encoder/layer_0/attention_norm/mul") == "norms"
    assert profile.part_of("jit(advance)/optimizer/add") == "optimizer"
    assert profile.part_of("jit(advance)/bert/encoder/layer_3/attention/Dropout_0/mul") == "attention core"


@pytest.mark.slow  # five compiled training steps; CI runs it with the slow tests
def test_bench_dropout_smoke(tmp_path):
    out = load("bench_dropout").main(["--smoke", "--results-dir", str(tmp_path)])
    losses = out["losses"]
    # The unrolled keys draw JAX's Threefry masks: the same loss to the last bit; other kinds draw other masks.
    assert losses["threefry unrolled"] == losses["threefry"]
    assert losses["rbg"] != losses["threefry"] and losses["no dropout"] != losses["threefry"]
    assert all(len(t) == 2 and min(t) > 0 for t in out["times"].values())
    assert "threefry unrolled" in (tmp_path / "bench_dropout_smoke.md").read_text()


@pytest.mark.slow  # tokenizes all of SST-2's training set; CI runs it with the slow tests
def test_bench_batching_smoke(tmp_path, glue_dir):
    table = load("bench_batching").main(["--smoke", "--results-dir", str(tmp_path)])
    fixed, buckets, grouped = (table[way] for way in ("fixed 64", "buckets", "buckets, grouped"))
    assert fixed["padded"] == 64 and fixed["shapes"] == 1
    # Buckets pad less than one fixed length, and grouping by length less again.
    assert grouped["padded"] < buckets["padded"] < fixed["padded"]
    assert all(0 < row["real"] <= row["padded"] and row["examples_per_s"] > 0 for row in table.values())
    assert "buckets, grouped" in (tmp_path / "bench_batching_smoke.md").read_text()


@pytest.mark.slow  # two processes, six compiled training steps each
def test_bench_remat_smoke(tmp_path):
    found = load("bench_remat").main(["--smoke", "--results-dir", str(tmp_path)])["found"]
    # Under the memory scheduler a policy that saves nothing leaves fewer temporaries than no remat does.
    for method in ("lora-factored", "full"):
        assert (
            found["memory", method, "nothing_saveable"]["temp_bytes"] < found["concurrency", method, None]["temp_bytes"]
        )
    # Recomputation changes where values come from, not what they are.
    for (_, method, _), row in found.items():
        assert row["loss"] == pytest.approx(found["concurrency", method, None]["loss"], abs=1e-6)
    assert "memory" in (tmp_path / "bench_remat_smoke.md").read_text()


@pytest.mark.slow  # compiles each latency configuration; CI runs it with the slow tests
def test_bench_latency_smoke(tmp_path):
    bench = load("bench_latency")
    out = bench.main(["--smoke", "--results-dir", str(tmp_path)])
    assert set(out["table"]) == {(1, 16), (4, 32)}
    assert all(v > 0 for row in out["table"].values() for v in row.values())
    assert "LoRA merged" in (tmp_path / "bench_latency_smoke.md").read_text()


def test_houlsby_adapters_change_the_output():
    import jax
    import jax.numpy as jnp

    from lora_jax import models

    bench = load("bench_latency")
    model = models.GPT2LMHeadModel(models.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    ids = jnp.arange(8)[None] % 64
    params = model.init(jax.random.key(0), ids)["params"]
    adapters = bench.houlsby_params(jax.random.key(1), params, 32, 4)
    assert len(adapters) == 4  # attention output and MLP output of two layers

    def apply_fn(p, x):
        return model.apply({"params": p}, x).logits

    base = apply_fn(params, ids)
    adapted = bench.with_houlsby(apply_fn, adapters)(params, ids)
    assert not np.allclose(base, adapted) and np.allclose(base, adapted, atol=1e-1)


@pytest.mark.slow  # runs the tutorial notebook end to end; CI runs it with the slow tests
def test_quickstart_notebook_runs(monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("QUICKSTART_STEPS", "3")
    path = ROOT / "notebooks" / "quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # from the repository root, where the notebook imports experiments.assets
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "trainable: 74,498" in text
    assert "max |merged - unmerged| =" in text and "KiB" in text


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_peak_rss_of_a_worker_is_its_own_not_its_parents():
    grown = np.ones(2**30 // 8)  # 1 GiB resident in this process, the parent
    code = "from experiments import report; print(report.peak_rss_mib())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert float(out.stdout) < 700 < load("report").peak_rss_mib()
    del grown


@pytest.mark.slow  # compiles eight training steps, four in processes of their own; CI runs it with the slow tests
def test_bench_memory_smoke(tmp_path):
    out = load("bench_memory").main(["--smoke", "--results-dir", str(tmp_path)])
    assert out["formula"] == out["tree"]  # 2 n d r 4 bytes plus the head, exactly
    assert out["tree"] < out["file"] < out["tree"] + 8192
    for method in ("full", "lora"):  # two moments per trainable scalar, plus step counters
        assert 0 <= out[method]["optimizer_bytes"] - 2 * out[method]["trainable_bytes"] <= 64
    assert out["lora"]["temp_bytes"] < out["full"]["temp_bytes"]
    for method in ("full", "lora"):  # the chunked LM loss keeps less than the whole logits
        assert out["decoder"][(method, 8)] < out["decoder"][(method, None)]
    assert all(out["heap"][(method, True)] > 0 for method in ("full", "lora-factored"))
    for name in ("minilm", "gpt2-small"):
        nf4, plain = out["qlora"][(name, "nf4", False, False)], out["qlora"][(name, None, False, False)]
        assert nf4["base_bytes"] < plain["base_bytes"] and nf4["argument_bytes"] < plain["argument_bytes"]


def test_run_cache_key_follows_the_default_learning_rate(tmp_path):
    finetune, sweep = load("finetune"), load("sweep")
    implicit = finetune.RunConfig(method="lora")
    explicit = finetune.RunConfig(method="lora", learning_rate=finetune.LEARNING_RATES["lora"])
    assert implicit.with_defaults() == explicit
    assert sweep.run_dir(implicit, tmp_path) == sweep.run_dir(explicit, tmp_path)
    other = finetune.RunConfig(method="lora", learning_rate=0.5 * finetune.LEARNING_RATES["lora"])
    assert sweep.run_dir(other, tmp_path) != sweep.run_dir(implicit, tmp_path)


def test_rank_sweep_seeds_the_rank_one_comparison():
    rank_sweep = load("rank_sweep")
    seeds: dict[tuple[str, int], list[int]] = {}
    for config in rank_sweep.grid(smoke=False):
        seeds.setdefault((config.targets, config.rank), []).append(config.seed)
    assert seeds[("qv", 1)] == seeds[("qv", 8)] == [0, 1, 2]
    assert all(s == [0] for cell, s in seeds.items() if cell not in rank_sweep.SEEDED_CELLS)
    assert len(seeds) == len(rank_sweep.RANKS) * len(rank_sweep.TARGETS)


def test_results_files_name_the_environment_once(tmp_path):
    report = load("report")
    path = report.write_markdown(tmp_path / "r.md", "Title", "a table")
    assert path.read_text().count(report.environment()) == 1
    with pytest.raises(ValueError, match="repeats the environment line"):
        report.write_markdown(tmp_path / "s.md", "Title", f"{report.environment()}\n\na table")
    assert not (tmp_path / "s.md").exists()


def test_seed_groups_and_their_summary():
    sweep, report = load("sweep"), load("report")
    runs = [{"config": {"targets": t, "rank": r, "seed": s}} for t, r, s in [("q", 1, 0), ("qv", 1, 0), ("q", 1, 1)]]
    groups = sweep.group(runs, "targets", "rank")
    assert list(groups) == [("q", 1), ("qv", 1)]
    assert [r["config"]["seed"] for r in groups[("q", 1)]] == [0, 1]
    assert report.mean_std([80.0, 82.0, 84.0]) == f"82.0 ± {np.std([80.0, 82.0, 84.0]):.1f} (n=3)"


@pytest.mark.slow  # compiles serving for every batch shape; CI runs it with the slow tests
def test_bench_serving_smoke(tmp_path, capsys):
    bench = load("bench_serving")
    out = bench.main(["--smoke", "--results-dir", str(tmp_path)])
    cls, gen = out["classifier"], out["generation"]
    # One trace per set capacity, none more across replace / remove / add within a capacity.
    assert cls["set_traces_before_swaps"] == len(cls["rows"]) == 2
    assert cls["traces"]["set"] == cls["set_traces_before_swaps"]
    assert gen["model_traces_after_swaps"] == gen["model_traces_before_swaps"] > 0
    for result in (cls, gen):
        assert all(r["base_per_s"] > 0 and r["set_per_s"] > 0 and r["merge_per_s"] > 0 for r in result["rows"])
        assert result["rows"][0]["set_bytes"] < result["rows"][1]["set_bytes"]
    assert {row[0] for row in out["branch"][1:]} == {"gather + einsum", "one-hot einsum over N", "ragged_dot, sorted"}
    text = (tmp_path / "bench_serving_smoke.md").read_text()
    assert "## Classifier" in text and "## Generation" in text and "0 recompilations across swaps" in text
    assert (tmp_path / "bench_serving_smoke.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as exit_:  # results are replaced only with --overwrite, before any work
        bench.main(["--smoke", "--results-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "bench_serving_smoke.md exists; pass --overwrite" in capsys.readouterr().err


def _variant_run(method, seed, score, **measured):
    run = {"method": method, "seed": seed, "score": score, "diverged": None, "step_ms": 100.0, "losses": [0.7, 0.4]}
    return {**run, **measured}


def test_variants_compare_by_seed_and_state_each_goal():
    variants = load("variants")
    memory = {"argument_bytes": 1000, "temp_bytes": 10}
    kernels = {"lora": 400, "int8": 101, "nf4": 56}  # nf4 misses 0.135 x by 0.005
    runs = []
    for seed, (lora, nf4) in enumerate([(0.80, 0.79), (0.84, 0.835)]):
        runs.append(_variant_run("lora", seed, lora))
        runs.append(_variant_run("nf4", seed, nf4))
        runs.append(_variant_run("int8", seed, lora))
    for run in runs:
        if run["seed"] == 0:
            saving = kernels["lora"] - kernels[run["method"]]
            run.update(
                trainable=10,
                base_bytes=1000 - saving,
                kernel_bytes=kernels[run["method"]],
                memory={**memory, "argument_bytes": memory["argument_bytes"] - saving + (1 if saving else 0)},
                gaps={"merged": 1e-7},
            )
    runs.append({"method": "dora", "seed": 0, "score": None, "diverged": "the training loss of step 3 is nan"})
    runs.insert(0, _variant_run("lora_plus", 1, 0.5))
    methods = variants.summarize(runs)
    assert list(methods) == ["lora", "int8", "nf4", "dora", "lora_plus"]  # METHODS order
    np.testing.assert_allclose(variants.paired(methods, "nf4"), [-1.0, -0.5])
    assert methods["dora"]["diverged"] == [0] and not methods["dora"]["scores"]
    text = "\n".join(variants.goals(methods))
    assert "NF4 base): base bytes <= 0.135 x fp32 (the linear kernels): **missed**: 0.1400 x, 0.0050 over" in text
    assert "int8 base: base bytes <= 0.26 x fp32 (the linear kernels): **met**: 0.2525 x" in text
    assert "QLoRA (NF4 base) within 0.5 points of LoRA fp32: **missed**: -0.75 points paired" in text
    assert "LoRA, int8 base within 0.5 points of LoRA fp32: **met**: +0.00 points" in text
    assert "by at least the base's byte saving: **missed**: 343 bytes fewer for a 344-byte saving (-1)" in text
    assert "LoRA+ (ratio 16) against LoRA fp32 (no goal; as measured): 50.0 against 82.0, -34.00 ± 0.00" in text
    table = variants.table(methods)
    assert "diverged at seed 0" in table and "-0.75 ± 0.25 (n=2)" in table


def test_variants_refuses_to_replace_its_results_unasked(tmp_path, capsys):
    (tmp_path / "variants_smoke.png").write_bytes(b"a user's file")
    with pytest.raises(SystemExit) as exit_:
        load("variants").main(["--smoke", "--results-dir", str(tmp_path), "--cache", str(tmp_path / "cache")])
    assert exit_.value.code == 2
    assert f"{tmp_path / 'variants_smoke.png'} exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "variants_smoke.png").read_bytes() == b"a user's file"
    assert not (tmp_path / "cache").exists()  # refused before any work


@pytest.mark.slow  # minutes on two shared cores: six methods, each compiling MiniLM's step
def test_variants_smoke(tmp_path):
    variants, cache, results = load("variants"), tmp_path / "cache", tmp_path / "results"
    tracked = _tracked_results()
    out = variants.main(["--smoke", "--cache", str(cache), "--results-dir", str(results)])
    methods = out["methods"]
    assert list(methods) == list(variants.METHODS)
    measured = {m: e["measured"] for m, e in methods.items()}
    assert all(run is not None and 0.0 <= run["score"] <= 1.0 for run in measured.values())
    fp32 = measured["lora"]
    # The quantized bases: the goals' ratios of the linear kernels, and the step's arguments shrink with them.
    assert measured["nf4"]["kernel_bytes"] <= variants.NF4_GOAL * fp32["kernel_bytes"]
    assert measured["int8"]["kernel_bytes"] <= variants.INT8_GOAL * fp32["kernel_bytes"]
    saving = fp32["base_bytes"] - measured["nf4"]["base_bytes"]
    assert fp32["memory"]["argument_bytes"] - measured["nf4"]["memory"]["argument_bytes"] >= saving > 0
    # PiSSA's residual and DoRA's rules keep the fp32 base's bytes; DoRA adds a magnitude per output column.
    assert measured["pissa"]["base_bytes"] == measured["dora"]["base_bytes"] == fp32["base_bytes"]
    assert measured["dora"]["trainable"] == fp32["trainable"] + 6 * 2 * 384
    for method in ("dora", "pissa"):
        assert measured[method]["gaps"]["merged"] <= variants.MERGE_GOAL
    assert measured["pissa"]["gaps"]["pissa_to_lora"] <= variants.MERGE_GOAL
    text = (results / "variants_smoke.md").read_text()
    assert "## Goals of issue 16" in text and "jax" in text and text.count("|") > 50
    assert (results / "variants_smoke.png").stat().st_size > 1000
    assert _tracked_results() == tracked
    # Tabulating again from the cache trains nothing and needs --overwrite to replace the table.
    again = variants.main(
        ["--smoke", "--cache", str(cache), "--results-dir", str(results), "--cached-only", "--overwrite"]
    )
    assert again["text"] == out["text"]


def test_glue_budget_optimizer_is_adamw_on_the_loop_schedule():
    import jax
    import jax.numpy as jnp
    import optax

    from lora_jax import training

    budget = load("glue_budget")
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    grads = [
        jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(14)
    ]
    for steps, lr in [(10, 3e-3), (40, 1e-4)]:
        reference = optax.adamw(
            training.learning_rate_schedule(training.TrainConfig(steps=steps, learning_rate=lr)), weight_decay=0.01
        )
        # One jitted update, built with rate 1 and length 1, runs states made for any rate and length.
        ours = budget.optimizer(1)
        update = jax.jit(ours.update)
        p_ref: Any = params
        p_ours: Any = params
        s_ref, s_ours = reference.init(params), budget.optimizer(steps, lr).init(params)
        for g in grads:  # past the end of the schedule too, where the rate is 0
            u_ref, s_ref = reference.update(g, s_ref, p_ref)
            p_ref = optax.apply_updates(p_ref, u_ref)
            u_ours, s_ours = update(g, s_ours, p_ours)
            p_ours = optax.apply_updates(p_ours, u_ours)
            for key in params:
                np.testing.assert_allclose(p_ours[key], p_ref[key], rtol=1e-6, atol=1e-7)
        assert not np.allclose(p_ours["w"], params["w"])
    assert update._cache_size() == 1  # pyright: ignore[reportAttributeAccessIssue]


def test_glue_budget_heldout_slice_is_disjoint_and_fixed():
    from lora_jax import data

    budget = load("glue_budget")
    lengths = np.random.default_rng(1).integers(3, 20, size=100)
    ids = tuple(np.full(n, i, dtype=np.int32) for i, n in enumerate(lengths))  # each row names its example
    encoded = data.Encoded(ids, tuple(np.zeros_like(x) for x in ids), np.arange(100) % 2, pad_id=0)
    train, heldout = budget.split_heldout(encoded, 20)
    names = lambda part: [int(x[0]) for x in part.input_ids]  # noqa: E731
    assert len(heldout) == 20 and len(train) == 80
    assert set(names(train)).isdisjoint(names(heldout)) and set(names(train)) | set(names(heldout)) == set(range(100))
    assert list(heldout.lengths) == sorted(heldout.lengths)  # sorted for evaluation
    assert [encoded.labels[i] for i in names(heldout)] == list(heldout.labels)
    again, heldout_again = budget.split_heldout(encoded, 20, train_limit=30)
    assert names(heldout_again) == names(heldout)  # the same slice whatever the training limit
    assert names(again) == names(train)[:30]
    with pytest.raises(ValueError, match="heldout=100"):
        budget.split_heldout(encoded, 100)


def test_glue_budget_patience_and_choice():
    budget = load("glue_budget")
    assert not budget.stopped([50, 52, 51], 2)
    assert budget.stopped([50, 52, 51, 51], 2)
    assert budget.stopped([50, 52, 52, 52], 2)  # an equal score is no improvement
    assert not budget.stopped([50, 52, 52, 53], 2)

    def run(lr, heldout, diverged=False):
        curve = [{"step": 10, "heldout": heldout[0], "dev": 0.0}, {"step": 20, "heldout": heldout[1], "dev": 0.0}]
        return {"learning_rate": lr, "curve": curve, "diverged": diverged}

    runs = [run(1e-4, (60, 70)), run(3e-4, (65, 68)), run(1e-3, (90, 99), diverged=True)]
    assert budget.choose(runs, 20)["learning_rate"] == 1e-4
    assert budget.choose(runs, 10)["learning_rate"] == 3e-4  # at an earlier step, by what it scored there
    assert budget.choose(runs, 15)["learning_rate"] == 3e-4  # its last evaluation up to the step
    assert budget.choose([run(3e-4, (60, 70)), run(1e-4, (60, 70))], 20)["learning_rate"] == 1e-4  # tie: lower


def test_glue_budget_goals_say_met_or_missed_by_how_much():
    budget = load("glue_budget")

    def task(scores):
        return {"runs": {m: [{"curve": [{"dev": s}]} for s in ss] for m, ss in scores.items()}}

    results = {
        "rte": task({"full FT": [61.0, 63.0], "LoRA qv r=8": [60.5, 61.5]}),
        "cola": task({"full FT": [40.0], "LoRA qv r=8": [37.5]}),
        "sst2": task({"full FT": [90.0, 90.0], "LoRA qv r=8": [89.4, 89.6], "LoRA qv r=1": [87.9, 88.1]}),
    }
    lines = budget.goals(results)
    text = "\n".join(lines)
    assert len(lines) == 5
    assert "rte: LoRA qv r=8 61.0 vs full FT 62.0: difference -1.0 points (goal ≥ -1): **met** by 0.0 (n=2/2" in text
    assert "cola: LoRA qv r=8 37.5 vs full FT 40.0: difference -2.5 MCC points (goal ≥ -2): **missed** by 0.5" in text
    assert "sst2: LoRA qv r=1 88.0 vs LoRA qv r=8 89.5: difference -1.5 points (goal ≥ -1): **missed** by 0.5" in text
    assert "one seed" in lines[2] and "seed std up to 1.0" in lines[1]
    # rte's margin (0.0) is inside the difference's standard error (1.1); sst2's margins (0.5) are far outside it.
    assert "standard error of the difference 1.1, more than the margin: not resolved" in lines[1]
    assert "standard error of the difference 0.1)" in lines[0] and "not resolved" not in lines[0] + lines[3]
    assert "rte: full FT 62.0 (goal ≥ 60): **met** by 2.0 (n=2)" in text


def test_glue_budget_smoke(tmp_path):
    budget = load("glue_budget")
    cache, results_dir = tmp_path / "cache", tmp_path / "results"
    args = ["--smoke", "--cache", str(cache), "--results-dir", str(results_dir)]
    result = budget.main(args)["rte"]
    full, lora = budget.SMOKE.methods
    steps = result["steps"]
    # Full FT chose its rate on held-out at the selection step; the chosen run went on, the other stopped there.
    grid, chosen, select = result["search"][full.name], result["chosen"][full.name], result["select"][full.name]
    assert [r["learning_rate"] for r in grid] == list(full.learning_rates)
    assert select == budget.SMOKE.select_steps and chosen == budget.choose(grid, select)
    assert [r["steps"] for r in grid if r["learning_rate"] != chosen["learning_rate"]] == [select]
    assert [p["step"] for p in chosen["curve"]][: select // 2] == list(range(2, select + 1, 2))
    assert chosen["steps"] == steps and budget.SMOKE.select_steps <= steps <= budget.SMOKE.max_steps
    assert chosen["end"] == "patience" or steps == budget.SMOKE.max_steps
    # LoRA trained every rate to the budget and chose there, by held-out.
    grid, chosen = result["search"][lora.name], result["chosen"][lora.name]
    assert [r["learning_rate"] for r in grid] == list(lora.learning_rates)
    assert result["select"][lora.name] == steps and all(r["steps"] == steps and r["end"] is None for r in grid)
    assert chosen == budget.choose(grid, steps)
    assert result["chosen"][lora.name]["trainable"] < result["chosen"][full.name]["trainable"]
    text = (results_dir / "glue_budget_smoke.md").read_text()
    assert "## The issue's goals" in text and "rte: full FT" in text and "held-out" in text
    assert (results_dir / "glue_budget_smoke.png").stat().st_size > 1000
    # A second call reads the cache and trains nothing; so does --cached-only, which leaves out what is missing.
    assert budget.main([*args, "--cached-only", "--overwrite"])["rte"] == result
    assert (
        budget.main(
            ["--cached-only", "--cache", str(tmp_path / "empty"), "--results-dir", str(results_dir), "--tasks", "rte"]
        )
        == {}
    )


def test_glue_budget_longer_reruns_the_chosen_rate_on_a_stretched_schedule(tmp_path, capsys):
    budget = load("glue_budget")
    args = ["--smoke", "--cache", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")]
    with pytest.raises(SystemExit):
        budget.main([*args, "--longer", "1"])
    assert "--longer 1: give 2 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        budget.main([*args, "--longer", "2", "--longer-methods", "LoRA qv r=1"])  # not a method of this budget
    assert "--longer-methods ['LoRA qv r=1']: give --longer K with one or more of ['LoRA qv r=8']" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        budget.main([*args, "--longer-methods", "LoRA qv r=8"])  # without --longer
    assert "give --longer K" in capsys.readouterr().err
    result = budget.main([*args, "--longer", "2", "--longer-methods", "LoRA qv r=8"])["rte"]
    full, lora = budget.SMOKE.methods
    (path,) = (tmp_path / "cache").glob("rte-*.longer2.json")
    runs = json.loads(path.read_text())["runs"]
    assert list(runs) == [lora.name]  # full fine-tuning stays at its budget
    (run,) = runs[lora.name]
    assert run["learning_rate"] == result["chosen"][lora.name]["learning_rate"]
    assert run["steps"] == 2 * result["steps"]
    every = 2 * budget.SMOKE.eval_every  # evaluations stretch with the schedule
    assert [p["step"] for p in run["curve"]] == list(range(every, run["steps"] + 1, every))
    # Stretched, the schedule reaches the budget's step at a higher rate, so the run differs from the budget's own.
    assert run["curve"][-1] != result["runs"][lora.name][0]["curve"][-1]
    text = (tmp_path / "results" / "glue_budget_smoke.md").read_text()
    assert "## Longer: 2x the budget" in text and f"| rte | {lora.name} |" in text and "(one seed)" in text
    # Read back from the cache, trained no further.
    again = budget.main([*args, "--longer", "2", "--cached-only", "--overwrite"])
    assert again["rte"] == result and json.loads(path.read_text())["runs"] == runs
    path.write_text('{"factor": 2}')  # damaged: refused naming the file, never retrained over
    with pytest.raises(ValueError, match=f"{path}: not a cached result"):
        budget.main([*args, "--longer", "2", "--overwrite"])


def test_glue_budget_difference_error_against_numpy():
    budget = load("glue_budget")
    a, b = np.array([52.0, 55.0, 49.0]), np.array([53.0, 54.5])
    expected = np.hypot(np.std(a, ddof=1) / np.sqrt(3), np.std(b, ddof=1) / np.sqrt(2))
    assert budget.difference_error(a, b) == pytest.approx(expected)
    assert budget.difference_error(a, b[:1]) is None


@pytest.mark.slow  # the smoke protocol three times over; CI runs it with the slow tests
def test_glue_budget_more_seeds_extend_the_cached_result(tmp_path, monkeypatch):
    budget = load("glue_budget")
    args = ["--smoke", "--results-dir", str(tmp_path / "results"), "--overwrite"]  # each call rewrites the table
    one = budget.main([*args, "--cache", str(tmp_path / "a")])["rte"]
    searches = []
    monkeypatch.setattr(budget, "search", lambda *a, **k: searches.append(a) or pytest.fail("searched again"))
    extended = budget.main([*args, "--cache", str(tmp_path / "a"), "--seeds", "2"])["rte"]
    assert searches == []
    monkeypatch.undo()
    fresh = budget.main([*args, "--cache", str(tmp_path / "b"), "--seeds", "2"])["rte"]
    for method in budget.SMOKE.methods:
        runs = extended["runs"][method.name]
        assert [r["seed"] for r in runs] == [0, 1] and runs[0] == one["runs"][method.name][0]
        # The added seed trains exactly as it does in a run of both seeds at once.
        assert [p["dev"] for p in runs[1]["curve"]] == [p["dev"] for p in fresh["runs"][method.name][1]["curve"]]
        assert [p["loss"] for p in runs[1]["curve"]] == [p["loss"] for p in fresh["runs"][method.name][1]["curve"]]
    assert extended["search"] == one["search"] and extended["steps"] == one["steps"]


def test_glue_budget_refuses_a_damaged_cache_file_and_zero_seeds(tmp_path):
    budget = load("glue_budget")
    cache = tmp_path / "cache"
    path = budget.cache_path(cache, budget.SMOKE, 1)
    path.parent.mkdir(parents=True)
    for damaged in ('{"task": "rte"', '{"task": "rte"}', "[1, 2]"):
        path.write_text(damaged)
        with pytest.raises(ValueError, match=f"{path}: not a cached result.*delete it"):
            budget.main(["--smoke", "--cache", str(cache), "--results-dir", str(tmp_path / "results")])
        assert path.read_text() == damaged  # refused, not replaced
    with pytest.raises(SystemExit):
        budget.main(["--smoke", "--seeds", "0", "--cache", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()


def _orthonormal(rng, n, r):
    return np.linalg.qr(rng.normal(size=(n, r)))[0]


def test_subspace_amplification_against_numpy():
    subspace = load("subspace")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(64, 48))
    p, q = _orthonormal(rng, 64, 4), _orthonormal(rng, 48, 4)
    delta = 0.5 * p @ np.diag([4.0, 3.0, 2.0, 1.0]) @ q.T  # planted: rank 4, known directions
    out = subspace.amplification(w0, delta, 4, np.random.default_rng(1))
    # U, V span p, q, and ||U^T W0 V||_F does not depend on the basis chosen within them.
    np.testing.assert_allclose(out["delta_dirs"], np.linalg.norm(p.T @ w0 @ q), rtol=1e-10)
    np.testing.assert_allclose(out["delta_norm"], 0.5 * np.sqrt(30.0), rtol=1e-12)
    np.testing.assert_allclose(out["w0_norm"], np.sqrt((w0**2).sum()), rtol=1e-12)
    s = np.linalg.svd(w0, compute_uv=False)
    np.testing.assert_allclose(out["w0_dirs"], np.sqrt((s[:4] ** 2).sum()), rtol=1e-10)
    np.testing.assert_allclose(out["factor"], out["delta_norm"] / out["delta_dirs"], rtol=1e-12)
    # Random r-dim subspaces: E ||Q1^T W0 Q2||_F^2 = (r/in)(r/out) ||W0||_F^2.
    expected = np.sqrt(4 / 64 * 4 / 48) * out["w0_norm"]
    assert 0.7 * expected < out["random_dirs"] < 1.3 * expected
    # An update along W0's own top directions finds all of them, and amplifies W0 there by s_dW / s_W0.
    u, sv, vh = np.linalg.svd(w0)
    along = subspace.amplification(w0, 0.1 * u[:, :4] @ vh[:4], 4, np.random.default_rng(1))
    np.testing.assert_allclose(along["delta_dirs"], along["w0_dirs"], rtol=1e-10)
    np.testing.assert_allclose(along["factor"], 0.2 / np.sqrt((sv[:4] ** 2).sum()), rtol=1e-10)
    # Orthogonal to W0 (W0 zero on a subspace, dW in it): nothing of W0 in dW's directions.
    w_masked = w0.copy()
    w_masked[:4] = 0.0
    w_masked[:, :4] = 0.0
    basis_in, basis_out = np.eye(64)[:, :4], np.eye(48)[:, :4]
    hidden = subspace.amplification(w_masked, basis_in @ basis_out.T, 4, np.random.default_rng(1))
    assert hidden["delta_dirs"] < 1e-12 and hidden["factor"] > 1e10  # inf when exactly 0


def test_subspace_energy_against_numpy():
    subspace = load("subspace")
    rng = np.random.default_rng(2)
    p, q = _orthonormal(rng, 30, 5), _orthonormal(rng, 20, 5)
    planted = p @ np.diag([5.0, 4.0, 3.0, 2.0, 1.0]) @ q.T
    shares = subspace.energy(planted, (1, 4, 5, 64))
    np.testing.assert_allclose(shares[1], 25 / 55, rtol=1e-10)
    np.testing.assert_allclose(shares[4], 54 / 55, rtol=1e-10)
    np.testing.assert_allclose(shares[5], 1.0, rtol=1e-12)
    np.testing.assert_allclose(shares[64], 1.0, rtol=1e-12)  # k past the rank: everything
    noise = rng.normal(size=(30, 20))
    s = np.linalg.svd(noise, compute_uv=False)
    np.testing.assert_allclose(subspace.energy(noise, (3,))[3], (s[:3] ** 2).sum() / (s**2).sum(), rtol=1e-10)


def test_subspace_deltas_read_lora_and_full_fine_tuning_files(tmp_path):
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from lora_jax import models

    subspace = load("subspace")
    config = models.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = models.BertForSequenceClassification(config, pooling="mean")
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids, jnp.ones_like(ids), jnp.zeros_like(ids))["params"]
    path = subspace.kernel_path(1, "value")
    keys = tuple(path.split("/"))
    rng = np.random.default_rng(3)

    spec = models.method_spec(model, "lora", "qv", rank=2, alpha=6.0)
    lora = lj.init(jax.random.key(1), params, spec)
    b = rng.normal(size=np.shape(lora["bert"]["encoder"]["layer_1"]["attention"]["value"]["kernel"]["b"]))
    lora["bert"]["encoder"]["layer_1"]["attention"]["value"]["kernel"]["b"] = jnp.asarray(b, jnp.float32)
    (tmp_path / "lora").mkdir()
    lj.save_adapter(tmp_path / "lora" / "adapter.safetensors", params, lora, spec)
    a = np.asarray(lora["bert"]["encoder"]["layer_1"]["attention"]["value"]["kernel"]["a"], np.float64)
    delta = subspace.deltas({"dir": str(tmp_path / "lora")}, params, [path])[path]
    assert delta.shape == (16, 16)
    np.testing.assert_allclose(delta, 3.0 * a @ b.reshape(2, -1), rtol=1e-4, atol=1e-6)  # s = alpha / r = 3

    full_spec = models.method_spec(model, "full")
    trained = jax.tree_util.tree_map(lambda x: x + 0.01 * jnp.ones_like(x), params)
    (tmp_path / "full").mkdir()
    lj.save_adapter(tmp_path / "full" / "adapter.safetensors", params, trained, full_spec)
    full = subspace.deltas({"dir": str(tmp_path / "full")}, params, [path])[path]
    w_ft = np.asarray(trained["bert"]["encoder"]["layer_1"]["attention"]["value"]["kernel"], np.float64)
    w0 = np.asarray(params["bert"]["encoder"]["layer_1"]["attention"]["value"]["kernel"], np.float64)
    np.testing.assert_allclose(full, (w_ft - w0).reshape(16, 16), atol=1e-7)
    assert keys[-1] == "kernel"


def test_subspace_truncated_is_the_best_rank_r_part():
    subspace = load("subspace")
    rng = np.random.default_rng(4)
    m = rng.normal(size=(12, 9))
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    cut = subspace.truncated(m, 3)
    np.testing.assert_allclose(cut, u[:, :3] @ np.diag(s[:3]) @ vh[:3], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(m - cut), np.sqrt((s[3:] ** 2).sum()), rtol=1e-10)  # Eckart-Young
