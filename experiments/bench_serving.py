"""Serving many adapters: one batch with an adapter per row vs the base alone vs merging per request.

    python -m experiments.bench_serving            # MiniLM classifier (batch 32), GPT-2-small-shaped decoder (batch 16)
    python -m experiments.bench_serving --smoke    # tiny models, seconds

For N = 1, 4, 16, 64 adapters in a set (LoRA on query and value, ranks 8 and 4 alternating, padded to 8; the
classifier's adapters also train their own head), a batch whose row i asks for adapter i mod N (so
min(N, batch) distinct adapters in it) runs three ways, round-robin, median of the repeats:

- base: the base model alone (no adapters), the ceiling;
- adapter set: ``lora_jax.serve.per_example`` (classifier) and ``models.generate(lora_set=, adapter_ids=)``
  (KV-cache decoding): every row with its own adapter in one batch, ``x W0 + s_i (x A_i) B_i``;
- merge per request: for each distinct adapter in the batch, merge it into the base (``lora_jax.merge``), run
  its rows, switch to the next.

Also measured: the low-rank branch alone in three forms (gather each row's factors then one batched einsum;
``jax.lax.ragged_dot`` on rows sorted by adapter; a one-hot einsum over all N adapters), traces (compilations)
counted by a Python counter inside each jitted function, across swaps of the set's adapters, and the set's memory.
Weights are random (throughput does not depend on them); the outputs of the set are checked against each row's
merged model before timing.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import assets, report

COUNTS = (1, 4, 16, 64)
RANKS = (8, 4)  # alternating; the set pads every adapter to the largest


def _tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def random_adapters(model: Any, params: Any, count: int, head: bool, seed: int = 0) -> list[tuple[Any, Any]]:
    """``count`` (lora, spec) pairs on q and v with random nonzero factors, ranks alternating over ``RANKS``."""
    import lora_jax as lj
    from lora_jax import models

    rng = np.random.default_rng(seed)
    out = []
    specs = {r: models.lora_spec(model, "qv", rank=r, alpha=2.0 * r, head=head) for r in RANKS}
    shapes = {r: jax.eval_shape(lambda p, s=s: lj.init(jax.random.key(0), p, s), params) for r, s in specs.items()}
    for i in range(count):
        rank = RANKS[i % len(RANKS)]
        lora = jax.tree_util.tree_map(lambda x: (0.02 * rng.normal(size=x.shape)).astype(np.float32), shapes[rank])
        out.append((lora, specs[rank]))
    return out


def median_seconds(fns: dict[str, Callable[[], Any]], repeats: int, desc: str) -> dict[str, float]:
    """Warm each up (compiling), then time them round-robin ``repeats`` times; return the medians."""
    from tqdm import tqdm

    for fn in tqdm(fns.values(), desc=f"{desc}: compile", leave=False):
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc=f"{desc}: repeats", leave=False):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def merge_per_request(
    run: Callable[[Any, np.ndarray], Any], merged: Callable[[int], Any], adapter_ids: np.ndarray
) -> Callable[[], list]:
    """Return a server that, for each distinct adapter of the batch, merges it, runs its rows, and switches."""
    groups = [(int(k), np.flatnonzero(adapter_ids == k)) for k in np.unique(adapter_ids)]
    return lambda: [run(merged(k), rows) for k, rows in groups]


def branch_strategies(
    batch: int, length: int, width: int, rank: int, repeats: int, counts: tuple[int, ...]
) -> list[list[str]]:
    """Time the low-rank branch ``s_i (x A_i) B_i`` alone, in the three forms, beside the frozen ``x W0``."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, length, width)), jnp.float32)
    w0 = jnp.asarray(rng.normal(size=(width, width)), jnp.float32)
    rows, fns = [], {}
    frozen = jax.jit(lambda x: x @ w0)
    fns["frozen x W0 (for scale)"] = lambda: frozen(x)
    for n in counts:
        a = jnp.asarray(rng.normal(size=(n, width, rank)), jnp.float32)
        b = jnp.asarray(rng.normal(size=(n, rank, width)), jnp.float32)
        ids = jnp.asarray(np.arange(batch) % n, jnp.int32)

        def gather(x, a, b, ids):
            return jnp.einsum("btr,bro->bto", jnp.einsum("btd,bdr->btr", x, a[ids]), b[ids])

        def one_hot(x, a, b, ids, n=n):
            hot = jax.nn.one_hot(ids, n, dtype=x.dtype)  # [B, N]: each row's factors mixed from all N
            a_rows = jnp.einsum("bn,ndr->bdr", hot, a)
            b_rows = jnp.einsum("bn,nro->bro", hot, b)
            return jnp.einsum("btr,bro->bto", jnp.einsum("btd,bdr->btr", x, a_rows), b_rows)

        def ragged(x, a, b, ids, n=n):
            order = jnp.argsort(ids)  # rows sorted by adapter: one segment per adapter
            sizes = (jnp.bincount(ids, length=n) * x.shape[1]).astype(jnp.int32)
            flat = x[order].reshape(-1, x.shape[-1])
            low = jax.lax.ragged_dot(jax.lax.ragged_dot(flat, a, sizes), b, sizes)
            return jnp.zeros_like(x).at[order].set(low.reshape(x.shape))

        forms = {"gather + einsum": gather, "one-hot einsum over N": one_hot, "ragged_dot, sorted": ragged}
        reference = None
        for label, form in forms.items():
            fn = jax.jit(form)
            out = fn(x, a, b, ids)
            if reference is None:
                reference = out
            np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-3)  # the same branch, three ways
            fns[f"{label}, N={n}"] = lambda fn=fn, a=a, b=b, ids=ids: fn(x, a, b, ids)
    seconds = median_seconds(fns, repeats, "low-rank branch")
    frozen = seconds.pop("frozen x W0 (for scale)")
    rows.append(["frozen x W0 (for scale)", "-", f"{1000 * frozen:.2f}", "-"])
    for name, s in seconds.items():
        label, n = name.rsplit(", N=", 1)
        rows.append([label, n, f"{1000 * s:.2f}", f"{s / frozen:.2f}"])
    return rows


