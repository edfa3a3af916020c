"""Report building blocks shared by every study: theory-vs-Monte-Carlo tables, curve plots with
error bands, Markdown assembly. Plots are drawn from saved arrays only."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collapse_jax.core import figures
from collapse_jax.core.runs import write_figure, write_json, write_text


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported on first use: a run whose figures
    are drawn by workers (:mod:`collapse_jax.core.figures`) never imports it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: A Monte Carlo value agrees with theory when it is within this many standard errors.
Z_AGREE = 4.0


@dataclass(frozen=True)
class Check:
    """One row of a theory-vs-Monte-Carlo table."""

    claim: str
    theory: float
    mc: float
    stderr: float
    rel_tol: float = 0.0  # allowed relative model error (approximations), on top of Z_AGREE·stderr

    @property
    def z(self) -> float:
        if self.stderr > 0:
            return (self.mc - self.theory) / self.stderr
        return 0.0 if self.mc == self.theory else math.inf

    @property
    def agrees(self) -> bool:
        if not (math.isfinite(self.mc) and math.isfinite(self.theory)):
            return False
        return abs(self.mc - self.theory) <= Z_AGREE * self.stderr + self.rel_tol * abs(self.theory)

    def as_dict(self) -> dict:
        return {
            "claim": self.claim,
            "theory": self.theory,
            "monte_carlo": self.mc,
            "stderr": self.stderr,
            "z": self.z,
            "rel_tol": self.rel_tol,
            "agrees": self.agrees,
        }


def fmt(x: float) -> str:
    """Compact number formatting for tables."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    ax = abs(x)
    if ax != 0 and (ax >= 1e5 or ax < 1e-3):
        return f"{x:.4e}"
    return f"{x:.5g}"


def checks_table(checks: Sequence[Check]) -> str:
    """Markdown table: claim | theory | Monte Carlo ± stderr | agrees?"""
    lines = [
        "| claim | theory | Monte Carlo ± stderr | agrees? |",
        "|---|---|---|---|",
    ]
    for c in checks:
        tol = f"{Z_AGREE:g}σ" + (f" + {c.rel_tol:.0%}" if c.rel_tol else "")
        verdict = "yes" if c.agrees else "**no**"
        lines.append(
            f"| {c.claim} | {fmt(c.theory)} | {fmt(c.mc)} ± {fmt(c.stderr)} "
            f"| {verdict} (z = {c.z:+.2f}, tol {tol}) |"
        )
    return "\n".join(lines)


def band(ax, x, mean, stderr, label=None, color=None, z: float = 2.0, **kw):
    """Plot a mean curve with a ±z·stderr band."""
    x, mean, stderr = (np.asarray(a, dtype=np.float64) for a in (x, mean, stderr))
    (line,) = ax.plot(x, mean, label=label, color=color, **kw)
    ok = np.isfinite(mean) & np.isfinite(stderr)
    ax.fill_between(
        x[ok], (mean - z * stderr)[ok], (mean + z * stderr)[ok], color=line.get_color(), alpha=0.25
    )
    return line


def subplots(path: str | Path, *args, **kwargs):
    """``pyplot().subplots(*args, **kwargs)`` for the figure the caller then saves at ``path``
    with :func:`~collapse_jax.core.runs.write_figure`; None where a figure worker's share is
    another figure (:mod:`collapse_jax.core.figures`): the caller skips building it."""
    if not figures.owns(path):
        return None
    return pyplot().subplots(*args, **kwargs)


