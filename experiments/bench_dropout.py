"""What dropout costs on the training path, by PRNG implementation.

    python -m experiments.bench_dropout            # MiniLM LoRA q,v r=8, batch 32 x 64
    python -m experiments.bench_dropout --smoke    # tiny shapes, seconds

One process compiles the same training step (model dropout on, as in training) once per key kind, then
times them interleaved, round after round, so that load on the machine falls on all of them alike:

- ``threefry``: JAX's default keys, whose CPU lowering loops;
- ``threefry unrolled``: :data:`lora_jax.prng.THREEFRY_UNROLLED`, the same bits in one fused pass
  (what :func:`lora_jax.training.train_step` uses);
- ``rbg`` and ``unsafe_rbg``: XLA's ``RngBitGenerator``;
- ``no dropout``: the step without a key, the floor.

Writes ``experiments/results/bench_dropout.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from experiments import bench_train, report

KINDS = ("threefry", "threefry unrolled", "rbg", "unsafe_rbg", "no dropout")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    args = parser.parse_args(argv)
    name = "bench_dropout_smoke" if args.smoke else "bench_dropout"
    (path,) = report.outputs(parser, args.results_dir, name, (".md",), args.overwrite)

    import jax
    from tqdm import tqdm

    import lora_jax.training.step as step_module
    from lora_jax import training
    from lora_jax.prng import unrolled

    length = 16 if args.smoke else 64
    _, params, batch, spec, loss = bench_train.workload("minilm", length, args.smoke)
    tx = training.make_optimizer(training.TrainConfig(steps=1000))
    lora = training.init_state(jax.random.key(0), params, spec, tx)["lora"]
    opt_state = tx.init(lora)
    keys = {
        "threefry": jax.random.key(1),
        "threefry unrolled": jax.random.key(1),
        "rbg": jax.random.key(1, impl="rbg"),
        "unsafe_rbg": jax.random.key(1, impl="unsafe_rbg"),
        "no dropout": None,
    }
    compiled, losses = {}, {}
    for kind in tqdm(KINDS, desc="compile"):
        # The step converts Threefry keys to the unrolled kind; for the "threefry" row it must not.
        step_module.unrolled = (lambda key: key) if kind == "threefry" else unrolled
        step = jax.jit(training.train_step(loss, spec, tx))
        compiled[kind] = step.lower(params, lora, opt_state, batch, keys[kind]).compile()
        losses[kind] = float(compiled[kind](params, lora, opt_state, batch, keys[kind])[2])
    step_module.unrolled = unrolled
    rounds = args.rounds or (2 if args.smoke else 12)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in tqdm(range(rounds), desc="rounds"):
        for kind in KINDS:
            start = time.perf_counter()
            jax.block_until_ready(compiled[kind](params, lora, opt_state, batch, keys[kind]))
            times[kind].append(time.perf_counter() - start)
    floor = float(np.median(times["no dropout"]))
    rows = []
    for kind in KINDS:
        ms = 1000 * float(np.median(times[kind]))
        rows.append([kind, f"{ms:.0f}", f"{ms - 1000 * floor:+.0f}", f"{losses[kind]:.6f}"])
    text = (
        f"MiniLM{' (smoke size)' if args.smoke else ''}, LoRA q,v r=8 + head, batch 32 x "
        f"{length}, model dropout 0.1 on; median of {rounds} interleaved rounds, one process.\n\n"
        + report.markdown_table(["dropout keys", "step ms", "vs no dropout (ms)", "first loss"], rows)
        + "\n\nThe two Threefry rows draw the same masks (equal first loss); the default of the training step is "
        "`threefry unrolled`."
    )
    print(text)
    report.write_markdown(path, "Dropout cost by PRNG implementation", text)
    return {"times": times, "losses": losses}


if __name__ == "__main__":
    main()
