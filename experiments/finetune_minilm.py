"""The main job: LoRA fine-tune of the packaged all-MiniLM-L6-v2 on SST-2, end to end.

    python -m experiments.finetune_minilm              # 400 steps on shuffled SST-2 train, under 10 min on 2 cores
    python -m experiments.finetune_minilm --full       # 3 epochs over all 67,349 training sentences
    python -m experiments.finetune_minilm --smoke      # seconds; what the tests run

Trains LoRA (query and value, r=8) plus the classifier head, prints dev accuracy,
saves the adapter, merges it into the base and checks that merged and
unmerged predictions agree. Data come from --data-dir (GLUE's layout, default
``experiments.assets.glue_dir()``: $LORA_JAX_GLUE_DIR or ../shared/data/glue) or, when no
local copy exists, from TFDS's download.

Everything goes to the run directory (--out, default runs/minilm-<task>-<time>, which git ignores):
checkpoints (a rerun into it resumes), adapter.safetensors and the results table and plot, so a
run modifies no tracked file. --results-dir experiments/results --overwrite refreshes the published table.
An existing adapter, table or plot is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from experiments import assets, finetune, report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="a few steps on a few examples")
    size.add_argument("--full", action="store_true", help="3 epochs over the whole training set")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=None, help="GLUE-style root (task/train.tsv, task/dev.tsv)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/minilm-<task>-<time>)")
    parser.add_argument(
        "--results-dir", type=Path, default=None, help=f"where the table and plot go (default: --out; {report.RESULTS})"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run directory's adapter and table")
    args = parser.parse_args(argv)

    steps = 400
    train_limit = eval_limit = None
    if args.smoke:
        steps, train_limit, eval_limit = 6, 128, 64
    elif args.full:
        steps = 3 * (67349 // 32)
    steps = args.steps or steps
    config = finetune.RunConfig(
        task=args.task,
        rank=args.rank,
        seed=args.seed,
        steps=steps,
        train_limit=train_limit,
        eval_limit=eval_limit,
        data_dir=args.data_dir,
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / f"minilm-{args.task}-{stamp}"
    name = "finetune_minilm_smoke" if args.smoke else "finetune_minilm"
    report.refuse_existing(parser, [out / "adapter.safetensors"], args.overwrite)
    table, plot = report.outputs(parser, args.results_dir or out, name, (".md", ".png"), args.overwrite)
    out.mkdir(parents=True, exist_ok=True)

    result = finetune.run(config, checkpoint_dir=out / "checkpoints")
    params, spec, state, apply_fn = result["params"], result["spec"], result["state"], result["apply_fn"]
    lora = state["lora"]
    print(lj.describe(params, spec))
    print(f"dev {result['metric']}: {result['score']:.4f} after {steps} steps ({result['seconds']:.0f} s)")

    adapter_path = lj.save_adapter(out / "adapter.safetensors", params, lora, spec, overwrite=args.overwrite)
    model_bytes = (assets.minilm_path() / "model.safetensors").stat().st_size
    adapter_size = adapter_path.stat().st_size
    print(
        f"adapter: {adapter_path} ({adapter_size / 1024:.0f} KiB; the base model file is {model_bytes / 2**20:.1f} MiB)"
    )

    # Serving: merge once, then the unmodified apply; compare with base + adapter (factored, unmerged).
    restored = lj.load_adapter(adapter_path, params, spec)
    merged = jax.jit(lj.merge, static_argnums=2)(params, restored, spec)
    merged_logits = jax.jit(lambda p, b: apply_fn(p, b, None))
    unmerged_logits = jax.jit(lj.factored(lambda p, b: apply_fn(p, b, None), spec))
    agree = total = 0
    gap = 0.0
    for batch in result["eval_batches"]():
        a, b = merged_logits(merged, batch), unmerged_logits(params, restored, batch)
        keep = batch["weights"] > 0
        agree += int(np.sum((jnp.argmax(a, -1) == jnp.argmax(b, -1))[keep]))
        total += int(np.sum(keep))
        gap = max(gap, float(jnp.max(jnp.abs(a - b)[keep])))
    print(f"merged vs unmerged: {agree}/{total} predictions agree, max |logit diff| {gap:.2e}")

    losses = [r["loss"] for r in result["records"] if r["split"] == "train"]
    rows = [
        ["task / method", f"{args.task} / LoRA qv r={args.rank} + head"],
        ["steps x batch", f"{steps} x {config.batch_size} (max length {config.max_length})"],
        [f"dev {result['metric']}", f"{result['score']:.4f}"],
        [
            "trainable parameters",
            f"{result['trainable']:,} of {result['base']:,} ({100 * result['trainable'] / result['base']:.2f}%)",
        ],
        ["adapter file / base model file", f"{adapter_size / 1024:.0f} KiB / {model_bytes / 2**20:.1f} MiB"],
        ["merged vs unmerged predictions", f"{agree}/{total} agree, max logit diff {gap:.1e}"],
        ["wall time (with compilation)", f"{result['seconds']:.0f} s"],
    ]
    report.write_markdown(table, "MiniLM LoRA fine-tune", report.markdown_table(["", ""], rows))
    report.plot_lines(plot, {"train loss": losses}, "log window (20 steps)", "loss", name)
    return {
        "score": result["score"],
        "agree": agree,
        "total": total,
        "gap": gap,
        "adapter_bytes": adapter_size,
        "losses": losses,
        "out": out,
    }


if __name__ == "__main__":
    main()