def curves_figure(
    path: str | Path,
    panels: Sequence[dict],
    ncols: int = 2,
    title: str | None = None,
) -> Path:
    """A grid of panels. Each panel: ``{"title", "x", "series": [{"mean", "stderr", "label",
    "quantiles"}], "theory": [{"y", "label"}], "logy": bool, "logx": bool, "ylabel": str,
    "note": str}`` (the note is written across the panel, e.g. why it is empty); a
    series with ``quantiles`` (records × 10/50/90 %) also gets its median (dotted) and a light
    10–90 % band over chains. A figure worker whose share is another figure skips it
    without building it (:func:`subplots`)."""
    n = len(panels)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    made = subplots(path, nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    if made is None:
        return Path(path)
    fig, axes = made
    for ax, panel in zip(axes.flat, panels, strict=False):
        x = np.asarray(panel["x"], dtype=np.float64)
        for s in panel.get("series", []):
            xs = s.get("x", x)
            line = band(ax, xs, s["mean"], s["stderr"], label=s.get("label"))
            if s.get("quantiles") is not None:
                q = np.asarray(s["quantiles"], dtype=np.float64)
                color = line.get_color()
                ax.plot(xs, q[:, 1], ":", color=color, lw=1.2, label="median over chains")
                ax.fill_between(xs, q[:, 0], q[:, 2], color=color, alpha=0.1, label="10–90 %")
        for t in panel.get("theory", []):
            ax.plot(
                t.get("x", x),
                t["y"],
                "k--" if not t.get("style") else t["style"],
                lw=1.2,
                label=t.get("label", "theory"),
            )
        if panel.get("logy"):
            ax.set_yscale("log")
        if panel.get("logx"):
            ax.set_xscale("symlog", linthresh=1)
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel.get("xlabel", "generation"))
        if panel.get("ylabel"):
            ax.set_ylabel(panel["ylabel"])
        if panel.get("note"):  # why the panel shows (almost) nothing
            ax.text(0.5, 0.5, panel["note"], transform=ax.transAxes, ha="center", va="center",
                    fontsize=9, wrap=True)  # fmt: skip
            ax.set_xlim(x.min(), x.max())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return write_figure(fig, path)


def figure_md(name: str, caption: str) -> str:
    """Markdown for an embedded figure in the same run directory."""
    return f"![{caption}]({name})\n\n*{caption}*\n"


def figures_section(figures: Sequence[tuple[str, str]]) -> list[str]:
    """The report's closing "Figures" section (none for an in-memory run)."""
    if not figures:
        return []
    return ["## Figures", "", *(figure_md(name, caption) for name, caption in figures)]


# --------------------------------------------------------------------------------------------
# Sweeps


def run_sweep(module, config, field: str, values: list, out: Path, progress=None) -> dict:
    """Run one study per value (each into OUT/FIELD=VALUE) and overlay their curves.

    A study may provide ``run_sweep(config, field, values, out)`` that runs every value in one
    vmapped computation when shapes allow (returning None otherwise); other sweeps loop, each
    value's chains still vmapped and sharded as usual.
    """
    summaries = {}
    vmapped = None
    if hasattr(module, "run_sweep"):
        vmapped = module.run_sweep(config, field, values, out, progress=progress)
    if vmapped is not None:
        summaries = dict(zip(values, vmapped, strict=True))
    else:
        for v in values:
            cfg = module.validate(dataclasses.replace(config, **{field: v}))
            summaries[v] = module.run(cfg, out / f"{field}={v}", progress=progress)
    common = None
    for s in summaries.values():
        keys = {
            k
            for k, val in s.items()
            if isinstance(val, dict) and {"generation", "mean", "stderr"} <= set(val)
        }
        common = keys if common is None else common & keys
    common = sorted(common or [])
    panels = []
    for key in common:
        series = []
        for v, s in summaries.items():
            ser = s[key]
            series.append(
                {
                    "x": ser["generation"],
                    "mean": _floats(ser["mean"]),
                    "stderr": _floats(ser["stderr"]),
                    "label": f"{field} = {v}",
                }
            )
        panels.append({"title": key, "x": series[0]["x"], "series": series})
    how = "one vmapped computation" if vmapped is not None else "one run per value"
    lines = [f"# Sweep over {field}", "", f"Study `{module.NAME}`, values {values} ({how}).", ""]
    if panels:
        curves_figure(out / "sweep.png", panels, ncols=3)
        lines.append(figure_md("sweep.png", f"Metrics for each {field} (±2 stderr bands)."))
    for v in values:
        lines.append(f"- [{field} = {v}]({field}={v}/report.md)")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    result = {"sweep": field, "values": values, "runs": {str(v): f"{field}={v}" for v in values}}
    write_json(out / "summary.json", result)
    return result


def _floats(values):
    out = []
    for v in values:
        if isinstance(v, str):
            v = float(v)
        out.append(v)
    return out


def operators_lines(described: list[str]) -> list[str]:
    """The report's lines on the active data operators (``Operators.describe()``), or none."""
    if not described:
        return []
    return [
        "",
        "Data operators (between sampling and the next fit):",
        *(f"- {d}" for d in described),
    ]
