"""Subspace similarity of learned adapters (paper section 7.2).

phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), with U the left
singular vectors of A ``[in, r]`` (the paper's right singular vectors of its
``A [r, in]``). Compared: r=8 vs r=64 of the same layer, and r=8 from two seeds.

    python -m experiments.subspace --full
    python -m experiments.subspace --smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from experiments import report
from experiments.finetune import FULL_STEPS, RunConfig
from experiments.sweep import DEFAULT_CACHE, run_cached


def left_singular(a: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``[in, r]`` of A's column space, by singular value."""
    u, _, _ = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    return u


def similarity(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """``phi[i-1, j-1]`` for ``i <= r1``, ``j <= r2``; each entry in [0, 1]."""
    u1, u2 = left_singular(a1), left_singular(a2)
    overlap = (u1.T @ u2) ** 2  # [r1, r2]
    cumulative = overlap.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, u1.shape[1] + 1)[:, None]
    j = np.arange(1, u2.shape[1] + 1)[None, :]
    return cumulative / np.minimum(i, j)


def adapters(result: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in load_file(str(Path(result["dir"]) / "adapter.safetensors")).items() if k.endswith("/a")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--layer", type=int, default=None, help="encoder layer to show (default: the middle one)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        base = RunConfig(task="sst2", targets="qv", steps=2, max_length=32, train_limit=64, eval_limit=32)
        small, large = 1, 8
    else:
        base = RunConfig(task="sst2", targets="qv", steps=FULL_STEPS["sst2"])
        small, large = 8, 64
    from dataclasses import replace

    runs = {
        "small": run_cached(replace(base, rank=small), args.cache),
        "large": run_cached(replace(base, rank=large), args.cache),
        "seed1": run_cached(replace(base, rank=small, seed=1), args.cache),
    }
    mats = {k: adapters(v) for k, v in runs.items()}
    layer = 3 if args.layer is None else args.layer
    rows, maps = [], {}
    for proj in ("query", "value"):
        key = f"bert/encoder/layer_{layer}/attention/{proj}/kernel/a"
        a_small, a_large, a_seed = mats["small"][key], mats["large"][key], mats["seed1"][key]
        vs_large = similarity(a_small, a_large)
        vs_seed = similarity(a_small, a_seed)
        maps[f"{proj}: r={small} vs r={large}"] = vs_large
        maps[f"{proj}: r={small} seed 0 vs seed 1"] = vs_seed
        in_dim = a_small.shape[0]
        rows.append(
            [
                proj,
                f"{vs_large[0, 0]:.3f}",
                f"{vs_large[-1, -1]:.3f}",
                f"{vs_seed[-1, -1]:.3f}",
                f"{small / in_dim:.3f} / {min(small, large) / in_dim:.3f}",
            ]
        )
    headers = [
        "W",
        f"phi(1,1) r={small} vs r={large}",
        f"phi({small},{large})",
        f"phi({small},{small}) seeds",
        "random-subspace expectation (r/in)",
    ]
    text = report.markdown_table(headers, rows) + f"\n\nLayer {layer}, SST-2, LoRA on query and value."
    print(text)
    name = "subspace_smoke" if args.smoke else "subspace"
    report.write_markdown(args.results_dir / f"{name}.md", "Subspace similarity of learned A matrices", text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 3.6))
    for ax, (title, values) in zip(axes, maps.items()):
        image = ax.imshow(values, vmin=0, vmax=1, aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("j")
        ax.set_ylabel("i")
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(args.results_dir / f"{name}.png", dpi=100)
    plt.close(fig)
    return {"maps": maps, "rows": rows}


if __name__ == "__main__":
    main()
