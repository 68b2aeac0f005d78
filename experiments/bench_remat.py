"""Activation memory against step time: XLA:CPU's scheduler and the blocks' rematerialization policy.

    python -m experiments.bench_remat            # MiniLM, batch 32 x 64, LoRA q,v r=8 + head and full FT
    python -m experiments.bench_remat --smoke    # tiny shapes, seconds

XLA:CPU orders a program's ops for concurrency by default, which runs the backward pass's recomputation
as early as the forward's, so a ``jax.checkpoint`` policy saves no memory; its memory-minimizing order
(``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``) keeps it for the backward. One
process per scheduler compiles the training step for each policy and method, reads XLA's temporaries,
then times the steps interleaved, round after round, so that load on the machine falls on all of them alike.
Writes ``experiments/results/bench_remat.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from experiments import bench_train, report
from lora_jax.models import MEMORY_SCHEDULER_FLAG

POLICIES = (None, "dots_saveable", "nothing_saveable")
SCHEDULERS = ("concurrency", "memory")
METHODS = ("lora-factored", "full")


def worker(job: dict) -> dict:
    """Compile every (method, policy) under this process's scheduler; time them interleaved."""
    import jax

    import lora_jax as lj
    from lora_jax import training

    configs = list(itertools.product(METHODS, POLICIES))
    compiled, inputs, temp, losses = {}, {}, {}, {}
    for method, policy in configs:
        _, params, batch, spec, loss = bench_train.workload("minilm", job["length"], job["smoke"], remat=policy)
        if method == "full":
            spec = lj.LoraSpec([lj.trainable(".*")])
        tx = training.make_optimizer(training.TrainConfig(steps=1000))
        lora = training.init_state(jax.random.key(0), params, spec, tx)["lora"]
        opt_state = tx.init(lora)
        step = training.train_step(loss, spec, tx, factored=method != "full")
        key = (method, policy)
        inputs[key] = (params, lora, opt_state, batch, jax.random.key(1))
        compiled[key] = jax.jit(step).lower(*inputs[key]).compile()
        temp[key] = compiled[key].memory_analysis().temp_size_in_bytes
        losses[key] = float(compiled[key](*inputs[key])[2])
    times: dict[tuple, list[float]] = {key: [] for key in configs}
    for _ in range(job["rounds"]):
        for key in configs:
            start = time.perf_counter()
            jax.block_until_ready(compiled[key](*inputs[key]))
            times[key].append(time.perf_counter() - start)
    return {
        "rows": [
            {
                "method": method,
                "policy": policy,
                "temp_bytes": temp[method, policy],
                "step_ms": 1000 * float(np.median(times[method, policy])),
                "loss": losses[method, policy],
            }
            for method, policy in configs
        ]
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    name = "bench_remat_smoke" if args.smoke else "bench_remat"
    (path,) = report.outputs(parser, args.results_dir, name, (".md",), args.overwrite)

    from tqdm import tqdm

    length = 16 if args.smoke else 64
    rounds = args.rounds or (2 if args.smoke else 8)
    job = {"length": length, "smoke": args.smoke, "rounds": rounds}
    found = {}
    for scheduler in tqdm(SCHEDULERS, desc="schedulers"):
        flags = MEMORY_SCHEDULER_FLAG if scheduler == "memory" else ""
        for row in bench_train.spawn(job, flags, module="experiments.bench_remat")["rows"]:
            found[scheduler, row["method"], row["policy"]] = row
    rows = []
    for (scheduler, method, policy), r in found.items():
        base = found["concurrency", method, None]
        rows.append(
            [
                method,
                scheduler,
                policy or "none",
                f"{r['temp_bytes'] / 2**20:.0f}",
                f"{r['temp_bytes'] / base['temp_bytes']:.2f}",
                f"{r['step_ms']:.0f}",
                f"{r['step_ms'] / found[scheduler, method, None]['step_ms']:.2f}",
                f"{r['loss']:.6f}",
            ]
        )
    headers = ["method", "scheduler", "remat policy", "XLA temp MiB", "temp vs default", "step ms",
               "time vs no remat", "first loss"]  # fmt: skip
    text = (
        f"MiniLM{' (smoke size)' if args.smoke else ''}, batch 32 x {length}, LoRA q,v "
        f"r=8 + head or full fine-tuning, AdamW, model dropout 0.1 on. One process per scheduler (`memory`: "
        f"`XLA_FLAGS={MEMORY_SCHEDULER_FLAG}`); within it, the median of {rounds} interleaved rounds, "
        "so `time vs no remat` compares steps measured side by side, while step times across the two schedulers "
        "come from two processes run one after the other. `temp vs default` is against the concurrency scheduler "
        "without remat. Rematerialization recomputes the same values, so each method's first loss is the same "
        "in every row.\n\n" + report.markdown_table(headers, rows)
    )
    print(text)
    report.write_markdown(path, "Activation memory: scheduler and rematerialization", text)
    return {"found": found}


if __name__ == "__main__":
    main()
