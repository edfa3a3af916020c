"""Figures and the Markdown report of the VAE study (from the saved arrays only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy.stats import gaussian_kde

from collapse_jax.core import report as rep
from collapse_jax.core.runs import read_arrays, save_figure, write_text
from collapse_jax.core.statistics import chain_stats

plt = rep.pyplot()

METRICS = ("latent_spread", "class_entropy", "nelbo", "pixel_diversity")


def _diff(values: np.ndarray, a: int, b: int) -> tuple[float, float]:
    """Mean and standard error over seeds of ``values[:, b] - values[:, a]`` (paired by seed)."""
    st = chain_stats(values[:, b] - values[:, a])
    return float(st.mean), float(st.stderr)


def claims(arrays: dict, ops) -> list[dict]:
    """The report's claims, each a change from generation 1 to the last, paired by seed: the
    paper's four, and with curation or verification on, that the rewarded digit's (or the
    correct digits') share of the samples grows. ``ops``: the run's data operators."""
    last = int(arrays["generation"][-1])
    hist = arrays["class_hist"] / arrays["class_hist"].sum(-1, keepdims=True)
    values = {name: arrays[name] for name in METRICS}
    rows = [
        ("latent_spread", -1, "latent spread of samples (generation-1 encoder) falls"),
        ("class_entropy", -1, "class entropy of samples falls"),
        ("nelbo", +1, "test negative ELBO of real MNIST rises"),
        ("pixel_diversity", -1, "pixel diversity of samples falls"),
    ]
    if ops.curate is not None:
        values["rewarded_class_share"] = hist[..., ops.curate.reward.digit]
        rows.append(
            (
                "rewarded_class_share",
                +1,
                f"share of samples classified as the rewarded digit {ops.curate.reward.digit} rises",
            )
        )
    elif ops.verify is not None:
        classes = list(ops.verify.good.classes)
        values["correct_class_share"] = hist[..., classes].sum(-1)
        rows.append(("correct_class_share", +1, f"share of samples classified in {classes} rises"))
    out = []
    for name, direction, text in rows:
        first = np.asarray(chain_stats(values[name]).mean)  # over seeds, finite values only
        mean, se = _diff(values[name], 1, last) if last > 1 else (math.nan, math.nan)
        right = math.isfinite(mean) and mean * direction > 0
        significant = right and mean * direction > 2 * se
        out.append(
            {
                "claim": f"{text}, generation 1 → {last}",
                "metric": name,
                "first_generation": 1,
                "last_generation": last,
                "first": float(first[1]),
                "last": float(first[last]),
                "change": mean,
                "change_stderr": se,
                "expected_sign": direction,
                "agrees": bool(significant),
                "direction_only": bool(right and not significant),
            }
        )
    return out


def make_report(out: Path, summary: dict) -> None:
    a = read_arrays(out / "metrics.npz")
    gens = a["generation"]
    panels = []
    titles = {
        "latent_spread": "latent spread (std of generation-1 encoder means)",
        "class_entropy": "class entropy of samples (nats)",
        "nelbo": "test negative ELBO of real MNIST (nats/image)",
        "pixel_diversity": "mean pairwise pixel distance",
    }
    for name in METRICS:
        st = chain_stats(a[name])
        mean, se = np.asarray(st.mean), np.asarray(st.stderr)
        panels.append({"title": titles[name], "x": gens, "series": [{"mean": mean, "stderr": se}]})
    rep.curves_figure(out / "metrics.png", panels, ncols=2)

    # KDE of the generation-1 encoder's latent means (seed 0, all dimensions pooled).
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    cmap = plt.get_cmap("viridis")
    lm = a["latent_means"][0]  # (G + 2, N, d)
    grid = np.linspace(np.percentile(lm, 0.5), np.percentile(lm, 99.5), 300)
    for g in gens:
        color = cmap(g / max(gens[-1], 1))
        axes[0].plot(grid, gaussian_kde(lm[g].ravel())(grid), color=color, label=f"gen {g}")
        axes[1].plot(np.arange(1, lm.shape[-1] + 1), a["latent_std"][0, g], "o-", color=color)
    axes[0].set_title("KDE of latent means (all dimensions)")
    axes[0].set_xlabel("posterior mean")
    axes[0].legend(fontsize=7)
    axes[1].set_title("per-dimension spread")
    axes[1].set_xlabel("latent dimension")
    axes[1].set_ylabel("std of means")
    save_figure(fig, out / "latent_kde.png")

    # Class distribution (mean over seeds).
    frac = a["class_hist"] / a["class_hist"].sum(-1, keepdims=True)
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(gens) + 1.4))
    im = ax.imshow(frac.mean(0), aspect="auto", cmap="magma", vmin=0)
    ax.set_xticks(range(10))
    ax.set_yticks(range(len(gens)), [f"gen {g}" for g in gens])
    ax.set_xlabel("digit class (classifier)")
    fig.colorbar(im, ax=ax, label="fraction of samples")
    ax.set_title("class distribution of samples")
    save_figure(fig, out / "classes.png")

    # 8x8 sample grids (seed 0).
    grids = a["grid"][0]
    fig, axes = plt.subplots(1, len(gens), figsize=(2.2 * len(gens), 2.5), squeeze=False)
    for g, ax in zip(gens, axes[0], strict=True):
        tiles = grids[g]
        n = int(math.sqrt(len(tiles)))
        mosaic = tiles[: n * n].reshape(n, n, 28, 28).transpose(0, 2, 1, 3).reshape(n * 28, n * 28)
        ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255)
        ax.set_title("real" if g == 0 else f"gen {g}", fontsize=9)
        ax.axis("off")
    save_figure(fig, out / "samples.png")

    lines = [
        "# Recursive training of VAEs on MNIST",
        "",
        f"Data: {summary['data_source']}." + ("" if summary["is_mnist"] else " **Not MNIST.**"),
        f"Policy: {summary['policy']}; {summary['seeds']} seeds; "
        f"classifier test accuracy {summary['classifier_test_accuracy']:.4f}; "
        f"{summary['seconds']:.0f} s.",
        *rep.operators_lines(summary.get("operators", [])),
        "",
        "Generation 0 is real MNIST (test images), generation 1 the VAE trained on real images,",
        "generation n + 1 a new VAE trained on images of generation n. No closed-form theory",
        "exists here: the table checks the direction the paper reports, paired over seeds",
        "(agrees = right sign and |change| > 2 stderr).",
        "",
        "| claim | theory | Monte Carlo ± stderr | agrees? |",
        "|---|---|---|---|",
    ]
    for cl in summary["claims"]:
        sign = "falls" if cl["expected_sign"] < 0 else "rises"
        verdict = (
            "yes" if cl["agrees"] else ("direction only" if cl["direction_only"] else "**no**")
        )
        lines.append(
            f"| {cl['claim']} | {sign} | {rep.fmt(cl['first'])} → {rep.fmt(cl['last'])}"
            f" (change {rep.fmt(cl['change'])} ± {rep.fmt(cl['change_stderr'])}) | {verdict} |"
        )
    lines += ["", "| generation | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for i, g in enumerate(gens):
        cells = []
        for name in METRICS:
            m, s = summary[name]["mean"][i], summary[name]["stderr"][i]
            cells.append(f"{rep.fmt(float(m))} ± {rep.fmt(float(s))}")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        rep.figure_md("metrics.png", "Metrics per generation, mean ± 2 stderr over seeds."),
        rep.figure_md("latent_kde.png", "Generation-1 encoder means of samples (seed 0)."),
        rep.figure_md("classes.png", "Classes of generated digits (mean over seeds)."),
        rep.figure_md("samples.png", "Samples per generation (seed 0)."),
    ]
    write_text(out / "report.md", "\n".join(lines) + "\n")
