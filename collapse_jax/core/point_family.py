"""User-defined families whose data are points: give ``fit``, ``sample`` and ``metrics`` and get
every data policy, schedule, sweep, the runner and a report (config.json, metrics.npz,
summary.json, figures, report.md with theory checks when a closed form is given).

The kernel is built from the shared pieces only: :class:`collapse_jax.core.policies.PointBuffer`
with :func:`~collapse_jax.core.policies.new_batch` / :func:`~collapse_jax.core.policies.next_buffer`
for the policies and :func:`collapse_jax.core.loop.run_generations` for the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.core import operators
from collapse_jax.core import report as rep
from collapse_jax.core.loop import Family, GenInput, run_generations
from collapse_jax.core.policies import (
    PointBuffer,
    Policy,
    Schedule,
    check_loop_fields,
    initial_buffer,
    new_batch,
    next_buffer,
)
from collapse_jax.core.runs import RunDir, read_arrays, series
from collapse_jax.core.statistics import stats_arrays
from collapse_jax.numerics.random import seed_key


@dataclasses.dataclass(frozen=True, eq=False)
class PointFamily:
    """A model family whose data are points (arrays with a leading point axis).

    All functions are pure JAX and written for one chain; points of weight 0 are padding.
    """

    name: str  # used in reports
    fit: Callable[[jax.Array, jax.Array], Any]  # (x, w) -> model: fit to the points x, weights w
    sample: Callable[[jax.Array, Any, int], jax.Array]  # (key, model, n) -> n points
    metrics: Callable[[Any], dict]  # model -> {name: scalar}, recorded per generation
    d0: Any  # the original model; D0 = sample(·, d0, ·) and generation 0's metrics
    original: Callable[[jax.Array, int], jax.Array] | None = None  # D0 sampler, if not d0's
    # Closed forms: (generations, sizes M_0..M_G, policy) -> {metric: expected mean per generation}
    theory: Callable[[np.ndarray, np.ndarray, Policy], dict] | None = None
    description: str = ""


@dataclasses.dataclass(frozen=True)
class PointConfig(operators.OperatorFields):
    """The shared settings of a point-family run (every policy, schedule and size, and the
    data operators curate and verify of :class:`collapse_jax.core.operators.OperatorFields`)."""

    samples: int = 100  # M_0: points per generation (the schedule's first size)
    chains: int = 1024  # independent chains, vmapped and sharded
    generations: int = 100  # G fitted models
    policy: str = "replace"  # replace | accumulate | accumulate-subsample | mix:A,B,G
    fresh_fraction: float = 0.0  # γ: fraction of every batch drawn fresh from D0
    schedule: str = "constant"  # sample sizes M_i (constant, linear[:S], poly:A, list:..., .npy)
    record_every: int = 1  # keep generations 0, k, 2k, ... and G
    seed: int = 0  # the run's key


def validate(config: PointConfig, pf: PointFamily | None = None) -> PointConfig:
    """Check every field (the operators against ``pf``'s point dimension when given)."""
    _, schedule = check_loop_fields(config)
    if pf is not None:
        point_operators(pf, config)
    else:
        operators.parse(config, "point", operators.POINT_OPERATORS, dim=None)
    schedule.sizes(config.samples, config.generations + 1)
    return config


def point_operators(pf: PointFamily, config: PointConfig) -> operators.Operators:
    """The run's data operators (curate, verify), read against the family's point dimension."""
    x = jax.eval_shape(lambda k: _draw_original(pf, k, 1), jax.random.key(0))
    dim = x.shape[1] if len(x.shape) == 2 else None
    return operators.parse(config, pf.name, operators.POINT_OPERATORS, dim=dim)


def _draw_original(pf: PointFamily, key, n):
    return pf.original(key, n) if pf.original is not None else pf.sample(key, pf.d0, n)


def make_family(
    pf: PointFamily,
    policy: Policy,
    max_size: int,
    pool_capacity: int,
    ops: operators.Operators = operators.NONE,
) -> Family:
    """The loop's :class:`Family` of a point family: data in a :class:`PointBuffer`; ``ops``
    act on the model samples (:func:`collapse_jax.core.operators.point_samples`)."""

    def draw_original(key, n):
        return pf.original(key, n) if pf.original is not None else pf.sample(key, pf.d0, n)

    def init(key, params, gen: GenInput) -> tuple[PointBuffer, dict]:
        x0 = draw_original(key, max_size)
        w0 = (jnp.arange(max_size) < gen.size).astype(jnp.float32)
        return initial_buffer(x0, w0, policy, max_size, pool_capacity), pf.metrics(pf.d0)

    def step(key, data: PointBuffer, params, gen: GenInput) -> tuple[PointBuffer, dict]:
        k_model, k_prev, k_orig, k_sub = jax.random.split(key, 4)
        model = pf.fit(data.x, data.w)
        if ops.on_points:
            points, model_w = operators.point_samples(
                k_model, lambda k, n: pf.sample(k, model, n), max_size, ops
            )
        else:
            points, model_w = pf.sample(k_model, model, max_size), None
        batch, bw = new_batch(
            k_prev, k_orig, points, draw_original, data, gen.size, policy, model_w
        )
        return next_buffer(k_sub, data, batch, bw, gen.size, policy), pf.metrics(model)

    return Family(init, step)


def run(
    pf: PointFamily,
    config: PointConfig,
    out_dir: str | Path | RunDir | None,
    *,
    progress: bool | None = None,
) -> dict:
    """Run ``pf`` under ``config``; write (or keep in memory) the run's arrays, summary, figures
    and report. Returns the summary."""
    config = validate(config, pf)
    run_dir = RunDir.start(out_dir, config, pf.name)
    t0 = time.perf_counter()
    policy = Policy.parse(config.policy, config.fresh_fraction)
    sizes = Schedule.parse(config.schedule).sizes(config.samples, config.generations + 1)
    max_size = int(sizes.max())
    pool = int(sizes[:-1].sum()) + max_size if policy.accumulates else 0
    ops = point_operators(pf, config)
    result = run_generations(
        make_family(pf, policy, max_size, pool, ops),
        seed_key(config.seed),
        config.chains,
        sizes,
        record_every=config.record_every,
        progress=progress,
        desc=pf.name,
        checkpoint=run_dir.scan_checkpoint(),
    )
    run_dir.final_state = result.state
    gens = result.generations
    arrays: dict[str, np.ndarray] = {"generation": gens, "sizes": sizes}
    for name, st in result.trace.items():
        arrays.update(stats_arrays(name, st))
        arrays[f"{name}_final_chains"] = np.asarray(result.final_info[name], np.float64)
    # The family's closed forms describe the plain process: not shown under an operator.
    plain = not ops.active()
    theory = pf.theory(gens, sizes, policy) if pf.theory is not None and plain else {}
    for name, curve in theory.items():
        arrays[f"theory_{name}"] = np.asarray(curve, np.float64)
    run_dir.write_metrics("metrics.npz", **arrays)
    checks = [
        rep.Check(
            f"E[{name}] at generation {int(gens[-1])}",
            float(arrays[f"theory_{name}"][-1]),
            float(arrays[f"{name}_mean"][-1]),
            float(arrays[f"{name}_stderr"][-1]),
        )
        for name in theory
    ]
    summary: dict = {
        "study": pf.name,
        "operators": ops.describe(),
        "policy": policy.describe(),
        "schedule": Schedule.parse(config.schedule).describe(),
        "chains": config.chains,
        "generations": config.generations,
        "seconds": result.seconds,
        "checks": [c.as_dict() for c in checks],
    }
    for name in result.trace:
        summary[name] = series(
            gens, arrays[f"{name}_mean"], arrays[f"{name}_stderr"], arrays[f"{name}_quantiles"]
        )
    run_dir.write_summary(summary)
    figures = run_dir.figures(functools.partial(_figures, names=list(result.trace), theory=theory))
    lines = [
        f"# {pf.name}",
        "",
        pf.description,
        "",
        f"M = {config.samples} ({summary['schedule']}), {config.chains} chains × "
        f"{config.generations} generations, policy {summary['policy']}, seed {config.seed}; "
        f"{result.seconds:.2f} s (report {time.perf_counter() - t0:.1f} s).",
        *rep.operators_lines(summary["operators"]),
        "",
        "## Theory against Monte Carlo",
        "",
        rep.checks_table(checks) if checks else "No closed form was given for this family.",
        "",
    ]
    lines += rep.figures_section(figures)
    run_dir.write_report("\n".join(lines) + "\n")
    return summary


def _figures(path: Path, names: list[str], theory: dict) -> list[tuple[str, str]]:
    a = read_arrays(path / "metrics.npz")
    panels = [
        {
            "title": name,
            "x": a["generation"],
            "series": [
                {
                    "mean": a[f"{name}_mean"],
                    "stderr": a[f"{name}_stderr"],
                    "quantiles": a[f"{name}_quantiles"],
                    "label": "MC mean",
                }
            ],
            "theory": [{"y": a[f"theory_{name}"]}] if name in theory else [],
        }
        for name in names
    ]
    rep.curves_figure(path / "metrics.png", panels, ncols=min(3, len(panels)))
    return [
        (
            "metrics.png",
            "Mean over chains of each metric (±2 stderr bands; dotted: median, light band: "
            "10–90 % of chains; dashed: theory).",
        )
    ]