def classifier(smoke: bool, repeats: int, counts: tuple[int, ...]) -> dict:
    """Examples/s of the classifier: base, adapter set, merge per request; traces; set bytes."""
    import lora_jax as lj
    from lora_jax import models, serve

    batch, length = (8, 16) if smoke else (32, 64)
    if smoke:
        config = models.BertConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
        model = models.BertForSequenceClassification(config)
        params = model.init(jax.random.key(0), np.ones((1, 8), np.int32))["params"]
    else:
        model, params = models.from_pretrained(
            assets.minilm_path(), architecture="BertForSequenceClassification", num_labels=2, key=jax.random.key(0)
        )
    rng = np.random.default_rng(0)
    inputs = {
        "input_ids": jnp.asarray(rng.integers(1, model.config.vocab_size, (batch, length)), jnp.int32),
        "attention_mask": jnp.ones((batch, length), jnp.int32),
        "token_type_ids": jnp.zeros((batch, length), jnp.int32),
    }
    apply_fn = models.classifier_apply_fn(model)
    traces = {"base": 0, "set": 0, "merged": 0, "merge": 0}

    def logits(p, x):
        return apply_fn(p, x, None)

    def counted(name: str, fn: Callable) -> Callable:
        def inner(*args):
            traces[name] += 1  # runs once per trace (compilation)
            return fn(*args)

        return inner

    base = jax.jit(counted("base", logits))
    merged_forward = jax.jit(counted("merged", logits))
    merge = jax.jit(counted("merge", lj.merge), static_argnums=2)
    per_row = jax.jit(counted("set", serve.per_example(logits)))
    adapters = random_adapters(model, params, max(counts) + 4, head=True)
    results, fns, sets = [], {"base": lambda: base(params, inputs)}, {}
    for n in counts:
        lora_set = serve.adapter_set(params, adapters[:n])
        ids = jnp.asarray(np.arange(batch) % n, jnp.int32)
        sets[n] = (lora_set, ids)
        out = per_row(params, lora_set, ids, inputs)
        for row in sorted({0, batch - 1}):  # rows equal their own merged model
            k = int(ids[row])
            np.testing.assert_allclose(out[row], base(merge(params, *adapters[k]), inputs)[row], atol=1e-4)
        fns[f"set {n}"] = lambda s=lora_set, i=ids: per_row(params, s, i, inputs)

        fns[f"merge {n}"] = merge_per_request(
            lambda merged, rows: merged_forward(merged, jax.tree_util.tree_map(lambda x: x[rows], inputs)),
            lambda k: merge(params, *adapters[k]),
            np.asarray(ids),
        )
    seconds = median_seconds(fns, repeats, "classifier")
    set_traces = traces["set"]
    # Swaps within a set's capacity: replace, remove and add adapters, then run again.
    n = max(counts)
    lora_set, ids = sets[n]
    swap_times = []
    for i in range(4):
        start = time.perf_counter()
        lora_set = serve.replace(params, *adapters[n + i], lora_set, i)
        jax.block_until_ready(lora_set)
        swap_times.append(time.perf_counter() - start)
        jax.block_until_ready(per_row(params, lora_set, ids, inputs))
    lora_set = serve.remove(lora_set, 0)
    lora_set, _ = serve.add(params, *adapters[0], lora_set)
    jax.block_until_ready(per_row(params, lora_set, ids, inputs))
    for n in counts:
        lora_set, _ = sets[n]
        distinct = min(n, batch)
        results.append(
            {
                "adapters": n,
                "distinct": distinct,
                "base_per_s": batch / seconds["base"],
                "set_per_s": batch / seconds[f"set {n}"],
                "merge_per_s": batch / seconds[f"merge {n}"],
                "set_bytes": lora_set.nbytes,
            }
        )
    return {
        "rows": results,
        "traces": dict(traces),
        "set_traces_before_swaps": set_traces,
        "swap_ms": 1000 * float(np.median(swap_times)),
        "batch": batch,
        "length": length,
        "base_bytes": _tree_bytes(params),
        "layers": model.config.num_hidden_layers,
        "width": model.config.hidden_size,
    }


