"""Training cost: full fine-tuning vs LoRA through combine vs LoRA through the factored path.

    python -m experiments.bench_train            # the table in experiments/results/bench_train.md
    python -m experiments.bench_train --smoke    # tiny shapes, seconds

Each measurement runs in its own process (so peak RSS is its own): compile time
apart, then the median of repeated steps; trainable and optimizer-state bytes;
XLA's own accounting of the step's temporary buffers. ``--rounds N`` runs every
configuration N times, in turn, and reports the median over rounds, so that a slow
stretch of the machine falls on all of them alike. Workloads: MiniLM with LoRA on
query/value (batch 32, lengths 64 and 128) and a GPT-2-small-shaped decoder with
LoRA on every linear kernel (batch 8, length 256); full fine-tuning, LoRA through
``combine``, LoRA factored, and LoRA factored with every block rematerialized under
XLA:CPU's memory scheduler (:data:`LOW_MEMORY`; on MiniLM also with the matmul outputs kept,
:data:`SAVE_DOTS`). The XLA:CPU settings of :data:`CANDIDATE_FLAGS` are timed first on the
MiniLM LoRA step, over the same rounds, and the fastest is used for every row. HF PEFT on PyTorch CPU, eager and
under ``torch.compile``, runs as the baseline when a Python with torch, transformers
and peft is given (``--peft-python``, default ``.venv-ref/bin/python``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from experiments import assets, report
from lora_jax.models import MEMORY_SCHEDULER_FLAG

HERE = Path(__file__).resolve().parent
METHODS = ("full", "lora-combine", "lora-factored")
LOW_MEMORY = {"method": "lora-factored", "remat": "nothing_saveable", "scheduler": "memory"}
"""The low-memory LoRA row: every block rematerialized, XLA:CPU's memory-minimizing scheduler (``bench_remat``)."""
SAVE_DOTS = {"method": "lora-factored", "remat": "dots_saveable", "scheduler": "memory"}
"""The MiniLM row keeping the matmul outputs and recomputing the rest, under the memory scheduler: in ``bench_remat``
the policy that saved memory at no cost in time."""
LM_CHUNK = 32
"""Decoder rows with a chunked LM loss form the logits of this many positions of each row at a time (``"chunk"``)."""
CANDIDATE_FLAGS = {
    "default": "",
    "legacy runtime": "--xla_cpu_use_thunk_runtime=false",
    "no fusion emitters": "--xla_cpu_use_fusion_emitters=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "no YNNPACK fusions (Eigen matmuls)": "--xla_cpu_experimental_ynn_fusion_type=",
}


def tree_bytes(tree) -> int:
    import jax

    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape"))


