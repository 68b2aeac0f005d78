"""Where one training step's time goes: by XLA op kind and by model part.

    python -m experiments.profile_step                                   # MiniLM LoRA q,v, batch 32 x 64
    python -m experiments.profile_step --workload gpt2-small --length 256 --method full
    python -m experiments.profile_step --smoke                           # tiny shapes, seconds

The step is the one ``experiments.bench_train`` times (same workloads and
methods). It is compiled with Flax's named scopes on, traced with
``jax.profiler`` over a few steps, and every XLA op the trace records is
attributed twice: to its kind (the op name with its numbering dropped:
``ynn_fusion``, ``copy_bitcast``, ...) and to the model part its JAX source
sits in (read from the op's ``op_name`` metadata in the compiled HLO).
Writes ``experiments/results/profile_<workload>_<method>_<label>.md``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import numpy as np

from experiments import bench_train, report

PARTS = (
    ("optimizer", r"/optimizer/"),
    ("loss", r"/loss/"),
    ("norms", r"norm"),
    ("embeddings", r"embeddings|embed/"),
    ("attention projections", r"attention/(query|key|value|out|qkv)(/|$)"),
    ("attention core", r"attention"),
    ("MLP", r"mlp"),
    ("head", r"classifier|pooler|head|attend"),
)
"""``(part, regex)`` tried in order against an op's ``op_name``; the first match names its part."""

_OP_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")
_NUMBERING = re.compile(r"[.\-_]?\d+$")


def op_names(hlo_text: str) -> dict[str, str]:
    """Return ``{HLO instruction name: op_name metadata}`` from a compiled module's text."""
    names = {}
    for line in hlo_text.splitlines():
        match = _OP_LINE.match(line)
        if match:
            names[match.group(1)] = match.group(2)
    return names


def part_of(op_name: str) -> str:
    """Return the model part an ``op_name`` (a JAX name stack) belongs to, or ``other``."""
    text = op_name.lower()
    for part, pattern in PARTS:
        if re.search(pattern, text):
            return part
    return "other"


def kind_of(hlo_op: str) -> str:
    """Return an op's kind: its name without the numbering XLA adds (``fusion.12`` -> ``fusion``)."""
    name = hlo_op
    while True:
        stripped = _NUMBERING.sub("", name)
        if stripped == name:
            return name
        name = stripped


def trace_events(directory: Path, module_prefix: str) -> list[dict]:
    """Return the complete events of XLA ops of modules named ``module_prefix*`` in a ``jax.profiler`` trace."""
    files = sorted(directory.glob("**/*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"{directory}: jax.profiler wrote no *.trace.json.gz")
    with gzip.open(files[-1]) as handle:
        data = json.load(handle)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [
        e
        for e in events
        if e.get("ph") == "X"
        and "hlo_op" in (e.get("args") or {})
        and str(e["args"].get("hlo_module", "")).startswith(module_prefix)
    ]


def profile(job: dict) -> dict:
    """Compile, time and trace one step; return the per-kind and per-part tables (ms per step)."""
    import flax.linen as nn
    import jax

    import lora_jax as lj
    from lora_jax import training

    nn.enable_named_call()  # this process only: name each module's ops for attribution
    _, params, batch, spec, loss = bench_train.workload(job["workload"], job["length"], job["smoke"])
    values = params
    if job["method"] == "full":
        spec = lj.LoraSpec([lj.trainable(".*")])
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = training.make_optimizer(training.TrainConfig(steps=1000))
    state = training.init_state(jax.random.key(0), values, spec, tx)
    del values
    step = training.state_step(training.train_step(loss, spec, tx, factored=job["method"] == "lora-factored"))
    compiled = step.lower(state, params, batch).compile()
    names = op_names(compiled.as_text())
    state, value, times = bench_train.time_steps(compiled, state, params, batch, job["repeats"])
    traced = job["traced"]
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=False):
            for _ in range(traced):
                state, value = compiled(state, params, batch)
                jax.block_until_ready(value)
        events = trace_events(Path(directory), "jit_advance")
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_part: dict[str, float] = collections.defaultdict(float)
    by_pair: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for event in events:
        op = event["args"]["hlo_op"]
        ms = float(event["dur"]) / 1000 / traced
        kind, part = kind_of(op), part_of(names.get(op, ""))
        by_kind[kind] += ms
        counts[kind] += 1
        by_part[part] += ms
        by_pair[f"{part} | `{kind}`"] += ms
    return {
        **job,
        "step_ms": 1000 * float(np.median(times)),
        "op_ms": sum(by_kind.values()),
        "by_kind": dict(by_kind),
        "counts": {k: v // traced for k, v in counts.items()},
        "by_part": dict(by_part),
        "by_pair": dict(by_pair),
    }


def tables(result: dict, top: int) -> str:
    """Return the markdown of one profile: the step time, then ms by part and by op kind."""
    total = result["op_ms"]
    parts = sorted(result["by_part"].items(), key=lambda kv: -kv[1])
    kinds = sorted(result["by_kind"].items(), key=lambda kv: -kv[1])[:top]
    pairs = sorted(result["by_pair"].items(), key=lambda kv: -kv[1])[:top]
    text = (
        f"Step median {result['step_ms']:.0f} ms over {result['repeats']} steps; the trace of "
        f"{result['traced']} steps attributes {total:.0f} ms per step to XLA ops (ops on the two cores can overlap, "
        "and the runtime's own time is not an op).\n\n## By model part\n\n"
        + report.markdown_table(
            ["part", "ms per step", "share"], [[p, f"{ms:.1f}", f"{ms / total:.0%}"] for p, ms in parts]
        )
        + f"\n\n## By XLA op kind (top {top})\n\n"
        + report.markdown_table(
            ["op kind", "ops per step", "ms per step", "share"],
            [[f"`{k}`", str(result["counts"][k]), f"{ms:.1f}", f"{ms / total:.0%}"] for k, ms in kinds],
        )
        + f"\n\n## By model part and op kind (top {top})\n\n"
        + report.markdown_table(
            ["part", "op kind", "ms per step", "share"],
            [[*pair.split(" | "), f"{ms:.1f}", f"{ms / total:.0%}"] for pair, ms in pairs],
        )
    )
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("minilm", "gpt2-small"), default="minilm")
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--method", choices=bench_train.METHODS, default="lora-factored")
    parser.add_argument("--label", default="current", help="names the result file (e.g. before / after)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--traced", type=int, default=None, help="steps under the profiler (default 3)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    args = parser.parse_args(argv)
    length = args.length or (16 if args.smoke else (64 if args.workload == "minilm" else 256))
    job = {
        "workload": args.workload,
        "length": length,
        "method": args.method,
        "smoke": args.smoke,
        "repeats": args.repeats or (2 if args.smoke else 10),
        "traced": args.traced or (1 if args.smoke else 3),
    }
    name = f"profile_{args.workload}_{args.method}_{args.label}" + ("_smoke" if args.smoke else "")
    (path,) = report.outputs(parser, args.results_dir, name, (".md",), args.overwrite)
    result = profile(job)
    text = f"{args.workload} L={length}, {args.method}.\n\n" + tables(result, args.top)
    print(text)
    report.write_markdown(path, f"Profile of one training step: {args.workload}, {args.method}", text)
    return result


if __name__ == "__main__":
    main()