def generation(smoke: bool, repeats: int, counts: tuple[int, ...]) -> dict:
    """Tokens/s of KV-cache greedy decoding: base, adapter set, merge per request; traces; set bytes."""
    import flax.linen as nn

    import lora_jax as lj
    from lora_jax import models, serve

    batch, prompt, new = (4, 8, 4) if smoke else (16, 16, 16)
    config = models.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512) if smoke else models.GPT2Config()
    model = models.GPT2LMHeadModel(config)
    params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (batch, prompt)), jnp.int32)
    merge = jax.jit(lj.merge, static_argnums=2)
    adapters = random_adapters(model, params, max(counts) + 4, head=False, seed=1)
    calls = {"count": 0}

    def count(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, models.CausalLM):
            calls["count"] += 1  # only while generate is traced: the prompt pass and the loop body
        return next_fun(*args, **kwargs)

    fns: dict[str, Callable[[], Any]] = {"base": lambda: models.generate(model, params, ids, new)}
    sets = {}
    for n in counts:
        # At N >= batch every row has its own adapter: merging per request does the same work for all such N.
        lora_set = serve.adapter_set(params, adapters[:n])
        adapter_ids = jnp.asarray(np.arange(batch) % n, jnp.int32)
        sets[n] = (lora_set, adapter_ids)
        fns[f"set {n}"] = lambda s=lora_set, i=adapter_ids: models.generate(
            model, params, ids, new, lora_set=s, adapter_ids=i
        )

        fns.setdefault(
            f"merge {min(n, batch)}",
            merge_per_request(
                lambda merged, rows: models.generate(model, merged, ids[rows], new),
                lambda k: merge(params, *adapters[k]),
                np.asarray(adapter_ids),
            ),
        )
    with nn.intercept_methods(count):
        tokens = fns[f"set {counts[-1]}"]()
        lora_set, adapter_ids = sets[counts[-1]]
        for row in sorted({0, batch - 1}):
            k = int(adapter_ids[row])
            want = models.generate(model, merge(params, *adapters[k]), ids[row : row + 1], new)
            np.testing.assert_array_equal(tokens[row], want[0])
        seconds = median_seconds(fns, repeats, "generation")
        traced = calls["count"]
        n = max(counts)
        lora_set, adapter_ids = sets[n]
        for i in range(4):  # swaps within the set's capacity
            lora_set = serve.replace(params, *adapters[n + i], lora_set, i)
            jax.block_until_ready(models.generate(model, params, ids, new, lora_set=lora_set, adapter_ids=adapter_ids))
        after_swaps = calls["count"]
    results = []
    for n in counts:
        merge_key = f"merge {min(n, batch)}"
        results.append(
            {
                "adapters": n,
                "distinct": min(n, batch),
                "base_per_s": batch * new / seconds["base"],
                "set_per_s": batch * new / seconds[f"set {n}"],
                "merge_per_s": batch * new / seconds[merge_key],
                "set_bytes": sets[n][0].nbytes,
            }
        )
    return {
        "rows": results,
        "model_traces_before_swaps": traced,
        "model_traces_after_swaps": after_swaps,
        "batch": batch,
        "prompt": prompt,
        "new": new,
        "base_bytes": _tree_bytes(params),
        "layers": config.n_layer,
        "width": config.n_embd,
    }


