"""The Gaussian study's figures, drawn from ``metrics.npz`` only (a light module: the figure
workers of :mod:`collapse_jax.core.figures` import it without JAX)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from collapse_jax.core import report as rep
from collapse_jax.core.runs import read_arrays


def _panel(ax, g, a, name, title, theory=(), logy=True):
    """One log-axis panel: Monte Carlo mean ± 2 stderr and theory curves (generation >= 1)."""
    keep = g >= 1
    x = g[keep]
    mean, se = a[f"{name}_mean"][keep], a[f"{name}_stderr"][keep]
    (line,) = ax.plot(x, mean, label="Monte Carlo mean")
    lo = np.maximum(mean - 2 * se, mean * 1e-3) if logy else mean - 2 * se
    ax.fill_between(x, lo, mean + 2 * se, color=line.get_color(), alpha=0.25)
    for key, label, style in theory:
        if key in a:
            ax.plot(x, a[key][keep], style, lw=1.2, label=label)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("generation n")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def make_figures(path: Path) -> list[tuple[str, str]]:
    """Figures drawn from metrics.npz only. A figure worker whose share is another figure
    skips building it (``rep.subplots`` gives None)."""
    a = read_arrays(path / "metrics.npz")
    g = a["generation"]
    # Two figures of two panels rather than one of four: the figure workers
    # (core/figures.py) each draw whole figures, and the four-panel figure took 1.4-1.9 s
    # in one worker while the other drew the one-panel figure in 0.2-0.4 s.
    out = path / "gaussian_metrics.png"
    if (made := rep.subplots(out, 1, 2, figsize=(10.5, 3.6))) is not None:
        _metrics(made, a, g, out)
    figs = [
        (
            "gaussian_metrics.png",
            "W₂² and the mean's squared error over generations (log axes; bands ±2 stderr)",
        )
    ]
    out = path / "gaussian_covariance.png"
    if (made := rep.subplots(out, 1, 2, figsize=(10.5, 3.6))) is not None:
        _covariance(made, a, g, out)
    figs.append(
        (
            "gaussian_covariance.png",
            "Trace and log-determinant of Σ_n over generations (log axes; bands ±2 stderr)",
        )
    )
    out = path / "gaussian_collapse.png"
    if (made := rep.subplots(out, figsize=(5.5, 3.6))) is not None:
        _collapsed(made, a, g, out)
    figs.append(("gaussian_collapse.png", "Fraction of chains whose covariance has collapsed"))
    return figs


def _metrics(made, a, g, out: Path) -> None:
    fig, axes = made
    top = {
        "w2_sq": (
            "W₂²(generation n, D0)",
            [
                ("theory_w2_sq", "exact E W₂²", "k--"),
                ("theory_w2_sq_first_order", "(3/2)σ₀² Σ 1/M_i", "k:"),
            ],
        ),
        "mean_sq_error": (
            "‖μ_n − μ_0‖²",
            [
                ("theory_mean_sq_error", "exact E‖μ_n − μ_0‖²", "k--"),
                ("theory_mean_sq_error_known_cov", "Σ known: (tr Σ₀/M) Σ 1/i², i ≤ n", "C3-."),
                ("theory_mean_sq_error_limit", "(π²/6) tr Σ₀ / M (Dey & Donoho)", "k:"),
                ("theory_mean_sq_error_exact_limit", "limit, Σ refitted", "C2:"),
            ],
        ),
    }
    for ax, (name, (title, theory)) in zip(axes, top.items(), strict=True):
        _panel(ax, g, a, name, title, theory)
    rep.write_figure(fig, out)


def _covariance(made, a, g, out: Path) -> None:
    fig, axes = made
    ax = axes[0]
    _panel(
        ax,
        g,
        a,
        "trace_cov",
        "tr Σ_n",
        [
            ("theory_trace_cov", "exact E tr Σ_n", "k--"),
            ("theory_trace_cov_limit", "lim E tr Σ_n (accumulate)", "C2:"),
        ],
    )
    keep = g >= 1
    ax.plot(g[keep], np.exp(a["log_trace_cov_mean"][keep]), label="exp E log tr Σ_n (typical)")
    if "theory_log_det_cov" in a and a["dim"] == 1:
        ax.plot(
            g[keep],
            np.exp(a["theory_log_det_cov"][keep]),
            "k-.",
            lw=1.2,
            label="exp of exact E log σ_n²",
        )
    ax.legend(fontsize=7)
    _panel(
        axes[1],
        g,
        a,
        "log_det_cov",
        "log det Σ_n (→ −∞: Σ_n → 0 a.s.)",
        [("theory_log_det_cov", "exact E log det Σ_n", "k--")],
        logy=False,
    )
    rep.write_figure(fig, out)


def _collapsed(made, a, g, out: Path) -> None:
    fig, ax = made
    keep = g >= 1
    for j, thr in enumerate(a["thresholds"]):
        ax.plot(g[keep], a["below_fraction"][keep, j], label=f"tr Σ_n < {thr:g} tr Σ_0")
    ax.plot(g[keep], a["numerically_collapsed"][keep], "k:", label="numerically collapsed")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("generation n")
    ax.set_ylabel("fraction of chains")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    rep.write_figure(fig, out)
