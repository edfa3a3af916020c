"""The regression study's figures, drawn from the run directory's saved arrays only (a light module:
the figure workers of :mod:`collapse_jax.core.figures` import it without JAX)."""

from __future__ import annotations

from pathlib import Path

from collapse_jax.core import report as rep
from collapse_jax.core.runs import read_arrays


def make_figures(path: Path) -> list[tuple[str, str]]:
    """Figures drawn from metrics.npz only."""
    a = read_arrays(path / "metrics.npz")
    g = a["generation"]
    keep = g >= 1
    theory = []
    if "theory_excess_risk" in a:
        theory.append({"y": a["theory_excess_risk"][keep], "label": "closed form"})
    if "theory_excess_risk_given_design" in a:
        theory.append(
            {"y": a["theory_excess_risk_given_design"][keep], "label": "exact given the designs"}
        )
    if "theory_excess_risk_floor" in a:
        theory.append(
            {"y": a["theory_excess_risk_floor"][keep], "label": "p₂²‖Δ‖²_Σ floor", "style": "k-."}
        )
    if "theory_excess_risk_limit" in a:
        theory.append(
            {"y": a["theory_excess_risk_limit"][keep], "label": "π²/6 limit", "style": "k:"}
        )

    def s(name):
        return [
            {
                "mean": a[f"{name}_mean"][keep],
                "stderr": a[f"{name}_stderr"][keep],
                "quantiles": a[f"{name}_quantiles"][keep],
            }
        ]

    rep.curves_figure(
        path / "regression.png",
        [
            {
                "title": "test excess risk ‖ŵ_n − w*‖²_Σ",
                "x": g[keep],
                "series": [{**s("excess_risk")[0], "label": "Monte Carlo mean ± 2 se"}],
                "theory": theory,
            },
            {"title": "‖ŵ_n − w*‖²", "x": g[keep], "series": s("param_error")},
            {
                "title": "training loss (mean squared residual)",
                "x": g[keep],
                "series": s("train_loss"),
                "theory": [{"y": a["theory_train_loss"][keep], "label": "σ²(T − d)/T"}]
                if "theory_train_loss" in a
                else [],
            },
        ],
        ncols=3,
    )
    return [
        (
            "regression.png",
            "Excess risk, parameter error and training loss per generation (mean ± 2 stderr; "
            "dotted: median, light band: 10–90 % of chains; dashed: closed forms).",
        )
    ]