def _table(result: dict, unit: str) -> str:
    headers = [
        "adapters in set",
        "distinct in batch",
        f"base {unit}",
        f"adapter set {unit}",
        "set / base",
        f"merge per request {unit}",
        "set / merge",
        "set MiB",
    ]
    rows = [
        [
            r["adapters"],
            r["distinct"],
            f"{r['base_per_s']:.1f}",
            f"{r['set_per_s']:.1f}",
            f"{r['set_per_s'] / r['base_per_s']:.2f}",
            f"{r['merge_per_s']:.1f}",
            f"{r['set_per_s'] / r['merge_per_s']:.1f}",
            f"{r['set_bytes'] / 2**20:.2f}",
        ]
        for r in result["rows"]
    ]
    return report.markdown_table(headers, rows)


def _plot(path: Path, cls: dict, gen: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, result, unit, title in (
        (axes[0], cls, "examples/s", f"classifier, batch {cls['batch']}"),
        (axes[1], gen, "tokens/s", f"decoder generation, batch {gen['batch']}"),
    ):
        n = [r["adapters"] for r in result["rows"]]
        ax.plot(n, [r["base_per_s"] for r in result["rows"]], "k--", label="base alone")
        ax.plot(n, [r["set_per_s"] for r in result["rows"]], "o-", label="adapter set (one batch)")
        ax.plot(n, [r["merge_per_s"] for r in result["rows"]], "s-", label="merge per request")
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(v) for v in n])
        ax.set_xlabel("adapters in the set (row i uses i mod N)")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    report.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = parser.parse_args(argv)
    name = "bench_serving_smoke" if args.smoke else "bench_serving"
    outputs = report.outputs(parser, args.results_dir, name, (".md", ".png"), args.overwrite)
    print(report.environment())
    counts = (1, 4) if args.smoke else COUNTS
    repeats = args.repeats or (2 if args.smoke else 5)
    gen_repeats = repeats if args.smoke else max(2, repeats - 2)
    load_before, start = os.getloadavg()[0], time.perf_counter()

    cls = classifier(args.smoke, repeats, counts)
    print(_table(cls, "examples/s"))
    gen = generation(args.smoke, gen_repeats, counts)
    print(_table(gen, "tokens/s"))
    branch = branch_strategies(cls["batch"], cls["length"], cls["width"], max(RANKS), repeats, counts)
    load_after, minutes = os.getloadavg()[0], (time.perf_counter() - start) / 60

    cls_traces = cls["traces"]
    text = (
        f"Classifier: {'a tiny BERT' if args.smoke else 'MiniLM (all-MiniLM-L6-v2)'} ({cls['layers']} layers, "
        f"width {cls['width']}), batch {cls['batch']} x length {cls['length']}, logits; each adapter LoRA on query "
        f"and value (ranks {' and '.join(map(str, RANKS))} alternating, padded to {max(RANKS)}) and its own "
        "classifier head. Decoder: "
        f"{'a tiny GPT-2' if args.smoke else 'GPT-2-small-shaped, random weights'} ({gen['layers']} layers, width "
        f"{gen['width']}), batch {gen['batch']}, prompt {gen['prompt']}, {gen['new']} new tokens (greedy, KV cache), "
        f"tokens/s counts the new tokens; LoRA on query and value. Row i uses adapter i mod N. Medians of "
        f"{repeats} round-robin repeats (generation: {gen_repeats}), all ways measured side by side in one run "
        f"({minutes:.1f} min; the machine is shared: 1-minute load average {load_before:.1f} at the start, "
        f"{load_after:.1f} at the end, on {os.cpu_count()} cores). Merge per request: for each distinct adapter, "
        "merge, run its rows, switch (merges included).\n\n"
        "## Classifier\n\n" + _table(cls, "examples/s") + "\n\n"
        "## Generation\n\n" + _table(gen, "tokens/s") + "\n\n"
        "## Compilations\n\n"
        f"- classifier, adapter set: {cls['set_traces_before_swaps']} traces for {len(counts)} set sizes (one per "
        f"capacity); after 4 replaces, a remove and an add at N = {max(counts)}: {cls_traces['set']} in all, "
        f"so {cls_traces['set'] - cls['set_traces_before_swaps']} recompilations across swaps; a replace takes "
        f"{cls['swap_ms']:.1f} ms.\n"
        f"- classifier, merge per request: {cls_traces['merge']} traces of merge (one per adapter spec), "
        f"{cls_traces['merged']} of the merged forward (one per sub-batch size).\n"
        f"- generation: {gen['model_traces_before_swaps']} model traces for all ways and sizes; after 4 replaces at "
        f"N = {max(counts)}: {gen['model_traces_after_swaps']}, so "
        f"{gen['model_traces_after_swaps'] - gen['model_traces_before_swaps']} recompilations across swaps.\n\n"
        "## Memory\n\n"
        f"Base classifier {cls['base_bytes'] / 2**20:.1f} MiB; one merged copy per request needs that again. "
        f"Base decoder {gen['base_bytes'] / 2**20:.1f} MiB. The set's MiB are in the tables (factors padded to rank "
        f"{max(RANKS)}, per-adapter heads, scales).\n\n"
        f"## The low-rank branch alone\n\n`s_i (x A_i) B_i` for x [{cls['batch']}, {cls['length']}, {cls['width']}], "
        f"rank {max(RANKS)}, row i with adapter i mod N; ms (median), and as a multiple of the frozen x W0 of the "
        "same width.\n\n" + report.markdown_table(["form", "N", "ms", "vs x W0"], branch)
    )
    report.write_markdown(outputs[0], "Serving many adapters", text)
    _plot(outputs[1], cls, gen)
    print(text)
    return {"classifier": cls, "generation": gen, "branch": branch}


if __name__ == "__main__":
    main()