def workload(
    name: str, length: int, smoke: bool, remat: str | None = None, dropout: bool = True, chunk: int | None = None
):
    """(apply_fn, params, batch, lora spec, loss_fn) for a named workload; ``loss_fn(params, batch, rng)``.

    ``remat`` names the blocks' rematerialization policy (``lora_jax.models.REMAT_POLICIES``), None for none;
    ``dropout=False`` sets the model's dropout rates to zero; ``chunk`` (decoders) forms the LM loss's logits
    that many positions at a time (``lora_jax.training.causal_lm``), None all at once.
    """
    import dataclasses

    import jax

    from lora_jax import models, training

    rng = np.random.default_rng(0)
    if name == "minilm":
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
        model = model.clone(remat=remat)
        if not dropout:
            off = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}
            model = model.clone(config=dataclasses.replace(model.config, **off))
        batch_size = 32
        vocab = model.config.vocab_size
        batch = {
            "input_ids": rng.integers(1, vocab, (batch_size, length)).astype(np.int32),
            "attention_mask": np.ones((batch_size, length), np.int32),
            "token_type_ids": np.zeros((batch_size, length), np.int32),
            "labels": rng.integers(0, 2, batch_size).astype(np.int32),
            "weights": np.ones(batch_size, np.float32),
        }

        apply_fn = models.classifier_apply_fn(model)

        spec = models.lora_spec(model, "qv", rank=8, alpha=16, head=True)
        loss = training.classification(apply_fn).loss
    else:
        config = models.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512) if smoke else models.GPT2Config()
        if not dropout:
            config = dataclasses.replace(config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = models.GPT2LMHeadModel(config, remat=remat)
        params = model.init(jax.random.key(0), np.ones((1, 8), np.int32))["params"]
        batch_size = 8
        batch = {
            "input_ids": rng.integers(0, config.vocab_size, (batch_size, length)).astype(np.int32),
            "loss_mask": np.ones((batch_size, length), np.float32),  # every next token counts
        }

        apply_fn = models.causal_lm_apply_fn(model)
        loss = training.causal_lm(models.causal_lm_apply_fn(model, head=chunk is None), chunk).loss
        spec = models.lora_spec(model, "all-linear", rank=8, alpha=16)
    return apply_fn, params, batch, spec, loss


def time_steps(step, state, params, batch, repeats: int):
    """Run ``step`` once to warm up, then ``repeats`` times; return the last state and loss and the seconds each."""
    import jax

    state, loss_value = step(state, params, batch)
    jax.block_until_ready(loss_value)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, loss_value = step(state, params, batch)
        jax.block_until_ready(loss_value)
        times.append(time.perf_counter() - start)
    return state, loss_value, times


def worker(job: dict) -> dict:
    """One measurement, in this process."""
    import jax

    import lora_jax as lj
    from lora_jax import training

    _, params, batch, spec, loss = workload(
        job["workload"],
        job["length"],
        job["smoke"],
        remat=job.get("remat"),
        dropout=job.get("dropout", True),
        chunk=job.get("chunk"),
    )
    method = job["method"]
    values = params  # what the trainable state starts from
    if method == "full":
        spec = lj.LoraSpec([lj.trainable(".*")])
        # The trainable copy is the only copy: the frozen tree holds shapes, not arrays.
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = training.make_optimizer(training.TrainConfig(steps=1000))
    state = training.init_state(jax.random.key(0), values, spec, tx)
    del values
    step = training.state_step(training.train_step(loss, spec, tx, factored=method == "lora-factored"))
    start = time.perf_counter()
    step = step.lower(state, params, batch).compile()  # tracing (and the factored rewrite) + XLA
    compile_s = time.perf_counter() - start
    if job.get("release_heap", True):  # as training.fit does after each compile
        training.release_host_memory()
    memory = step.memory_analysis()
    temp_bytes = getattr(memory, "temp_size_in_bytes", float("nan")) if memory is not None else float("nan")
    state, loss_value, times = time_steps(step, state, params, batch, job["repeats"])
    return {
        **job,
        "compile_s": compile_s,
        "step_ms": 1000 * float(np.median(times)),
        "step_ms_all": [1000 * t for t in times],
        "trainable_bytes": tree_bytes(state["lora"]),
        "optimizer_bytes": tree_bytes(state["opt_state"]),
        "xla_temp_bytes": temp_bytes,
        "peak_rss_mib": report.peak_rss_mib(),
        "loss": float(loss_value),
    }


DROPOUT_OFF = ", dropout off"
"""What a row's name ends with when the models' dropout is off (``"dropout": False`` in its job)."""


def row_key(job: dict) -> tuple[str, int, str]:
    """``(workload, length, method)``: the table row a job's measurement belongs to."""
    off = DROPOUT_OFF if job.get("dropout") is False else ""
    if "model_path" in job:  # a PEFT job
        name = f"PEFT {job['method']}" + (" + torch.compile" if job["compile"] else "")
    elif "remat" in job:
        name = f"{job['method']}, remat {job['remat']}, {job['scheduler']} scheduler"
    else:
        name = job["method"]
    chunked = f", LM loss in chunks of {job['chunk']}" if job.get("chunk") else ""
    return (job["workload"], job["length"], name + chunked + off)


def over_rounds(found: list[dict]) -> dict:
    """Merge one configuration's rounds: the median step time (``step_ms_rounds`` keeps each), the largest peak RSS."""
    step_ms = [r["step_ms"] for r in found]
    return {
        **found[0],
        "step_ms": float(np.median(step_ms)),
        "step_ms_rounds": step_ms,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in found),
    }


