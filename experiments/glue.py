"""GLUE on MiniLM: SST-2, RTE and CoLA x {full fine-tuning, LoRA qv r=8, BitFit, head only}.

    python -m experiments.glue --full     # the results table (runs are cached under runs/cache)
    python -m experiments.glue --smoke    # seconds-scale grid for the tests

Reports the dev metric (mean +- std over seeds), trainable parameters, step
time and peak memory of each run's process, as a markdown table and a bar chart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from experiments import report
from experiments.finetune import FULL_MAX_LENGTH, FULL_STEPS, METHODS, RunConfig
from experiments.sweep import DEFAULT_CACHE, group, run_all

TASKS = ("sst2", "rte", "cola")
SEEDS = 3
LABELS = {"full": "full FT", "lora": "LoRA qv r=8", "bitfit": "BitFit", "head": "head only"}


def grid(smoke: bool) -> list[RunConfig]:
    if smoke:
        return [
            RunConfig(task="sst2", method=m, steps=2, max_length=32, train_limit=64, eval_limit=32)
            for m in ("lora", "head")
        ]
    # Seed-major, so that an interrupted grid has every cell at least once.
    return [
        RunConfig(task=task, method=method, seed=seed, steps=FULL_STEPS[task], max_length=FULL_MAX_LENGTH[task])
        for seed in range(SEEDS)
        for task in TASKS
        for method in METHODS
    ]


def table(results: list[dict]) -> tuple[str, dict]:
    rows, means = [], {}
    for (task, method), runs in group(results, "task", "method").items():
        scores = 100 * np.array([r["score"] for r in runs])
        means[(task, method)] = (scores.mean(), scores.std())
        rows.append(
            [
                task,
                LABELS[method],
                runs[0]["metric"],
                report.mean_std(scores),
                f"{runs[0]['trainable']:,} ({100 * runs[0]['trainable'] / runs[0]['base']:.2f}%)",
                f"{np.median([r['step_ms'] for r in runs]):.0f}",
                f"{max(r['peak_rss_mib'] for r in runs):.0f}",
            ]
        )
    headers = ["task", "method", "metric", "dev (x100)", "trainable params", "step ms (median)", "peak RSS MiB"]
    return report.markdown_table(headers, rows), means


def plot(path: Path, means: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _ in means})
    methods = [m for m in METHODS if any((t, m) in means for t in tasks)]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [means.get((t, method), (np.nan, 0)) for t in tasks]
        ax.bar(
            np.arange(len(tasks)) + i * width,
            [v[0] for v in values],
            width,
            yerr=[v[1] for v in values],
            label=LABELS[method],
        )
    ax.set_xticks(np.arange(len(tasks)) + width * (len(methods) - 1) / 2, tasks)
    ax.set_ylabel("dev metric x100")
    ax.set_title("MiniLM on GLUE")
    ax.legend()
    fig.tight_layout()
    report.save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--full", action="store_true", help="the grid the results come from (default)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--cached-only", action="store_true", help="tabulate finished runs, train nothing")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = parser.parse_args(argv)
    name = "glue_smoke" if args.smoke else "glue"
    md, png = report.outputs(parser, args.results_dir, name, (".md", ".png"), args.overwrite)
    results = run_all(grid(args.smoke), args.cache, desc="glue", cached_only=args.cached_only)
    text, means = table(results)
    print(text)
    report.write_markdown(md, "GLUE dev results, all-MiniLM-L6-v2", text)
    plot(png, means)
    return results


if __name__ == "__main__":
    main()
