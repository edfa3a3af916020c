"""The kde study's figures, drawn from the run directory's saved arrays only (a light module:
the figure workers of :mod:`collapse_jax.core.figures` import it without JAX)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from collapse_jax.core import report as rep
from collapse_jax.core.runs import read_arrays, read_json


def make_figures(path: Path) -> list[tuple[str, str]]:
    """Draw every figure from the saved arrays; return (file, caption) pairs."""
    a = read_arrays(path / "metrics.npz")
    summary = read_json(path / "summary.json")
    g = a["generation"]

    def s(name):
        rows = np.isfinite(a[f"{name}_mean"])
        return {
            "x": g[rows],
            "mean": a[f"{name}_mean"][rows],
            "stderr": a[f"{name}_stderr"][rows],
            "label": "Monte Carlo ± 2 se",
        }

    panels = []
    for name, title in (
        ("pairwise_sq_distance", "mean ‖Xᵢ − Xⱼ‖² over pairs of the generation-n sample"),
        ("ancestors", "distinct D0 ancestors in the generation-n sample"),
        ("heldout_nll", "held-out NLL of real data under model n"),
        ("w2", "W₂² (generation-n sample vs held-out real points)"),
        ("bandwidth", "bandwidth h of model n"),
    ):
        ser = s(name)
        theory_lines = []
        if f"theory_{name}" in a:
            theory_lines.append({"y": a[f"theory_{name}"], "label": "closed form"})
        if f"reference_{name}" in a:
            h1 = summary.get("reference_bandwidth")
            theory_lines.append(
                {"y": a[f"reference_{name}"], "label": f"fixed-h closed form, h = {h1:.4g}"}
            )
        panels.append({"title": title, "x": g, "series": [ser], "theory": theory_lines})
    rep.curves_figure(path / "metrics.png", panels, ncols=3)
    figs = [
        (
            "metrics.png",
            "Mean over chains of each metric (±2 standard-error bands); dashed: the closed forms "
            "of theory/kde.md where they hold (replace, no fresh data; the pairwise form needs a "
            "fixed h — a bandwidth rule is drawn against the fixed-h curve at its generation-1 "
            "bandwidth).",
        )
    ]

    sg = a["snapshot_generation"]
    n = len(sg)
    made = rep.subplots(path / "snapshots.png", 1, n, figsize=(3.2 * n, 3.0), squeeze=False)
    if made is not None:  # else a figure worker's share is another figure
        fig, axes = made
        for ax, gen, pts, w in zip(
            axes.flat, sg, a["snapshot_points"], a["snapshot_weights"], strict=True
        ):
            p = pts[w > 0]
            ax.scatter(p[:, 0], p[:, 1] if p.shape[1] > 1 else np.zeros(len(p)), s=3, alpha=0.6)
            ax.set_title(f"generation {gen}", fontsize=9)
            ax.tick_params(labelsize=7)
        fig.suptitle("the generation-n sample of chain 0 (first two coordinates)", fontsize=10)
        rep.write_figure(fig, path / "snapshots.png")
    figs.append(("snapshots.png", "Samples of chain 0 (generation 0: the D0 sample)."))
    return figs