def spawn(job: dict, flags: str, python: str = sys.executable, module: str = "experiments.bench_train") -> dict:
    """Run ``job`` in ``python -m module --worker JOB`` from the repository root; return its JSON line."""
    env = {**os.environ, "XLA_FLAGS": flags}
    command = [python, "-m", module, "--worker", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--peft-python", default=str(HERE.parent / ".venv-ref" / "bin" / "python"))
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    parser.add_argument(
        "--shapes", default="minilm:64,minilm:128,gpt2-small:256", help="workload:length pairs, comma-separated"
    )
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, in turn")
    parser.add_argument("--no-flag-search", action="store_true", help="time XLA's default settings only")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    parser.add_argument("--name", default=None, help="results file name (default bench_train, or bench_train_smoke)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    name = args.name or ("bench_train_smoke" if args.smoke else "bench_train")
    md, png = report.outputs(parser, args.results_dir, name, (".md", ".png"), args.overwrite)

    from tqdm import tqdm

    repeats = args.repeats or (2 if args.smoke else 8)
    shapes = [(name, int(length)) for name, length in (pair.split(":") for pair in args.shapes.split(","))]
    candidates = {"default": ""} if args.no_flag_search else CANDIDATE_FLAGS
    if args.smoke:
        shapes, candidates = [("minilm", 16)], {"default": ""}

    # XLA:CPU settings: time the MiniLM LoRA step under each, once per round in turn (as the rows below), and keep
    # the one with the lowest median for the rest.
    probe = {
        "workload": shapes[0][0],
        "length": shapes[0][1],
        "method": "lora-factored",
        "smoke": args.smoke,
        "repeats": repeats,
    }
    probes: dict[str, list[dict]] = {label: [] for label in candidates}
    for _ in tqdm(range(args.rounds), desc="XLA flags, rounds"):
        for label, flags in candidates.items():
            probes[label].append(spawn(probe, flags))
    flag_rows, best_flags, best_ms = [], "", float("inf")
    for label, flags in candidates.items():
        merged = over_rounds(probes[label])
        flag_rows.append(
            [
                label,
                f"`{flags or '(none)'}`",
                f"{merged['step_ms']:.0f}",
                f"{min(merged['step_ms_rounds']):.0f}-{max(merged['step_ms_rounds']):.0f}",
                f"{merged['compile_s']:.1f}",
                f"{merged['peak_rss_mib']:.0f}",
            ]
        )
        if merged["step_ms"] < best_ms:
            best_ms, best_flags = merged["step_ms"], flags

    # Every configuration runs once per round, each in its own process, in the same order: a slow
    # stretch of the machine then falls on all of them alike, and each row's median is over rounds.
    jobs = [
        {"workload": w, "length": n, "method": m, "smoke": args.smoke, "repeats": repeats}
        for w, n in shapes
        for m in METHODS
    ] + [{"workload": w, "length": n, **LOW_MEMORY, "smoke": args.smoke, "repeats": repeats} for w, n in shapes]
    jobs += [
        {"workload": w, "length": n, **SAVE_DOTS, "smoke": args.smoke, "repeats": repeats}
        for w, n in shapes
        if w == "minilm"
    ]
    # Decoders: the LM loss a chunk of positions at a time, never the whole [B, T, V] logits.
    jobs += [
        {"workload": w, "length": n, "method": m, "chunk": LM_CHUNK, "smoke": args.smoke, "repeats": repeats}
        for w, n in shapes
        if w.startswith("gpt2")
        for m in ("full", "lora-factored")
    ]
    # The issue's own baseline had every dropout off: the first shape runs that way too, in every implementation.
    first, first_length = shapes[0]
    jobs += [
        {
            "workload": first,
            "length": first_length,
            "method": m,
            "smoke": args.smoke,
            "repeats": repeats,
            "dropout": False,
        }
        for m in ("full", "lora-factored")
    ]
    peft_jobs = []
    if Path(args.peft_python).exists() and not args.smoke:
        peft_jobs = [
            {
                "workload": "minilm",
                "length": n,
                "method": m,
                "compile": compiled,
                "repeats": repeats,
                "threads": os.cpu_count(),
                "model_path": str(assets.minilm_path()),
            }
            for n in sorted({length for name, length in shapes if name == "minilm"})
            for m in ("full", "lora")
            for compiled in (False, True)
        ]
        if first == "minilm":
            peft_jobs += [{**job, "dropout": False} for job in peft_jobs if job["length"] == first_length]
            peft_jobs = [job for job in peft_jobs if not (job.get("dropout") is False and job["compile"])]
    else:
        print("PEFT baseline skipped: no Python with torch, transformers and peft at --peft-python")
    runs: dict[tuple, list[dict]] = {}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for job in tqdm(jobs + peft_jobs, desc="configurations", leave=False):
            if job in peft_jobs:
                try:
                    result = spawn(job, "", args.peft_python, "experiments.peft_baseline")
                except RuntimeError as err:
                    print(f"PEFT baseline skipped: {err}")
                    peft_jobs = []
                    continue
            else:
                memory = job.get("scheduler") == "memory"
                result = spawn(job, f"{best_flags} {MEMORY_SCHEDULER_FLAG}" if memory else best_flags)
            runs.setdefault(row_key(job), []).append(result)
    by_key = {key: over_rounds(found) for key, found in runs.items()}
    results = [by_key[row_key(job)] for job in jobs]
    peft = [by_key[row_key(job)] for job in peft_jobs]

    rows = []
    for w, n in shapes:
        for key in [k for k in by_key if k[:2] == (w, n)]:
            r = by_key[key]
            full = by_key[(w, n, "full" + (DROPOUT_OFF if key[2].endswith(DROPOUT_OFF) else ""))]
            jax_row = "compile_s" in r
            rows.append(
                [
                    f"{w} L={n}",
                    key[2],
                    f"{r['step_ms']:.0f}",
                    f"{min(r['step_ms_rounds']):.0f}-{max(r['step_ms_rounds']):.0f}",
                    f"{r['step_ms'] / full['step_ms']:.2f}",
                    f"{r['compile_s']:.1f}" if jax_row else "-",
                    f"{r['peak_rss_mib']:.0f}",
                    f"{r['peak_rss_mib'] / full['peak_rss_mib']:.2f}",
                    f"{r['xla_temp_bytes'] / 2**20:.0f}" if jax_row else "-",
                    f"{r['trainable_bytes'] / 2**20:.2f}" if jax_row else "-",
                    f"{r['optimizer_bytes'] / 2**20:.2f}" if jax_row else "-",
                ]
            )
    comparisons = []
    for (w, n, method), r in by_key.items():
        if not method.startswith("lora-factored"):
            continue
        off = DROPOUT_OFF if method.endswith(DROPOUT_OFF) else ""
        alike = (w, n, "full" + method.removeprefix("lora-factored"))  # e.g. both with the chunked LM loss
        full = by_key.get(alike, by_key[(w, n, "full" + off)])
        versus = [("own full fine-tuning", full)] + [
            (peer, by_key[(w, n, peer)])
            for peer in (f"PEFT lora{off}", f"PEFT lora + torch.compile{off}")
            if (w, n, peer) in by_key
        ]
        for peer, other in versus:
            comparisons.append(
                [
                    f"{w} L={n}",
                    method,
                    peer,
                    f"{r['step_ms'] / other['step_ms']:.2f}",
                    f"{r['peak_rss_mib'] / other['peak_rss_mib']:.2f}",
                ]
            )
    headers = [
        "workload",
        "method",
        "step ms (median)",
        "range over rounds",
        "vs full (JAX)",
        "compile s",
        "peak RSS MiB",
        "RSS vs full",
        "XLA temp MiB",
        "trainable MiB",
        "optimizer MiB",
    ]
    text = (
        f"Batch 32 for MiniLM (LoRA q,v r=8 + head), batch 8 for the GPT-2-small-shaped decoder (LoRA on all "
        f"linear kernels, r=8); AdamW; the models' own dropout (0.1) on in every row but those marked "
        f"`dropout off` (every dropout rate zero, in every implementation: the issue's own baseline); LoRA "
        f"dropout off. "
        f"Each row: the median over {args.rounds} rounds of the median of {repeats} steps after compilation, "
        f"every configuration in its own process once per round, in turn. PEFT rows: Hugging Face PEFT on "
        f"PyTorch CPU, eager and under `torch.compile`. XLA flags chosen: `{best_flags or '(none)'}`.\n\n"
        + report.markdown_table(headers, rows)
        + "\n\n## lora_jax's LoRA steps (factored) against the others in this run\n\n"
        + report.markdown_table(["workload", "LoRA", "against", "step time ratio", "peak RSS ratio"], comparisons)
        + "\n\n## XLA:CPU settings (MiniLM LoRA factored step)\n\n"
        + f"Each setting's MiniLM LoRA step (in its own process), the median over {args.rounds} rounds.\n\n"
        + report.markdown_table(
            ["setting", "XLA_FLAGS", "step ms", "range over rounds", "compile s", "peak RSS MiB"], flag_rows
        )
    )
    print(text)
    report.write_markdown(md, "Training step cost", text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{w}\nL={n}" for w, n in shapes]
    for i, m in enumerate(METHODS):
        x = np.arange(len(shapes)) + 0.25 * i
        axes[0].bar(x, [by_key[(w, n, m)]["step_ms"] for w, n in shapes], 0.25, label=m)
        axes[1].bar(x, [by_key[(w, n, m)]["peak_rss_mib"] for w, n in shapes], 0.25, label=m)
    for ax, title in zip(axes, ("step time (ms)", "peak RSS (MiB)")):
        ax.set_xticks(np.arange(len(shapes)) + 0.25, labels)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    report.save_figure(fig, png)
    return {"results": results, "peft": peft, "flags": best_flags}


if __name__ == "__main__":
    main()
