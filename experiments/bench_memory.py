"""Memory accounting: what adapters and training state should cost, against what is measured.

    python -m experiments.bench_memory            # MiniLM, batch 32, length 64
    python -m experiments.bench_memory --smoke

1. Adapter bytes: the saved adapter file and the tree, against 2 * n * d * r * 4 bytes for n adapted
   d x d matrices (plus the classifier head).
2. Training state: XLA's own accounting of the compiled step (arguments, outputs, temporaries) for full
   fine-tuning and LoRA, against parameters + gradients + Adam moments.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import jax

import lora_jax as lj
from experiments import report
from experiments.bench_train import spawn, tree_bytes, workload
from lora_jax import training

MIB = 2**20
QUANTIZED_KERNELS = {"minilm": r"bert/encoder/.*/kernel", "gpt2-small": r".*/(attention|mlp)/.*/kernel"}
"""The linear kernels of each workload that a quantized base holds in fewer bits (never embeddings or heads)."""


def compiled_memory(
    method: str,
    smoke: bool,
    name: str = "minilm",
    chunk: int | None = None,
    quantized: str | None = None,
    dropout: bool = True,
    recompute: bool | None = None,
) -> dict:
    """XLA's buffers for one compiled training step of ``workload(name)`` (MiniLM at 64 tokens, GPT-2 at 256).

    ``quantized`` names a format (``"nf4"``) for the linear kernels of a frozen base (QLoRA, `QUANTIZED_KERNELS`);
    ``dropout=False`` sets the model's dropout rates to zero; ``recompute`` is ``train_step``'s
    ``recompute_dequantized``.
    """
    length = (16 if smoke else 64) if name == "minilm" else (32 if smoke else 256)
    _, params, batch, spec, loss = workload(name, length, smoke, chunk=chunk, dropout=dropout)
    if quantized is not None:
        params = lj.quantize(params, [(QUANTIZED_KERNELS[name], quantized)])
    values = params
    if method == "full":
        spec = lj.LoraSpec([lj.trainable(".*")])
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = training.make_optimizer(training.TrainConfig(steps=100))
    state = jax.eval_shape(lambda v: training.init_state(jax.random.key(0), v, spec, tx), values)
    step = training.state_step(
        training.train_step(loss, spec, tx, factored=method != "full", recompute_dequantized=recompute)
    )
    memory = step.lower(state, params, batch).compile().memory_analysis()
    return {
        "spec": spec,
        "base_bytes": lj.quant.nbytes(values),
        "trainable_bytes": tree_bytes(state["lora"]),
        "optimizer_bytes": tree_bytes(state["opt_state"]),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "alias_bytes": getattr(memory, "alias_size_in_bytes", 0),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = parser.parse_args(argv)
    name = "bench_memory_smoke" if args.smoke else "bench_memory"
    (md,) = report.outputs(parser, args.results_dir, name, (".md",), args.overwrite)
    from tqdm import tqdm

    # 1. Adapter bytes.
    _, params, _, spec, _ = workload("minilm", 16, args.smoke)
    lora = lj.init(jax.random.key(0), params, spec)
    targets = [t for t in lj.plan(params, spec) if t.layout is not None]
    d, r = targets[0].layout.in_size, targets[0].rule.rank
    head = sum(t.trainable_size for t in lj.plan(params, spec) if t.layout is None)
    formula = 2 * len(targets) * d * r * 4 + head * 4
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = lj.save_adapter(Path(tmp) / "a.safetensors", params, lora, spec).stat().st_size
    rows = [
        [f"2 x n x d x r x 4 B (n={len(targets)}, d={d}, r={r}) + head {head} x 4 B", f"{formula:,}"],
        ["adapter tree (A, B and head arrays)", f"{lj.io.adapter_bytes(lora):,}"],
        ["adapter file (safetensors, with its spec signature)", f"{file_bytes:,}"],
    ]
    text = "## Adapter bytes\n\n" + report.markdown_table(["what", "bytes"], rows)

    # 2. Training state and step buffers.
    rows = []
    results = {}
    for method in ("full", "lora"):
        m = compiled_memory(method, args.smoke)
        results[method] = m
        grads = m["trainable_bytes"]  # one gradient per trainable scalar
        expected = (0 if method == "full" else m["base_bytes"]) + m["trainable_bytes"] + grads + m["optimizer_bytes"]
        rows.append(
            [
                method,
                f"{m['base_bytes'] / MIB:.1f}" if method != "full" else "0 (the trainable copy is the only copy)",
                f"{m['trainable_bytes'] / MIB:.2f}",
                f"{grads / MIB:.2f}",
                f"{m['optimizer_bytes'] / MIB:.2f}",
                f"{expected / MIB:.1f}",
                f"{m['argument_bytes'] / MIB:.1f}",
                f"{m['temp_bytes'] / MIB:.1f}",
            ]
        )
    headers = [
        "method",
        "frozen base MiB",
        "trainable MiB",
        "gradients MiB",
        "Adam moments MiB",
        "params + grads + moments MiB",
        "XLA arguments MiB",
        "XLA temporaries MiB",
    ]
    text += (
        f"\n\n## Training state, MiniLM, batch 32 x {16 if args.smoke else 64}\n\n"
        + report.markdown_table(headers, rows)
        + "\n\nXLA's arguments are the frozen base, the trainable state and the batch; its temporaries are the "
        "activations kept for the backward pass and the gradients' working buffers. The gradients of the "
        "trainable leaves are what separates the two methods besides the moments: full fine-tuning carries "
        "a gradient and two moments per parameter (16 bytes per parameter with the weight itself), LoRA per "
        "adapter entry only."
    )

    # 3. The decoder's LM loss: the whole [B, T, V] logits against chunks of them.
    chunk = 8 if args.smoke else 32
    rows, decoder = [], {}
    for method in ("full", "lora"):
        for size in (None, chunk):
            m = compiled_memory(method, args.smoke, "gpt2-small", size)
            decoder[(method, size)] = m["temp_bytes"]
            base = decoder[(method, None)]
            rows.append(
                [
                    method,
                    "whole logits" if size is None else f"chunks of {size} positions a row",
                    f"{m['temp_bytes'] / MIB:.0f}",
                    f"{m['temp_bytes'] / base:.2f}",
                ]
            )
    shape = "2 layers, width 64, vocabulary 512, batch 8 x 32" if args.smoke else "GPT-2 small shape, batch 8 x 256"
    text += (
        f"\n\n## The decoder's LM loss ({shape})\n\n"
        + report.markdown_table(["method", "LM loss", "XLA temporaries MiB", "vs whole logits"], rows)
        + "\n\n`training.causal_lm(models.causal_lm_apply_fn(model, head=False), chunk=...)` forms the logits a "
        "chunk of positions at a time and forms each again in the backward pass instead of keeping it; LoRA "
        "all-linear r=8. Whole, the float32 logits of 8 x 256 tokens over 50,257 words are 392 MiB, and their "
        "gradient as much again."
    )
    results["decoder"] = decoder

    # 4. Peak RSS of a training step, with and without handing back the heap compiling freed.
    rows, heap = [], {}
    for method in ("full", "lora-factored"):
        for release in (False, True):
            job = {"workload": "minilm", "length": 16 if args.smoke else 64, "method": method, "smoke": args.smoke}
            job |= {"repeats": 2, "dropout": False, "release_heap": release}
            heap[(method, release)] = spawn(job, "")["peak_rss_mib"]
            rows.append(
                [
                    method,
                    "release_host_memory() after compiling" if release else "none",
                    f"{heap[(method, release)]:.0f}",
                    f"{heap[(method, release)] / heap[(method, False)]:.2f}",
                ]
            )
    text += (
        "\n\n## Peak RSS of a MiniLM training step (dropout off), and the heap compiling left\n\n"
        + report.markdown_table(["method", "after compiling", "peak RSS MiB", "vs none"], rows)
        + "\n\nOne process per row (`bench_train`'s worker, 2 steps). XLA compiles on several threads, and glibc "
        "keeps what each freed in that thread's arena; `training.release_host_memory()` (glibc's `malloc_trim`, "
        "which `training.fit` calls after each compile) hands it back before the steps allocate their buffers."
    )
    results["heap"] = heap

    # 5. A quantized base: a product keeps the codes for the backward pass, not a float copy of its kernel.
    rows, qlora = [], {}
    cases = [("minilm", True), ("minilm", False), ("gpt2-small", False)]
    for name, dropout in tqdm(cases, desc="quantized bases"):
        for fmt, recompute in ((None, False), ("nf4", False), ("nf4", True)):
            m = compiled_memory("lora", args.smoke, name, quantized=fmt, dropout=dropout, recompute=recompute)
            qlora[(name, fmt, recompute, dropout)] = m
            rows.append(
                [
                    name,
                    "on" if dropout else "off",
                    "float32" if fmt is None else f"{fmt} linear kernels",
                    "-" if fmt is None else str(recompute),
                    f"{m['base_bytes'] / MIB:.1f}",
                    f"{m['argument_bytes'] / MIB:.1f}",
                    f"{m['temp_bytes'] / MIB:.1f}",
                    f"{(m['argument_bytes'] + m['temp_bytes']) / MIB:.1f}",
                ]
            )
    headers = [
        "workload",
        "dropout",
        "frozen base",
        "recompute_dequantized",
        "base MiB",
        "XLA arguments MiB",
        "XLA temporaries MiB",
        "arguments + temporaries MiB",
    ]
    flags = os.environ.get("XLA_FLAGS", "") or "(none)"
    text += (
        f"\n\n## A quantized base (QLoRA), LoRA step (`XLA_FLAGS`: `{flags}`)\n\n"
        + report.markdown_table(headers, rows)
        + "\n\nMiniLM: LoRA q,v r=8 + head, batch 32 x 64; GPT-2-small shape: LoRA all-linear r=8, batch 8 x 256. "
        "On the factored path each product of an activation and a quantized kernel keeps the kernel's codes for "
        "the backward pass and dequantizes next to the product in each pass (`quant.product.quantized_dot`; "
        "tested on the saved residuals), whatever `recompute_dequantized` says. That option makes the step "
        "dequantize again, under `jax.checkpoint`, the kernels read as arrays (none in these models); its "
        "default (None) is on for GPU and TPU and, on CPU, only under `MEMORY_SCHEDULER_FLAG`. The embeddings "
        "stay float32."
    )
    results["qlora"] = qlora
    print(text)
    report.write_markdown(md, "Memory accounting", text)
    return {"formula": formula, "tree": lj.io.adapter_bytes(lora), "file": file_bytes, **results}


if __name__ == "__main__":
    main()
