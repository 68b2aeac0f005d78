"""LoRA and its variants on SST-2 with MiniLM: fp32 LoRA, int8 and NF4 (QLoRA) bases, DoRA, PiSSA, LoRA+.

    python -m experiments.variants --full        # the results (each run cached under --cache)
    python -m experiments.variants --smoke       # seconds-scale, what the tests run

Every method trains query and value adapters (r=8, alpha=16) and the classifier head of the packaged
all-MiniLM-L6-v2 with the same steps, batches, schedule and seeds, and changes one thing: the frozen base
(int8 with a scale per output channel, NF4 with double-quantized block scales), the adapter (DoRA), its start
(PiSSA: the principal singular vectors, the residual frozen) or the optimizer (LoRA+: B at 16 x the rate of A).
It reports dev accuracy (mean ± std over seeds), the base's bytes (``lora_jax.quant.nbytes``), XLA's argument
and temporary bytes of one compiled training step, the median step time, and the largest difference between
merged and unmerged logits on dev, each against the goals of issue 16. The table and plot go to
--results-dir (``variants.md`` / ``.png``; ``variants_smoke`` for --smoke), replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lora_jax as lj
from experiments import report
from experiments.finetune import Prepare, RunConfig, run
from experiments.sweep import DEFAULT_CACHE
from lora_jax import models, training
from lora_jax.io.atomic import write_text
from lora_jax.paths import flatten, matches, path_str
from lora_jax.plan import abstract_leaf
from lora_jax.typing import PyTree

METHODS = ("lora", "int8", "nf4", "dora", "pissa", "lora_plus")
LABELS = {
    "lora": "LoRA (fp32 base)",
    "int8": "LoRA, int8 base",
    "nf4": "QLoRA (NF4 base)",
    "dora": "DoRA",
    "pissa": "PiSSA",
    "lora_plus": "LoRA+ (ratio 16)",
}
LORA_PLUS_RATIO = 16.0
SEEDS = 3
# --full: the GLUE grid's SST-2 budget (experiments.finetune.FULL_STEPS), which is what two heavily shared CPU
# cores allow for 6 methods x 3 seeds in about half an hour (each method's first run compiles 6 batch lengths).
FULL = RunConfig(task="sst2", method="lora", alpha=16.0, steps=100, max_length=64)
SMOKE = RunConfig(task="sst2", method="lora", alpha=16.0, steps=2, max_length=32, train_limit=64, eval_limit=32)
# Issue 16's goals.
NF4_GOAL, INT8_GOAL, ACCURACY_GOAL, MERGE_GOAL = 0.135, 0.26, 0.5, 1e-5
MIB = 2**20


# The variants: each a change of base, spec, first adapters or optimizer (finetune.Prepare).


def dora_spec(spec: lj.LoraSpec) -> lj.LoraSpec:
    """Return ``spec`` with its LoRA rules made DoRA rules (``mode="dora"``), the others as they are."""
    return lj.LoraSpec([dataclasses.replace(r, mode="dora") if r.mode == "lora" else r for r in spec.rules])


def prepare_for(method: str, kept: dict[str, Any]) -> Prepare | None:
    """Return how ``method`` changes the plain LoRA run (None: not at all); PiSSA leaves its base and start in ``kept``.

    Raises:
      ValueError: an unknown method.
    """

    def quantized(fmt: str) -> Prepare:
        return lambda model, params, spec, config: (
            lj.quantize(params, models.quant_rules(model, fmt)),
            spec,
            None,
            None,
        )

    def pissa(model: Any, params: PyTree, spec: lj.LoraSpec, config: training.TrainConfig):
        residual, lora = jax.jit(lj.pissa_init, static_argnums=1)(params, spec)
        kept.update(original=params, initial=lora)  # fit copies its start, so these stay as they are
        return residual, spec, lora, None

    def lora_plus(model: Any, params: PyTree, spec: lj.LoraSpec, config: training.TrainConfig):
        schedule = training.learning_rate_schedule(config)
        tx = lj.lora_plus(optax.adamw, schedule, ratio=LORA_PLUS_RATIO, weight_decay=config.weight_decay)
        return params, spec, None, tx

    prepares: dict[str, Prepare | None] = {
        "lora": None,
        "int8": quantized("int8"),
        "nf4": quantized("nf4"),
        "dora": lambda model, params, spec, config: (params, dora_spec(spec), None, None),
        "pissa": pissa,
        "lora_plus": lora_plus,
    }
    if method not in prepares:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return prepares[method]


# What one run measures besides accuracy.


def kernel_bytes(params: PyTree, model: Any) -> int:
    """Return the bytes of the linear kernels ``models.quant_rules`` selects (codes and scales when quantized)."""
    patterns = [pattern for pattern, _ in models.quant_rules(model, "nf4")]
    total = 0
    for path, leaf in flatten(params)[0]:
        if any(matches(p, path_str(path), abstract_leaf(leaf)) for p in patterns):
            total += lj.quant.nbytes(leaf)
    return total


def fixed_length(batches: Iterable[dict], length: int) -> Iterable[dict]:
    """Yield ``batches`` with their ``[B, L]`` arrays padded (masked) to ``length``: one shape, one compilation."""
    for batch in batches:
        yield {k: np.pad(v, ((0, 0), (0, length - v.shape[1]))) if np.ndim(v) == 2 else v for k, v in batch.items()}


def logit_gap(merged_fn, merged: PyTree, unmerged_fn, params: PyTree, lora: PyTree, batches: Iterable[dict]) -> float:
    """Return the largest ``|merged - unmerged|`` logit over the real rows of ``batches``."""
    gap = 0.0
    for batch in batches:
        keep = batch["weights"] > 0
        diff = jnp.abs(merged_fn(merged, batch) - unmerged_fn(params, lora, batch))
        gap = max(gap, float(jnp.max(diff[keep])))
    return gap


def merge_gaps(result: dict, kept: dict, length: int) -> dict[str, float]:
    """Return the merged-vs-unmerged logit gaps of a trained run on its dev batches.

    ``merged``: ``merge(base, lora)`` through the unmodified model against the factored path on the base the run
    trained (quantized or residual). PiSSA adds ``pissa_to_lora``: its rank-2r LoRA merged onto the original base.
    """
    params, lora, spec, apply_fn = result["params"], result["state"]["lora"], result["spec"], result["apply_fn"]
    merged_fn = jax.jit(lambda p, b: apply_fn(p, b, None))
    unmerged_fn = jax.jit(lj.factored(lambda p, b: apply_fn(p, b, None), spec))
    merged = jax.jit(lj.merge, static_argnums=2)(params, lora, spec)
    gaps = {
        "merged": logit_gap(
            merged_fn, merged, unmerged_fn, params, lora, fixed_length(result["eval_batches"](), length)
        )
    }
    if "initial" in kept:
        converted, converted_spec = lj.pissa_to_lora(params, lora, spec, kept["initial"])
        onto_original = jax.jit(lj.merge, static_argnums=2)(kept["original"], converted, converted_spec)
        batches = fixed_length(result["eval_batches"](), length)
        gaps["pissa_to_lora"] = logit_gap(merged_fn, onto_original, unmerged_fn, params, lora, batches)
    return gaps


def step_memory(result: dict, length: int) -> dict[str, int]:
    """Return XLA's byte counts of the run's compiled training step (the step ``fit`` runs) on a full-length batch."""
    state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), result["state"])
    sample = next(iter(result["eval_batches"]()))
    batch = {
        k: jax.ShapeDtypeStruct((v.shape[0], length) if np.ndim(v) == 2 else v.shape, v.dtype)
        for k, v in sample.items()
    }
    step = training.state_step(training.train_step(result["loss_fn"], result["spec"], result["tx"]))
    memory = step.lower(state, result["params"], batch).compile().memory_analysis()
    return {
        "argument_bytes": int(memory.argument_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
    }


# Runs, cached one summary each.


def run_key(method: str, config: RunConfig) -> str:
    text = json.dumps({"method": method, "config": dataclasses.asdict(config.with_defaults())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_variant(method: str, config: RunConfig, measure: bool, progress: bool = True) -> dict[str, Any]:
    """Train one method at one seed; return what the tables need (JSON-able).

    ``measure`` adds the step's XLA memory and the merged-vs-unmerged logit gaps (each a few compilations).
    A run whose loss turns NaN or Inf is recorded as diverged, with the error, and no score.
    """
    kept: dict[str, Any] = {}
    summary: dict[str, Any] = {"method": method, "seed": config.seed, "config": dataclasses.asdict(config)}
    try:
        result = run(config, progress=progress, prepare=prepare_for(method, kept))
    except lj.NonFiniteError as err:
        return {**summary, "score": None, "diverged": str(err)}
    summary.update(
        score=result["score"],
        diverged=None,
        trainable=result["trainable"],
        step_ms=result["step_ms"],
        seconds=result["seconds"],
        losses=[r["loss"] for r in result["records"] if r["split"] == "train"],
        base_bytes=lj.quant.nbytes(result["params"]),
        kernel_bytes=kernel_bytes(result["params"], result["model"]),
    )
    if measure:
        summary["gaps"] = merge_gaps(result, kept, config.max_length)
        summary["memory"] = step_memory(result, config.max_length)
    return summary


def run_cached(method: str, config: RunConfig, cache: Path, measure: bool, cached_only: bool) -> dict[str, Any] | None:
    """The summary of ``method`` on ``config``, training it first unless ``cache`` holds it (or ``cached_only``)."""
    path = cache / f"{method}-{run_key(method, config)}{'-measured' if measure else ''}.json"
    if path.exists():
        return json.loads(path.read_text())
    if cached_only:
        return None
    summary = run_variant(method, config, measure)
    cache.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(summary, indent=1), overwrite=True)
    return summary


def grid(smoke: bool, seeds: int = SEEDS) -> list[tuple[str, RunConfig]]:
    """The runs, seed-major (an interrupted grid has every method at the first seeds)."""
    base = SMOKE if smoke else FULL
    return [(m, dataclasses.replace(base, seed=s)) for s in range(1 if smoke else seeds) for m in METHODS]


# The report.


def summarize(results: list[dict]) -> dict[str, dict[str, Any]]:
    """Per method, in :data:`METHODS` order: scores by seed (x100), diverged seeds, step times, the measured run."""
    methods: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = methods.setdefault(
            r["method"], {"scores": {}, "diverged": [], "step_ms": [], "last_loss": [], "measured": None}
        )
        if r["diverged"] is not None:
            entry["diverged"].append(r["seed"])
            continue
        entry["scores"][r["seed"]] = 100 * r["score"]
        entry["step_ms"].append(r["step_ms"])
        entry["last_loss"] += r["losses"][-1:]
        if "memory" in r:
            entry["measured"] = r
    return {m: methods[m] for m in METHODS if m in methods}


def paired(methods: dict[str, dict[str, Any]], method: str) -> list[float]:
    """Return ``method``'s score minus LoRA fp32's at each seed both finished (same head, batches and A init)."""
    mine, ref = methods[method]["scores"], methods["lora"]["scores"]
    return [mine[s] - ref[s] for s in sorted(mine) if s in ref]


def fmt_mib(n: float) -> str:
    return f"{n / MIB:.2f}"


def table(methods: dict[str, dict[str, Any]]) -> str:
    reference = methods["lora"]["measured"]
    rows = []
    for method, entry in methods.items():
        scores, measured = list(entry["scores"].values()), entry["measured"]
        accuracy = report.mean_std(scores) if scores else "-"
        if entry["diverged"]:
            accuracy += f"; diverged at seed {', '.join(map(str, entry['diverged']))}"
        diffs = paired(methods, method)
        row = [
            LABELS[method],
            accuracy,
            "-" if method == "lora" or not diffs else f"{np.mean(diffs):+.2f} ± {np.std(diffs):.2f} (n={len(diffs)})",
            "-" if np.isnan(np.median(entry["step_ms"] or [math.nan])) else f"{np.median(entry['step_ms']):.0f}",
        ]
        if measured is None or reference is None:
            row += ["-"] * 5
        else:
            memory = measured["memory"]
            row += [
                f"{measured['trainable']:,}",
                f"{fmt_mib(measured['base_bytes'])} ({measured['base_bytes'] / reference['base_bytes']:.3f})",
                f"{fmt_mib(measured['kernel_bytes'])} ({measured['kernel_bytes'] / reference['kernel_bytes']:.3f})",
                f"{fmt_mib(memory['argument_bytes'])} + {fmt_mib(memory['temp_bytes'])}",
                f"{measured['gaps']['merged']:.1e}",
            ]
        rows.append(row)
    headers = [
        "method",
        "SST-2 dev accuracy (x100)",
        "minus LoRA fp32, paired by seed",
        "step ms (median)",
        "trainable params",
        "base MiB (x fp32)",
        "linear kernels MiB (x fp32)",
        "step XLA argument + temp MiB",
        "merged vs unmerged max logit gap",
    ]
    return report.markdown_table(headers, rows)


def verdict(met: bool, how: str) -> str:
    return f"**{'met' if met else 'missed'}**: {how}"


def total(run: dict[str, Any]) -> int:
    """Return a measured run's XLA argument plus temporary bytes."""
    return run["memory"]["argument_bytes"] + run["memory"]["temp_bytes"]


