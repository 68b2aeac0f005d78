"""Inference latency, the paper's Table 1 shape: base vs LoRA merged vs LoRA unmerged vs adapter layers.

    python -m experiments.bench_latency            # GPT-2-small-shaped decoder, three (batch, length) sizes
    python -m experiments.bench_latency --smoke    # a tiny decoder, seconds

Variants, each its own jitted forward (logits over the whole sequence):
base; LoRA merged into the weights (``lora_jax.merge``, r=8 on every attention
and MLP kernel); LoRA unmerged on the factored path; Houlsby adapter layers (a
bottleneck with a residual after the attention output and after the MLP, as
in the paper's AdapterH) at two bottleneck sizes. Repeats run round-robin
across the variants so drift hits all alike; medians are reported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import lora_jax as lj
from experiments import report
from lora_jax import models

ADAPTED = ("out", "proj")  # attention output and MLP output projections


def houlsby_params(key: jax.Array, params: dict, width: int, bottleneck: int) -> dict[tuple[str, ...], dict]:
    """One bottleneck per attention output and MLP output of every layer: down ``[d, m]``, up ``[m, d]``."""
    out = {}
    for path, _ in lj.paths.flatten(params)[0]:
        if len(path) >= 2 and path[-1] == "kernel" and path[-2] in ADAPTED:
            key, k1, k2 = jax.random.split(key, 3)
            out[path[:-1]] = {
                "down": jax.random.normal(k1, (width, bottleneck)) / np.sqrt(width),
                "up": jax.random.normal(k2, (bottleneck, width)) * 1e-3,
            }
    return out


def with_houlsby(apply_fn, adapters: dict):
    """``apply_fn`` with ``h + up(gelu(down(h)))`` after each adapted projection (Flax method interception)."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.name in ADAPTED:
            path = tuple(module.scope.path)
            # The scope path includes the model's own name when it is nested; match on the suffix.
            for key, p in adapters.items():
                if path[-len(key) :] == key:
                    return out + jax.nn.gelu(out @ p["down"]) @ p["up"]
        return out

    def run(params, ids):
        with nn.intercept_methods(interceptor):
            return apply_fn(params, ids)

    return run


def median_ms(fns: dict, args: dict, repeats: int) -> dict[str, float]:
    for name, fn in fns.items():  # compile and warm up
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    import time

    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = parser.parse_args(argv)
    name = "bench_latency_smoke" if args.smoke else "bench_latency"
    md, png = report.outputs(parser, args.results_dir, name, (".md", ".png"), args.overwrite)
    if args.smoke:
        config = models.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512)
        sizes, bottlenecks, repeats = [(1, 16), (4, 32)], (8, 32), args.repeats or 3
    else:
        config = models.GPT2Config()
        sizes, bottlenecks, repeats = [(1, 128), (16, 256), (4, 512)], (64, 256), args.repeats or 7
    model = models.GPT2LMHeadModel(config)
    params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    spec = models.lora_spec(model, "all-linear", rank=8, alpha=16)
    lora = lj.init(jax.random.key(1), params, spec)
    lora = jax.tree_util.tree_map(lambda x: x + 1e-3 * jax.random.normal(jax.random.key(2), x.shape), lora)
    merged = jax.jit(lj.merge, static_argnums=2)(params, lora, spec)

    def apply_fn(p, ids):
        return model.apply({"params": p}, ids).logits

    fns = {
        "base": jax.jit(apply_fn),
        "LoRA merged": jax.jit(apply_fn),
        "LoRA unmerged (factored)": jax.jit(lj.factored(apply_fn, spec)),
    }
    adapters = {m: houlsby_params(jax.random.key(3), params, config.n_embd, m) for m in bottlenecks}
    for m in bottlenecks:
        fns[f"adapter layers, m={m}"] = jax.jit(with_houlsby(apply_fn, adapters[m]))

    from tqdm import tqdm

    rows, table = [], {}
    for batch, length in tqdm(sizes, desc="sizes"):
        ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, length)), jnp.int32)
        call_args = {name: (params, ids) for name in fns}
        call_args["LoRA merged"] = (merged, ids)
        call_args["LoRA unmerged (factored)"] = (params, lora, ids)
        ms = median_ms(fns, call_args, repeats)
        table[(batch, length)] = ms
        for name, value in ms.items():
            overhead = 100 * (value / ms["base"] - 1)
            rows.append([f"{batch} x {length}", name, f"{value:.1f}", f"{overhead:+.1f}%"])
    headers = ["batch x length", "variant", "ms (median)", "vs base"]
    shape = "GPT-2-small-shaped" if not args.smoke else "tiny"
    text = (
        f"{shape} decoder ({config.n_layer} layers, width {config.n_embd}), full-sequence forward with logits; "
        f"LoRA r=8 on every attention and MLP kernel; median of {repeats} round-robin repeats.\n\n"
        + report.markdown_table(headers, rows)
    )
    print(text)
    report.write_markdown(md, "Inference latency", text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(fns)
    for i, n in enumerate(names):
        ax.bar(
            np.arange(len(sizes)) + i * 0.15, [100 * (table[s][n] / table[s]["base"] - 1) for s in sizes], 0.15, label=n
        )
    ax.set_xticks(np.arange(len(sizes)) + 0.3, [f"{b}x{n}" for b, n in sizes])
    ax.set_ylabel("latency overhead vs base (%)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    report.save_figure(fig, png)
    return {"table": table}


if __name__ == "__main__":
    main()
