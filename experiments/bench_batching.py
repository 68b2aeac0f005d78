"""Sequence length that follows the data: examples per second on the real SST-2 training path, by batching.

    python -m experiments.bench_batching            # MiniLM LoRA q,v r=8 + head, SST-2 train, max_length 64
    python -m experiments.bench_batching --smoke    # a tiny BERT on a few SST-2 batches, seconds

Three ways to batch the same shuffled epoch (batch 32, sentences tokenized to at most 64 tokens):

- ``fixed 64``: every batch padded to 64 tokens;
- ``buckets``: each batch padded to the smallest of ``data.DEFAULT_BUCKETS`` (up to 64) that fits its longest
  sentence, in shuffled order;
- ``buckets, grouped``: the same buckets, batches cut from pools of ``data.TRAIN_GROUP`` batches sorted by length
  (what ``experiments.finetune`` and ``lora-jax train`` use).

One process compiles the training step once per length, then runs the first ``--batches`` batches of each way
interleaved, batch by batch, so that load on the machine falls on all of them alike. Writes
``experiments/results/bench_batching.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from experiments import assets, bench_train, report

MAX_LENGTH = 64
BATCH_SIZE = 32


def ways(group: int) -> dict[str, dict]:
    """The batching of each row: ``data.batches`` keyword arguments."""
    from lora_jax import data

    buckets = data.buckets_up_to(MAX_LENGTH)
    return {
        f"fixed {MAX_LENGTH}": {"buckets": (MAX_LENGTH,), "group": 0},
        "buckets": {"buckets": buckets, "group": 0},
        "buckets, grouped": {"buckets": buckets, "group": group},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batches", type=int, default=None, help="batches timed per way (default 60; smoke 3)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    args = parser.parse_args(argv)
    name = "bench_batching_smoke" if args.smoke else "bench_batching"
    (path,) = report.outputs(parser, args.results_dir, name, (".md",), args.overwrite)

    import jax
    from tqdm import tqdm

    from lora_jax import data, models, training

    train = data.load_split("sst2", "train", data_dir=assets.glue_dir(), download=False)
    encoded = data.tokenize(train, models.load_tokenizer(assets.minilm_path()), MAX_LENGTH)
    count = args.batches or (3 if args.smoke else 60)
    # The smoke run groups in pools of 4 batches, so that its few batches show the grouping.
    group = 4 if args.smoke else data.TRAIN_GROUP
    batches = {
        way: list(data.batches(encoded, BATCH_SIZE, seed=0, **kwargs))[:count] for way, kwargs in ways(group).items()
    }
    _, params, _, spec, loss = bench_train.workload("minilm", MAX_LENGTH, args.smoke)
    if args.smoke:  # the tiny BERT's vocabulary is smaller than the tokenizer's
        vocab = params["bert"]["embeddings"]["word_embeddings"]["embedding"].shape[0]
        batches = {way: [{**b, "input_ids": b["input_ids"] % vocab} for b in found] for way, found in batches.items()}
    tx = training.make_optimizer(training.TrainConfig(steps=1000))
    lora = training.init_state(jax.random.key(0), params, spec, tx)["lora"]
    opt_state = tx.init(lora)
    step = jax.jit(training.train_step(loss, spec, tx))
    key = jax.random.key(1)
    lengths = sorted({b["input_ids"].shape[1] for found in batches.values() for b in found})
    for length in tqdm(lengths, desc="compile"):  # every length once, outside the timing
        example = next(b for found in batches.values() for b in found if b["input_ids"].shape[1] == length)
        jax.block_until_ready(step(params, lora, opt_state, example, key))
    times: dict[str, list[float]] = {way: [] for way in batches}
    for i in tqdm(range(count), desc="batches"):
        for way, found in batches.items():
            start = time.perf_counter()
            jax.block_until_ready(step(params, lora, opt_state, found[i], key))
            times[way].append(time.perf_counter() - start)
    rows, table = [], {}
    base = f"fixed {MAX_LENGTH}"
    for way, found in batches.items():
        padded = float(np.mean([b["input_ids"].shape[1] for b in found]))
        real = float(np.mean([b["attention_mask"].sum() / BATCH_SIZE for b in found]))
        per_s = BATCH_SIZE * count / sum(times[way])
        table[way] = {"padded": padded, "real": real, "examples_per_s": per_s}
        table[way]["shapes"] = len({b["input_ids"].shape[1] for b in found})
        rows.append(
            [
                way,
                f"{padded:.1f}",
                f"{real:.1f}",
                str(table[way]["shapes"]),
                f"{1000 * float(np.median(times[way])):.0f}",
                f"{per_s:.1f}",
                f"{per_s / (BATCH_SIZE * count / sum(times[base])):.2f}",
            ]
        )
    headers = ["batching", "padded tokens / example", "real tokens / example", "distinct lengths", "median step ms",
               "examples / s", f"vs {base}"]  # fmt: skip
    text = (
        f"{'A tiny BERT (smoke size)' if args.smoke else 'MiniLM'}, LoRA q,v r=8 + head, "
        f"AdamW, model dropout on; the first {count} batches of {BATCH_SIZE} of SST-2's shuffled training epoch 0, "
        f"tokenized to at most {MAX_LENGTH} tokens; timed interleaved, batch by batch, in one process, after one "
        "compilation per length.\n\n" + report.markdown_table(headers, rows)
    )
    print(text)
    report.write_markdown(path, "Batching by length on the SST-2 training path", text)
    return table


if __name__ == "__main__":
    main()