def goals(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Issue 16's goals, each with its measured value and by how much it is met or missed."""
    lines = []
    reference = methods["lora"]["measured"]
    measured = {m: e["measured"] for m, e in methods.items() if e["measured"] is not None}
    for method, goal in (("nf4", NF4_GOAL), ("int8", INT8_GOAL)):
        if method not in measured or reference is None:
            continue
        run = measured[method]
        kernels = run["kernel_bytes"] / reference["kernel_bytes"]
        whole = run["base_bytes"] / reference["base_bytes"]
        lines.append(
            f"- {LABELS[method]}: base bytes <= {goal} x fp32 (the linear kernels): "
            + verdict(
                kernels <= goal,
                f"{kernels:.4f} x, {goal - kernels:.4f} under the goal"
                if kernels <= goal
                else f"{kernels:.4f} x, {kernels - goal:.4f} over the goal",
            )
            + f". The whole model, whose embeddings, norms, biases and head stay fp32: {whole:.3f} x"
            f" ({fmt_mib(run['base_bytes'])} of {fmt_mib(reference['base_bytes'])} MiB)."
        )
    for method in ("int8", "nf4"):
        if method not in methods or "lora" not in methods or not paired(methods, method):
            continue
        diffs = paired(methods, method)
        delta = float(np.mean(diffs))
        gap = np.mean(list(methods[method]["scores"].values())) - np.mean(list(methods["lora"]["scores"].values()))
        margin = ACCURACY_GOAL - abs(delta)
        lines.append(
            f"- {LABELS[method]} within {ACCURACY_GOAL} points of LoRA fp32: "
            + verdict(
                margin >= 0,
                f"{delta:+.2f} points paired by seed (std {np.std(diffs):.2f}, n={len(diffs)}), "
                + (f"{margin:.2f} inside the goal" if margin >= 0 else f"{-margin:.2f} outside it"),
            )
            + f"; difference of the means {gap:+.2f}; the seeds' own spread (std) is up to "
            f"{max(np.std(list(methods[m]['scores'].values())) for m in (method, 'lora')):.2f} points."
        )
    for method in ("dora", "pissa"):
        if method not in measured:
            continue
        gaps = measured[method]["gaps"]
        line = (
            f"- {LABELS[method]}: merged vs unmerged <= {MERGE_GOAL:.0e} in fp32 (the largest |logit| difference "
            "over dev, trained adapters of seed 0): " + verdict(gaps["merged"] <= MERGE_GOAL, f"{gaps['merged']:.1e}")
        )
        if "pissa_to_lora" in gaps:
            line += "; converted by `pissa_to_lora` to a rank-16 LoRA and merged onto the original base: " + verdict(
                gaps["pissa_to_lora"] <= MERGE_GOAL, f"{gaps['pissa_to_lora']:.1e}"
            )
        lines.append(line + ".")
    for method in ("dora", "pissa", "lora_plus"):
        if method not in methods or not paired(methods, method):
            continue
        diffs, entry = paired(methods, method), methods[method]
        lines.append(
            f"- {LABELS[method]} against LoRA fp32 (no goal; as measured): "
            f"{np.mean(list(entry['scores'].values())):.1f} against "
            f"{np.mean(list(methods['lora']['scores'].values())):.1f}, {np.mean(diffs):+.2f} ± {np.std(diffs):.2f} "
            f"points paired by seed (n={len(diffs)}); last logged training loss {np.mean(entry['last_loss']):.3f} "
            f"against {np.mean(methods['lora']['last_loss']):.3f}."
        )
    if "nf4" in measured and reference is not None:
        nf4 = measured["nf4"]
        saving = reference["base_bytes"] - nf4["base_bytes"]
        fewer = reference["memory"]["argument_bytes"] - nf4["memory"]["argument_bytes"]
        lines.append(
            "- A training step on the NF4 base holds fewer XLA argument bytes than on fp32 by at least the base's "
            "byte saving: "
            + verdict(fewer >= saving, f"{fewer:,} bytes fewer for a {saving:,}-byte saving ({fewer - saving:+,})")
            + f". Its temporaries: {fmt_mib(nf4['memory']['temp_bytes'])} MiB against "
            f"{fmt_mib(reference['memory']['temp_bytes'])} MiB on fp32 (the dequantized kernels live inside the "
            f"step), so arguments + temporaries fall by {fmt_mib(total(reference) - total(nf4))} MiB "
            f"({fmt_mib(total(nf4))} against {fmt_mib(total(reference))})."
        )
    return lines


def plot(path: Path, methods: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in methods if methods[m]["scores"]]
    x = np.arange(len(names))
    scores = [list(methods[m]["scores"].values()) for m in names]
    fig, (acc, mem) = plt.subplots(1, 2, figsize=(11, 4.5))
    acc.bar(x, [np.mean(v) for v in scores], yerr=[np.std(v) for v in scores], capsize=3)
    for i, values in enumerate(scores):
        acc.plot([i] * len(values), values, "k.", markersize=4)
    acc.set_ylim(max(0.0, min(map(min, scores)) - 5), min(100.0, max(map(max, scores)) + 2))
    acc.set_xticks(x, [LABELS[m] for m in names], rotation=30, ha="right")
    acc.set_ylabel("SST-2 dev accuracy x100 (mean ± std, seeds)")

    def measured(key: str, field: str | None = None) -> np.ndarray:
        values = []
        for m in names:
            run = methods[m]["measured"]
            values.append(math.nan if run is None else (run[key] if field is None else run[key][field]))
        return np.array(values, float) / MIB

    width = 0.27
    series = {
        "base": measured("base_bytes"),
        "step arguments": measured("memory", "argument_bytes"),
        "step temporaries": measured("memory", "temp_bytes"),
    }
    for i, (label, values) in enumerate(series.items()):
        mem.bar(x + (i - 1) * width, values, width, label=label)
    mem.set_xticks(x, [LABELS[m] for m in names], rotation=30, ha="right")
    mem.set_ylabel("MiB (XLA's accounting of one compiled step)")
    mem.set_ylim(0, 1.25 * np.nanmax(np.concatenate(list(series.values()))))
    mem.legend(loc="upper center", ncol=3)
    fig.suptitle("LoRA variants, all-MiniLM-L6-v2 on SST-2")
    fig.tight_layout()
    report.save_figure(fig, path)


def describe_setup(config: RunConfig, results: list[dict], seeds: int) -> str:
    done = sorted({r["seed"] for r in results})
    return (
        f"{config.steps} steps x batch {config.batch_size} (max length {config.max_length}, length-grouped batches"
        f"{'' if config.train_limit is None else f', the first {config.train_limit} shuffled examples'}) for every "
        f"method, AdamW at {config.with_defaults().learning_rate:g} with warm-up and linear decay (LoRA's rate, "
        "picked on SST-2 for the GLUE grid and not tuned per method; LoRA+: A and the head at that rate, B at "
        f"{LORA_PLUS_RATIO:g} x), q and v adapters r={config.rank}, alpha={config.alpha:g}, "
        "plus the classifier head. Seeds finished: "
        f"{', '.join(map(str, done))} of the {seeds} asked (a seed fixes the head's and A's init and the batch order, "
        "so differences are paired by seed). Dev: "
        f"{'the first ' + str(config.eval_limit) if config.eval_limit else 'all 872'} sentences, on the merged "
        "tree. Base bytes: `lora_jax.quant.nbytes` (a quantized kernel counts its codes and scales); 'linear "
        "kernels' are the ones `models.quant_rules` selects (query, key, value, attention output and both MLP kernels "
        "of each layer). Step memory: XLA's "
        "`memory_analysis()` of the compiled factored step that `fit` runs, on a "
        f"[{config.batch_size}, {config.max_length}] batch (seed 0). Step ms: the median over runs of each run's "
        "median over 20-step windows after the first (which compiles). Logit gap: the largest "
        "|merge(base, lora) logits - factored(base, lora) logits| over dev for seed 0's trained adapters; "
        "PiSSA's base is its residual, the quantized ones are their codes."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="a few steps on a few examples, one seed")
    size.add_argument("--full", action="store_true", help="the runs the results come from (the default)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per method with --full (default {SEEDS})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "variants", help="one summary per run")
    parser.add_argument("--cached-only", action="store_true", help="tabulate finished runs, train nothing")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    parser.add_argument("--overwrite", action="store_true", help="replace the results table and plot")
    args = parser.parse_args(argv)
    name = "variants_smoke" if args.smoke else "variants"
    md, png = report.outputs(parser, args.results_dir, name, (".md", ".png"), args.overwrite)
    print(report.environment())
    if not args.smoke:  # seeds and methods share shapes: a persistent compilation cache spares recompiling them
        jax.config.update("jax_compilation_cache_dir", str(args.cache.resolve() / "jax-compilation-cache"))

    runs = grid(args.smoke, args.seeds)
    results = []
    with tqdm(runs, desc="variants") as bar:
        for method, config in bar:
            bar.set_postfix_str(f"{method} seed {config.seed}")
            summary = run_cached(method, config, args.cache, config.seed == 0, args.cached_only)
            if summary is not None:
                results.append(summary)
    methods = summarize(results)
    if "lora" not in methods or methods["lora"]["measured"] is None:
        parser.error(f"no finished LoRA fp32 run at seed 0 in {args.cache}: it is what every figure is compared with")
    text = "\n\n".join(
        [
            describe_setup(runs[0][1], results, 1 if args.smoke else args.seeds),
            table(methods),
            "## Goals of issue 16\n\n" + "\n".join(goals(methods)),
        ]
    )
    print(text)
    title = "LoRA variants: fp32, int8 and NF4 bases, DoRA, PiSSA, LoRA+ (all-MiniLM-L6-v2, SST-2)"
    report.write_markdown(md, title, text)
    plot(png, methods)
    return {"results": results, "methods": methods, "text": text}


if __name__ == "__main__":
    main()
