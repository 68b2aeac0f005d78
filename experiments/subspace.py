"""What the learned update is (paper sections 7.2 and 7.3), on MiniLM fine-tuned on SST-2.

Section 7.2, subspace similarity of learned adapters:
phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), with U the left
singular vectors of A ``[in, r]`` (the paper's right singular vectors of its
``A [r, in]``). Compared: r=8 vs r=64 of the same layer, and r=8 from two seeds.

Section 7.3, how the update relates to the pretrained weight: with U, V the top-r
left and right singular vectors of a learned dW (``[in, out]``), ||U^T W0 V||_F is
how much of W0 lies in dW's directions; it is set against W0's own top-r directions
and random r-dimensional ones, and the amplification factor ||dW||_F / ||U^T W0 V||_F
says how much dW magnifies what it finds in W0 (the paper: about 21.5 at r=4 for
GPT-3's Wq, much less at r=64). Then the singular-value spectrum of full
fine-tuning's dW = W_ft - W0 on the same matrices: how much of its energy (sum of
squared singular values) the top 1, 4, 8, 16, 64 directions hold.

    python -m experiments.subspace --full
    python -m experiments.subspace --smoke
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

import lora_jax as lj
from experiments import report
from experiments.finetune import FULL_STEPS, RunConfig, load_model
from experiments.sweep import DEFAULT_CACHE, run_cached
from lora_jax.paths import nested_get

ENERGY_TOP = (1, 4, 8, 16, 64)
RANDOM_DRAWS = 20


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


def top_singular(m: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``U [in, r]``, ``S [r]``, ``V [out, r]``: the top-``r`` singular triplets of ``m [in, out]``."""
    u, s, vh = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    return u[:, :r], s[:r], vh[:r].T


