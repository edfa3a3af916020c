"""The discrete study's figures and report (drawn from the saved run directory)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from collapse_jax.core import report as rep
from collapse_jax.core.runs import RunDir, read_arrays, read_json

if TYPE_CHECKING:
    from collapse_jax.families.discrete.study import Config


def all_alive(fraction, chains: int) -> dict:
    """The series of the fraction of chains whose model keeps every state of p0 alive (where
    KL(p0 ‖ p_n) is finite: once no chain does, that panel has nothing left to show), with its
    binomial standard error over ``chains``."""
    f = np.asarray(fraction, np.float64)
    return {
        "mean": f,
        "stderr": np.sqrt(f * (1.0 - f) / chains),
        "label": "every p0 state alive (KL(p0 ‖ p_n) < ∞)",
    }


def infinite_note(g, fraction) -> str | None:
    """What the KL(p0 ‖ p_n) panel says when fewer than two generations have a chain where it
    is finite (a line needs two points): by which recorded generation it is infinite in every
    chain."""
    f = np.asarray(fraction)
    if np.count_nonzero(f > 0) >= 2:
        return None
    return (
        f"infinite in every chain by generation {int(g[np.argmax(f == 0)])}:\n"
        "each chain has lost a state of p0"
    )


def make_figures(path: Path) -> list[tuple[str, str]]:
    """Draw every figure from the saved arrays; return (file, caption) pairs."""
    a = read_arrays(path / "metrics.npz")
    summary = read_json(path / "summary.json")
    g = a["generation"]
    figs = []

    def s(name, label=None):
        return {
            "mean": a[f"{name}_mean"],
            "stderr": a[f"{name}_stderr"],
            "label": label or "Monte Carlo",
        }

    het_theory = (
        [{"y": a["theory_heterozygosity"], "label": "exact E[Het_n]"}]
        if "theory_heterozygosity" in a
        else []
    )
    sup_theory = []
    if "theory_support_size" in a:
        sup_theory.append({"y": a["theory_support_size"], "label": "exact (marginal chains)"})
    if "theory_support_feller" in a:
        sup_theory.append(
            {
                "y": a["theory_support_feller"],
                "label": "Feller approx. Σ 1−e^{−2Mp/n}",
                "style": "g:",
            }
        )
        sup_theory.append(
            {"y": a["theory_support_upper_bound"], "label": "upper bound", "style": "r-."}
        )
    rep.curves_figure(
        path / "theory.png",
        [
            {
                "title": "heterozygosity Het_n = 1 − Σp²",
                "x": g,
                "series": [s("heterozygosity")],
                "theory": het_theory,
                "logy": True,
            },
            {
                "title": "support size (states alive)",
                "x": g,
                "series": [s("support_size")],
                "theory": sup_theory,
                "logy": True,
            },
        ],
    )
    figs.append(
        (
            "theory.png",
            "Heterozygosity and support size: Monte Carlo (±2 stderr band) against the closed forms.",
        )
    )
    rep.curves_figure(
        path / "metrics.png",
        [
            {"title": "entropy H(p_n) [nats]", "x": g, "series": [s("entropy")]},
            {"title": "total variation to p0", "x": g, "series": [s("total_variation")]},
            {"title": "KL(p_n ‖ p0)", "x": g, "series": [s("kl_model_p0")]},
            {
                "title": "KL(p0 ‖ p_n) over chains where finite (how many: last panel)",
                "x": g,
                "series": [s("kl_p0_model")],
                "note": infinite_note(g, a["kl_p0_model_finite_fraction"]),
            },
            {
                "title": "p0-mass of states still alive (tail mass kept)",
                "x": g,
                "series": [s("tail_mass_kept")],
            },
            {
                "title": "fraction of chains",
                "x": g,
                "series": [
                    s("is_delta", "a delta now"),
                    s("absorbed_ever", "a delta by n (ever)"),
                    all_alive(a["kl_p0_model_finite_fraction"], summary["chains"]),
                ],
            },
        ],
        ncols=3,
    )
    figs.append(("metrics.png", "Per-generation metrics, mean over chains with ±2 stderr bands."))
    panels = [
        {
            "title": title,
            "x": g,
            "series": [s(name)],
            "theory": (
                [{"y": a[f"theory_{name}"], "label": "exact (two-class chain)"}]
                if f"theory_{name}" in a
                else []
            ),
        }
        for name, title in (
            ("good_mass", "mass on the verifier's correct states"),
            ("reward", "mean reward E_{p_n}[r]"),
            ("exp_reward", "E_{p_n}[e^{r − max r}] (non-decreasing in expectation)"),
        )
        if f"{name}_mean" in a
    ]
    if panels:
        rep.curves_figure(path / "operators.png", panels, ncols=3)
        figs.append(("operators.png", "What the data operators act on, per generation."))

    made = rep.subplots(path / "absorption.png", 1, 2, figsize=(10.5, 3.6))
    if made is not None:  # else a figure worker's share is another figure
        _absorption(made, a, summary, path / "absorption.png")
    figs.append(("absorption.png", "Where and when chains are absorbed."))
    return figs


def _absorption(made, a, summary: dict, out: Path) -> None:
    """Where (the absorbing state against p0) and when chains are absorbed."""
    fig, (ax1, ax2) = made
    p0 = np.asarray(summary["p0"])
    freq = np.asarray(summary["absorbed_state_freq"])
    idx = np.arange(len(p0))
    ax1.bar(idx - 0.2, p0, 0.4, label="p0 (theory)")
    ax1.bar(idx + 0.2, freq, 0.4, label="absorbed here (MC)")
    ax1.set_xlabel("state")
    ax1.set_title(
        f"absorbing state ({summary['absorbed_fraction']:.1%} of chains absorbed)", fontsize=10
    )
    ax1.legend(fontsize=8)
    t = a["absorbed_at"][a["absorbed_at"] >= 0]
    if t.size:
        ax2.hist(t, bins=50, color="C2")
    ax2.set_xlabel("absorption generation")
    ax2.set_title("absorption time distribution", fontsize=10)
    rep.write_figure(fig, out)


def write_report(run_dir: RunDir, config: Config, summary: dict, figures, seconds: float) -> None:
    rows = [
        rep.Check(
            **{k: c[k] for k in ("claim", "theory", "stderr", "rel_tol")}, mc=c["monte_carlo"]
        )
        for c in summary["checks"]
    ]
    lines = [
        "# Discrete resampling study",
        "",
        f"K = {summary['states']} states, p0 = `{config.p0}`, M = {config.samples} "
        f"({summary['schedule']}), {config.chains} chains × {config.generations} generations, "
        f"method `{summary['method']}`"
        + (" (auto)" if config.method == "auto" else "")
        + f", policy {summary['policy']}, seed {config.seed}.",
        *rep.operators_lines(summary["operators"]),
        f"Simulation: {summary['seconds']:.2f} s ({summary['chain_generations_per_second']:.3g} "
        f"chain-generations/s); report written in {seconds:.1f} s.",
        "",
        f"Absorbed chains: {summary['absorbed_fraction']:.2%} (censored at generation "
        f"{config.generations}: {summary['censored_fraction']:.2%}); mean absorption generation "
        f"{rep.fmt(summary['absorption_time_mean'])} ± {rep.fmt(summary['absorption_time_stderr'])} "
        "over the absorbed chains only (biased low when chains are censored); restricted mean "
        f"E[min(T, G)] = {rep.fmt(summary['absorption_time_restricted_mean'])} ± "
        f"{rep.fmt(summary['absorption_time_restricted_stderr'])} over all chains; median "
        + (
            f"{summary['absorption_time_median']:g}."
            if summary["absorption_time_median"] is not None
            else f"> {config.generations} (half or more censored)."
        ),
        "",
        "## Theory against Monte Carlo",
        "",
        rep.checks_table(rows) if rows else _no_rows(summary),
        "",
        *rep.figures_section(figures),
    ]
    run_dir.write_report("\n".join(lines))


def _no_rows(summary: dict) -> str:
    """Why the theory table is empty."""
    if summary["operators"]:
        return (
            "No closed form applies to these operators here: the exact rows cover curation and "
            "verification that see two classes of states, under replace with a constant "
            'M ≤ 2,000 (theory/operators.md, "Two classes").'
        )
    return "No closed form applies to this policy."