def projection_norm(w0: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """Return ``||U^T W0 V||_F``: the part of ``w0 [in, out]`` in the directions ``U [in, r]``, ``V [out, r]``."""
    return float(np.linalg.norm(u.T @ w0.astype(np.float64) @ v))


def random_orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    """Return ``Q [n, r]`` with orthonormal columns spanning a uniformly random r-dimensional subspace."""
    q, upper = np.linalg.qr(rng.normal(size=(n, r)))
    return q * np.sign(np.diag(upper))  # Haar: fix the signs QR leaves arbitrary


def amplification(w0: np.ndarray, delta: np.ndarray, r: int, rng: np.random.Generator) -> dict[str, float]:
    """Return the paper's Table 7 numbers for one matrix and rank ``r``.

    Args:
      w0: the pretrained weight ``[in, out]``.
      delta: the learned update ``[in, out]`` (for LoRA, ``s * A @ B``).
      r: how many of ``delta``'s singular directions (and of the references') to take.
      rng: draws the random subspaces.

    Returns:
      ``delta_norm`` ||dW||_F; ``w0_norm`` ||W0||_F; ``delta_dirs`` ||U^T W0 V||_F with U, V the top-r
      singular vectors of dW; ``w0_dirs`` the same with W0's own top-r vectors; ``random_dirs`` its mean
      over :data:`RANDOM_DRAWS` random orthonormal U, V; ``factor`` ||dW||_F / ``delta_dirs``.
    """
    u, _, v = top_singular(delta, r)
    uw, _, vw = top_singular(w0, r)
    n_in, n_out = w0.shape
    random_dirs = [
        projection_norm(w0, random_orthonormal(rng, n_in, r), random_orthonormal(rng, n_out, r))
        for _ in range(RANDOM_DRAWS)
    ]
    delta_dirs = projection_norm(w0, u, v)
    delta_norm = float(np.linalg.norm(delta.astype(np.float64)))
    return {
        "rank": r,
        "delta_norm": delta_norm,
        "w0_norm": float(np.linalg.norm(w0.astype(np.float64))),
        "delta_dirs": delta_dirs,
        "w0_dirs": projection_norm(w0, uw, vw),
        "random_dirs": float(np.mean(random_dirs)),
        "factor": delta_norm / delta_dirs if delta_dirs > 0 else float("inf"),  # dW in directions W0 lacks
    }


def truncated(m: np.ndarray, r: int) -> np.ndarray:
    """Return the best rank-``r`` approximation of ``m``: its top-``r`` singular triplets."""
    u, s, v = top_singular(m, r)
    return (u * s) @ v.T


def energy(m: np.ndarray, tops: tuple[int, ...] = ENERGY_TOP) -> dict[int, float]:
    """Return, for each ``k`` in ``tops``, the share of ``m``'s squared singular values held by its top ``k``."""
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    cumulative = np.cumsum(s**2) / np.sum(s**2)
    return {k: float(cumulative[min(k, len(s)) - 1]) for k in tops}


def matrix(kernel: Any) -> np.ndarray:
    """Return a BERT kernel as the matrix ``[in, out]`` it applies (DenseGeneral kernels take their input first)."""
    kernel = np.asarray(kernel, dtype=np.float64)
    return kernel.reshape(kernel.shape[0], -1)


def deltas(result: dict, params: Any, paths: list[str]) -> dict[str, np.ndarray]:
    """Return ``merge(params, trained) - params`` at each kernel of ``paths`` as ``[in, out]``, for a cached run.

    The run's ``adapter.safetensors`` holds LoRA's factors or full fine-tuning's trained leaves, with its spec;
    merging gives ``W0 + s A@B`` or ``W_ft``, so one path serves both.
    """
    file = Path(result["dir"]) / "adapter.safetensors"
    spec = lj.LoraSpec.from_file(file)
    merged = lj.merge(params, lj.load_adapter(file, params, spec), spec)
    out = {}
    for path in paths:
        keys = tuple(path.split("/"))
        out[path] = matrix(nested_get(merged, keys)) - matrix(nested_get(params, keys))
    return out


def kernel_path(layer: int, proj: str) -> str:
    return f"bert/encoder/layer_{layer}/attention/{proj}/kernel"


def similarity_section(runs: dict[str, dict], layer: int, small: int, large: int) -> tuple[str, dict]:
    """Section 7.2's table and phi maps for one layer's query and value."""
    mats = {k: adapters(runs[k]) for k in ("small", "large", "seed1")}
    rows, maps = [], {}
    for proj in ("query", "value"):
        key = f"{kernel_path(layer, proj)}/a"
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
    return text, maps


def amplification_section(
    w0: dict[str, np.ndarray], lora: dict[int, dict[str, np.ndarray]], full: dict[str, np.ndarray], seed: int = 0
) -> tuple[str, list[dict]]:
    """Section 7.3's Table 7 for every matrix: each LoRA rank's dW, and full fine-tuning's cut to the same ranks.

    Full fine-tuning's dW has full rank; its rows take its best rank-r part, so that ‖dW‖_F and the factor are
    of the update in those r directions, as LoRA's are.
    """
    rng = np.random.default_rng(seed)
    rows, records = [], []
    for path in w0:
        sources = [(f"LoRA r={r}", lora[r][path], r) for r in sorted(lora)]
        sources += [(f"full FT, rank-{r} part", truncated(full[path], r), r) for r in sorted(lora)]
        for label, delta, r in sources:
            numbers = amplification(w0[path], delta, r, rng)
            records.append({"path": path, "source": label, **numbers})
            rows.append(
                [
                    short(path),
                    label,
                    f"{numbers['delta_norm']:.3f}",
                    f"{numbers['delta_dirs']:.3f}",
                    f"{numbers['w0_dirs']:.2f}",
                    f"{numbers['random_dirs']:.3f}",
                    f"{numbers['delta_dirs'] / numbers['random_dirs']:.1f}",
                    f"{numbers['w0_norm']:.2f}",
                    f"{numbers['factor']:.1f}",
                ]
            )
    headers = [
        "W",
        "dW",
        "‖dW‖_F",
        "‖UᵀW0V‖_F, dW's top-r U, V",
        "W0's own top-r",
        f"random (mean of {RANDOM_DRAWS})",
        "dW's / random",
        "‖W0‖_F",
        "amplification ‖dW‖_F / ‖UᵀW0V‖_F",
    ]
    return report.markdown_table(headers, rows), records


def amplification_summary(records: list[dict]) -> list[str]:
    """One line per source of dW: the range over the matrices of its factor and of its overlap with W0 over random."""
    lines = []
    for source in dict.fromkeys(r["source"] for r in records):
        rows = [r for r in records if r["source"] == source]
        factors = [r["factor"] for r in rows]
        ratios = [r["delta_dirs"] / r["random_dirs"] for r in rows]
        lines.append(
            f"- {source}: amplification {min(factors):.1f}–{max(factors):.1f}; dW's directions hold "
            f"{min(ratios):.1f}–{max(ratios):.1f}× as much of W0 as random ones ({len(rows)} matrices)"
        )
    return lines


def spectrum_section(
    w0: dict[str, np.ndarray], full: dict[str, np.ndarray], lora_large: dict[str, np.ndarray], large: int
) -> str:
    """The energy share of the top singular values: full FT's dW, LoRA r=large's dW, W0, a Gaussian matrix."""
    rows = []
    shape = next(iter(w0.values())).shape
    gaussian = np.random.default_rng(0).normal(size=shape)
    for path in w0:
        for label, m in (("full FT dW", full[path]), (f"LoRA r={large} dW", lora_large[path]), ("W0", w0[path])):
            shares = energy(m)
            rows.append([short(path), label, *(f"{100 * shares[k]:.1f}" for k in ENERGY_TOP)])
    shares = energy(gaussian)
    rows.append(["-", f"Gaussian {shape[0]}x{shape[1]} (reference)", *(f"{100 * shares[k]:.1f}" for k in ENERGY_TOP)])
    headers = ["W", "matrix", *(f"top {k} (% energy)" for k in ENERGY_TOP)]
    return report.markdown_table(headers, rows)


def short(path: str) -> str:
    """``bert/encoder/layer_3/attention/query/kernel`` -> ``layer 3 query``."""
    parts = path.split("/")
    return f"layer {parts[2].split('_')[-1]} {parts[4]}"


def plot_spectra(path: Path, w0: dict[str, np.ndarray], full: dict[str, np.ndarray]) -> None:
    """Normalized singular values and cumulative energy of full FT's dW (solid) and W0 (dotted) per matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    gaussian = np.random.default_rng(0).normal(size=next(iter(w0.values())).shape)
    for i, name in enumerate(w0):
        color = f"C{i}"
        for m, style, label in ((full[name], "-", f"{short(name)}: full FT dW"), (w0[name], ":", None)):
            s = np.linalg.svd(m, compute_uv=False)
            k = np.arange(1, len(s) + 1)
            left.semilogy(k, s / s[0], style, color=color, label=label)
            right.semilogx(k, np.cumsum(s**2) / np.sum(s**2), style, color=color, label=label)
    s = np.linalg.svd(gaussian, compute_uv=False)
    k = np.arange(1, len(s) + 1)
    left.semilogy(k, s / s[0], "--", color="black", label="Gaussian (reference)")
    right.semilogx(k, np.cumsum(s**2) / np.sum(s**2), "--", color="black", label="Gaussian (reference)")
    left.set_xlabel("k")
    left.set_ylabel("σ_k / σ_1")
    left.set_title("singular values (dotted: W0)")
    right.set_xlabel("k")
    right.set_ylabel("share of ‖·‖_F² in the top k")
    right.set_title("cumulative energy (dotted: W0)")
    right.legend(fontsize=7)
    fig.tight_layout()
    report.save_figure(fig, path)


def plot_similarity(path: Path, maps: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 3.6))
    image = None
    for ax, (title, values) in zip(axes, maps.items()):
        image = ax.imshow(values, vmin=0, vmax=1, aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("j")
        ax.set_ylabel("i")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8)
    report.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument(
        "--layer", type=int, default=None, help="encoder layer of section 7.2 (default: the middle one)"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS)
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = parser.parse_args(argv)
    name = "subspace_smoke" if args.smoke else "subspace"
    md, png, spectrum_png = report.outputs(
        parser, args.results_dir, name, (".md", ".png", "_spectrum.png"), args.overwrite
    )
    if args.smoke:
        base = RunConfig(task="sst2", targets="qv", steps=2, max_length=32, train_limit=64, eval_limit=32)
        small, large, ranks = 1, 8, (1, 8)
    else:
        base = RunConfig(task="sst2", targets="qv", steps=FULL_STEPS["sst2"])
        small, large, ranks = 8, 64, (4, 8, 64)
    runs = {
        "small": run_cached(replace(base, rank=small), args.cache),
        "large": run_cached(replace(base, rank=large), args.cache),
        "seed1": run_cached(replace(base, rank=small, seed=1), args.cache),
    }
    by_rank = {small: runs["small"], large: runs["large"]}
    for r in ranks:
        if r not in by_rank:
            by_rank[r] = run_cached(replace(base, rank=r), args.cache)
    full_run = run_cached(replace(base, method="full"), args.cache)

    layer = 3 if args.layer is None else args.layer
    similarity_text, maps = similarity_section(runs, layer, small, large)

    # Section 7.3 on query and value of the middle and the last layer.
    _, params, _ = load_model(2, base.seed)
    last = max(int(k.split("_")[-1]) for k in params["bert"]["encoder"] if k.startswith("layer_"))
    paths = [kernel_path(i, proj) for i in sorted({layer, last}) for proj in ("query", "value")]
    w0 = {p: matrix(nested_get(params, tuple(p.split("/")))) for p in paths}
    lora = {r: deltas(by_rank[r], params, paths) for r in ranks}
    full = deltas(full_run, params, paths)
    amplification_text, records = amplification_section(w0, lora, full)
    spectrum_text = spectrum_section(w0, full, lora[large], large)

    steps = f"{base.steps} steps of batch {base.batch_size}, max_length {base.max_length}"
    body = "\n\n".join(
        [
            f"MiniLM on SST-2, {steps}; LoRA on query and value (alpha {base.alpha:g}), learning rate "
            f"{base.with_defaults().learning_rate:g}; full fine-tuning at "
            f"{replace(base, method='full').with_defaults().learning_rate:g}.",
            "## 7.2: subspace similarity of learned A matrices\n\n" + similarity_text,
            f"![phi maps]({name}.png)",
            "## 7.3: how dW relates to W0 (the paper's Table 7)\n\n"
            "U, V: the top-r singular vectors of dW (for LoRA, of s·A@B; for full fine-tuning, of the best rank-r "
            "part of W_ft − W0). The amplification factor is ‖dW‖_F / ‖UᵀW0V‖_F. The paper, GPT-3's Wq at r=4: "
            "‖UᵀW0V‖_F 0.32 against 0.02 for random directions (16×), factor 21.5; at r=64 about 1.9.\n\n"
            + amplification_text
            + "\n\n"
            + "\n".join(amplification_summary(records)),
            "## 7.3: is full fine-tuning's update low-rank?\n\n"
            "Share of the squared singular values (%) held by the top k directions; the matrices are "
            f"{w0[paths[0]].shape[0]}x{w0[paths[0]].shape[1]}.\n\n" + spectrum_text,
            f"![spectra]({name}_spectrum.png)",
        ]
    )
    print(body)
    report.write_markdown(md, "What the learned update is (paper 7.2 and 7.3)", body)
    plot_similarity(png, maps)
    plot_spectra(spectrum_png, w0, full)
    return {"maps": maps, "amplification": records, "energy": {p: energy(full[p]) for p in paths}}


if __name__ == "__main__":
    main()
