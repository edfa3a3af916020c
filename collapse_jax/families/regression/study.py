"""The linear-regression study: thousands of regression chains refitted on their own labels
(Gerstgrasser et al.'s replace vs accumulate, Dohmatob et al.'s closed forms), theory beside
Monte Carlo."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from collapse_jax.core import compilation, operators
from collapse_jax.core import report as rep
from collapse_jax.core.errors import ConfigError, check_choice, check_float, check_int
from collapse_jax.core.flags import add_config_arguments, apply_flags
from collapse_jax.core.loop import precision, run_generations
from collapse_jax.core.policies import Schedule, check_loop_fields, check_reuse, split_batch
from collapse_jax.core.runs import RunDir, series
from collapse_jax.core.statistics import stats_arrays
from collapse_jax.families import DESCRIPTIONS
from collapse_jax.families.regression import kernel as proc
from collapse_jax.families.regression import theory as th
from collapse_jax.families.regression.report import make_figures
from collapse_jax.numerics.random import seed_key

NAME = "regression"
DESCRIPTION = DESCRIPTIONS[NAME]

METRICS = ("excess_risk", "param_error", "train_loss")
#: Largest accumulation pool (rows × (d + 1) × chains) allowed, in bytes.
MAX_POOL_BYTES = 4 * 2**30
#: Floating-point work (chains × generations × d³) spent on the exact given-design expectation;
#: the first chains up to this budget are used (at least 64, else it is not shown).
THEORY_BUDGET = 2e9


@dataclasses.dataclass(frozen=True)
class Config(operators.OperatorFields):
    """The regression study. Defaults: OLS, d = 10, T = 100 rows of a fixed isotropic design,
    σ = 1, replace, 50 generations of 4,096 chains. It takes no data operator (the operator
    fields of :class:`collapse_jax.core.operators.OperatorFields` are refused when set)."""

    dim: int = 10  # d, number of features
    samples: int = 100  # T, rows per generation (M_0 of a schedule)
    noise: float = 1.0  # σ, standard deviation of the label noise
    ridge: float = 0.0  # λ of the ridge penalty λ‖w‖² on the summed squared error; 0: OLS
    design: str = "fixed"  # fixed (one X per chain, relabelled) | fresh (new rows every generation)
    spectrum: float = 0.0  # a: feature covariance Σ = diag(i^−a), i = 1..d; 0: isotropic
    signal: float = 1.0  # ‖w*‖; w* = signal · (1, ..., 1)/√d
    wrong_fraction: float = 0.0  # p₂: fraction of every real batch labelled by a wrong model w₂
    wrong_shift: float = 1.0  # ‖w₂ − w*‖; w₂ = w* + shift · (1, ..., 1)/√d
    sampler: str = "auto"  # auto | sufficient (exact statistics, cost independent of T) | samples
    chains: int = 4096  # independent chains run at once
    generations: int = 50  # fitted generations (generation 1: fitted on real labels)
    policy: str = "replace"  # replace | accumulate | accumulate-subsample | mix:ALPHA,BETA,GAMMA
    fresh_fraction: float = 0.0  # gamma: fraction of every batch labelled by w* (real labels)
    schedule: str = "constant"  # constant | linear[:SLOPE] | poly:A | list:M0,M1,... | file.npy
    x64: bool = True  # float64 (jax_enable_x64) for the run; float32 otherwise
    record_every: int = 1  # keep metrics of every k-th generation (and the last)
    seed: int = 0  # PRNG seed; same seed, same results


def validate(config: Config) -> Config:
    """Check every field; raise ConfigError naming the bad value."""
    setup(config)
    return config


def setup(config: Config):
    """Everything derived from the config: (spec, sampler path, sizes M_0..M_G, policy)."""
    policy, schedule = check_loop_fields(config)
    d = check_int("dim", config.dim, 1, 4096)
    operators.parse(config, NAME, (), dim=d)
    noise = check_float("noise", config.noise, 0.0)
    ridge = check_float("ridge", config.ridge, 0.0)
    check_choice("design", config.design, proc.DESIGNS)
    spectrum = check_float("spectrum", config.spectrum, 0.0, 64.0)
    signal = check_float("signal", config.signal, 0.0)
    wrong = check_float("wrong_fraction", config.wrong_fraction, 0.0, 1.0)
    shift = check_float("wrong_shift", config.wrong_shift)
    check_choice("sampler", config.sampler, proc.SAMPLERS)
    if not isinstance(config.x64, bool):
        raise ConfigError(f"x64 must be true or false, got {config.x64!r}")
    sizes = schedule.sizes(config.samples, config.generations)
    sizes = np.concatenate([sizes, sizes[-1:]])  # M_G: drawn by the last step, never fitted
    fitted = sizes[:-1]
    if ridge == 0 and int(fitted.min()) <= d:
        raise ConfigError(
            f"OLS needs more rows than features: samples {int(fitted.min())} <= dim {d}; "
            "use more samples or --ridge > 0"
        )
    why = proc.sufficient_applies(policy, config.design, fitted, d, wrong)
    if config.sampler == "sufficient" and why:
        raise ConfigError(f"sampler 'sufficient' cannot run {why}; use --sampler samples")
    sampler = config.sampler
    if sampler == "auto":
        sampler = "samples" if why else "sufficient"
    max_size = int(sizes.max())
    pool = int(fitted.sum()) + max_size if (policy.accumulates and sampler == "samples") else 0
    check_reuse(policy, sizes)
    nbytes = max(pool, max_size) * (d + 1) * 8 * config.chains
    if nbytes > MAX_POOL_BYTES:
        raise ConfigError(
            f"{config.chains} chains of {max(pool, max_size)} rows × {d + 1} columns need "
            f"{nbytes / 2**30:.1f} GiB, above {MAX_POOL_BYTES / 2**30:.0f} GiB; use fewer chains, "
            "generations or samples (or the sufficient sampler)"
        )
    scale = np.arange(1, d + 1, dtype=np.float64) ** (-spectrum / 2)
    spec = proc.RegressionSpec(
        dim=d,
        noise=noise,
        ridge=ridge,
        design=config.design,
        scale=scale,
        w_star=np.full(d, signal / np.sqrt(d)),
        wrong_fraction=wrong,
        w_wrong=np.full(d, (signal + shift) / np.sqrt(d)),
        policy=policy,
        max_size=max_size,
        pool_capacity=pool,
    )
    return spec, sampler, sizes, policy


def demo_config() -> Config:
    """OLS under replace at small scale for `collapse-jax demo` (a few seconds): the linear growth
    σ²nd/(T − d − 1) against its closed form."""
    return Config(dim=10, samples=40, chains=2048, generations=30)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's flags, one per config field; unset flags leave the config unchanged."""
    add_config_arguments(parser, Config)


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    """Apply the flags that were given onto ``base`` and validate."""
    return apply_flags(args, base, validate)


# ---------------------------------------------------------------------------------------------


def simulate(config: Config, progress: bool | None = None, checkpoint=None) -> dict:
    """Run the chains; returns per-recorded-generation arrays, the theory curves and facts."""
    spec, sampler, sizes, policy = setup(config)
    with precision(config.x64):
        # the programs close over the config and what setup derived from it (x64 included)
        family = proc.make_family(spec, sampler)
        result = run_generations(
            compilation.keyed(family, NAME, config, spec, sampler, sizes, policy),
            seed_key(config.seed),
            config.chains,
            sizes,
            record_every=config.record_every,
            progress=progress,
            desc=NAME,
            checkpoint=checkpoint,
        )
        out = {"generation": result.generations, "sizes": sizes[:-1]}
        for name in METRICS:
            out.update(stats_arrays(name, getattr(result.trace, name)))
            # every chain's value at the last generation (heavy tails, per-chain analysis)
            out[f"{name}_final_chains"] = np.asarray(getattr(result.final_info, name), np.float64)
        theory = theory_curves(config, spec, sampler, policy, sizes[:-1], result)
    return {
        "arrays": out,
        "theory": theory,
        "sampler": sampler,
        "policy": policy,
        "state": result.state,
        "seconds": result.seconds,
    }


def _fixed_gram(spec, sampler: str, state, rows: int, chains: int) -> np.ndarray:
    """The fixed-design Gram matrices X[:rows]ᵀX[:rows] of the first ``chains`` chains, from the
    final state (the sufficient path keeps the whole design's eigendecomposition)."""
    if sampler == "sufficient":
        u = np.asarray(state.basis[:chains], np.float64)
        return (u * np.asarray(state.spectrum[:chains], np.float64)[:, None, :]) @ np.swapaxes(
            u, 1, 2
        )
    x = np.asarray(state.design[:chains], np.float64)[:, :rows]
    return np.swapaxes(x, 1, 2) @ x


def theory_curves(config, spec, sampler, policy, sizes, result) -> dict:
    """Closed forms at the recorded generations, only where they hold. ``excess_risk`` is exact
    in expectation; ``excess_risk_given_design`` is exact given each chain's design and is
    compared chain by chain (its own mean and standard error over the chains)."""
    gens = result.generations
    d, sigma = spec.dim, spec.noise
    plain = policy.gamma == 0 and policy.beta == 0 and spec.wrong_fraction == 0
    constant = bool(np.all(sizes == sizes[0]))
    out: dict = {}
    if spec.ridge == 0 and plain and policy.mode == "replace":
        out["excess_risk"] = th.ols_replace(gens, sizes, d, sigma)
        out["train_loss"] = th.ols_replace_train_loss(gens, sizes, d, sigma)
    if spec.ridge == 0 and plain and policy.mode == "accumulate" and constant:
        if spec.design == "fixed":
            out["excess_risk"] = th.ols_accumulate(gens, int(sizes[0]), d, sigma)
        out["excess_risk_limit"] = np.full(
            len(gens), np.pi**2 / 6 * sigma**2 * float(th.inverse_wishart_trace(d, sizes[0]))
        )
    shift = spec.w_wrong - spec.w_star
    if spec.wrong_fraction > 0:
        out["excess_risk_floor"] = np.full(
            len(gens), th.strong_collapse_floor(spec.wrong_fraction, shift, spec.scale)
        )
    if (
        (spec.ridge > 0 or policy.gamma > 0 or spec.wrong_fraction > 0)
        and policy.beta == 0
        and policy.mode in ("replace", "mix")
        and spec.design == "fixed"
        and constant
    ):
        m = int(sizes[0])
        n_use = min(config.chains, int(THEORY_BUDGET / (int(gens[-1]) * d**3 + 1)))
        if n_use >= 64:
            gram = _fixed_gram(spec, sampler, result.state, m, n_use)
            model_rows = int(split_batch(m, policy).model)
            model_gram = _fixed_gram(spec, sampler, result.state, model_rows, n_use)
            wrong = {}
            if spec.wrong_fraction > 0:
                n_orig = m - model_rows
                wrong = dict(
                    shift=shift,
                    wrong_gram_first=gram
                    - _fixed_gram(
                        spec, sampler, result.state, m - round(m * spec.wrong_fraction), n_use
                    ),
                    wrong_gram=gram
                    - _fixed_gram(
                        spec, sampler, result.state, m - round(n_orig * spec.wrong_fraction), n_use
                    ),
                )
            per_chain = th.replace_given_design(
                gens, gram, model_gram, spec.w_star, spec.scale, spec.ridge, sigma, **wrong
            )
            out["excess_risk_given_design"] = per_chain.mean(0)
            out["excess_risk_given_design_stderr"] = per_chain.std(0, ddof=1) / np.sqrt(n_use)
    return out


def checks(arrays: dict, theory: dict) -> list[rep.Check]:
    """Theory vs Monte Carlo at the first, middle and last recorded fitted generations."""
    gens = arrays["generation"]
    picks = sorted({1, len(gens) // 2, len(gens) - 1} - {0})
    out = []
    mean, se = arrays["excess_risk_mean"], arrays["excess_risk_stderr"]
    for i in picks:
        n = int(gens[i])
        if "excess_risk" in theory:
            out.append(
                rep.Check(
                    f"E‖ŵ_n − w*‖²_Σ, n = {n}",
                    float(theory["excess_risk"][i]),
                    float(mean[i]),
                    float(se[i]),
                )
            )
        if "train_loss" in theory:
            out.append(
                rep.Check(
                    f"E[training loss], n = {n}",
                    float(theory["train_loss"][i]),
                    float(arrays["train_loss_mean"][i]),
                    float(arrays["train_loss_stderr"][i]),
                )
            )
        if "excess_risk_given_design" in theory:
            # Two independent estimates of the same expectation: the simulated errors and the
            # exact conditional expectations given the chains' designs; the standard error of
            # their difference combines both.
            th_se = float(theory["excess_risk_given_design_stderr"][i])
            out.append(
                rep.Check(
                    f"E‖ŵ_n − w*‖²_Σ (exact given each design, averaged over chains), n = {n}",
                    float(theory["excess_risk_given_design"][i]),
                    float(mean[i]),
                    float(np.hypot(se[i], th_se)),
                )
            )
    return out


def run(config: Config, out_dir: str | Path | RunDir | None, *, progress: bool | None = None):
    """Run the study and write config.json, metrics.npz, summary.json, figures and report.md."""
    config = validate(config)
    run_dir = RunDir.start(out_dir, config, NAME)
    t0 = time.perf_counter()
    sim = simulate(config, progress, checkpoint=run_dir.scan_checkpoint())
    arrays, theory = sim["arrays"], sim["theory"]
    run_dir.final_state = sim["state"]
    run_dir.write_metrics(
        "metrics.npz",
        **arrays,
        **{f"theory_{k}": np.asarray(v, np.float64) for k, v in theory.items()},
    )
    checks_list = checks(arrays, theory)
    gens = arrays["generation"]
    summary = {
        "study": NAME,
        "estimator": "OLS" if config.ridge == 0 else f"ridge (λ = {config.ridge:g})",
        "design": config.design,
        "sampler": sim["sampler"],
        "policy": sim["policy"].describe(),
        "schedule": Schedule.parse(config.schedule).describe(),
        **{
            name: series(
                gens, arrays[f"{name}_mean"], arrays[f"{name}_stderr"], arrays[f"{name}_quantiles"]
            )
            for name in METRICS
        },
        "theory": {k: np.asarray(v).tolist() for k, v in theory.items()},
        "checks": [c.as_dict() for c in checks_list],
        "all_checks_agree": all(c.agrees for c in checks_list),
        "seconds": sim["seconds"],
        "chain_generations_per_second": config.chains * config.generations / sim["seconds"],
    }
    run_dir.write_summary(summary)
    figures = run_dir.figures(make_figures)
    write_report(run_dir, config, summary, checks_list, figures, time.perf_counter() - t0)
    return summary


def write_report(run_dir, config, summary, checks_list, figures, seconds) -> None:
    last = len(summary["excess_risk"]["generation"]) - 1
    er = summary["excess_risk"]
    lines = [
        "# Linear regression refitted on its own labels",
        "",
        f"d = {config.dim}, T = {config.samples} rows per generation ({summary['schedule']}), "
        f"{config.design} design, Σ = diag(i^−{config.spectrum:g}), σ = {config.noise:g}, "
        f"{summary['estimator']}, ‖w*‖ = {config.signal:g}; {config.chains} chains × "
        f"{config.generations} generations, policy {summary['policy']}; sampler "
        f"`{summary['sampler']}`, {'float64' if config.x64 else 'float32'}, seed {config.seed}.",
        "",
        f"Simulation: {summary['seconds']:.2f} s ({summary['chain_generations_per_second']:.3g} "
        f"chain-generations/s); report total {seconds:.1f} s.",
        "",
        f"Excess risk at generation {er['generation'][1]}: {rep.fmt(er['mean'][1])} ± "
        f"{rep.fmt(er['stderr'][1])}; at generation {er['generation'][last]}: "
        f"{rep.fmt(er['mean'][last])} ± {rep.fmt(er['stderr'][last])}.",
        "",
        "## Theory vs Monte Carlo",
        "",
    ]
    if checks_list:
        lines += [rep.checks_table(checks_list), ""]
    else:
        lines += [
            "No closed form holds for this setting (closed forms: OLS under replace, any design "
            "and schedule; OLS under accumulate with a fixed design and constant size; OLS or "
            "ridge under replace or a fresh fraction of real labels with a fixed design, exact "
            "given the design). See theory/regression.md.",
            "",
        ]
    if "excess_risk_limit" in summary["theory"]:
        lim = summary["theory"]["excess_risk_limit"][0]
        lines += [f"Accumulate's bound (π²/6 × the first generation's error): {rep.fmt(lim)}.", ""]
    if "excess_risk_floor" in summary["theory"]:
        floor = summary["theory"]["excess_risk_floor"][0]
        lines += [
            f"Strong model collapse: {config.wrong_fraction:g} of the real labels come from w₂ "
            f"with ‖w₂ − w*‖ = {config.wrong_shift:g}; however many rows, the first fit's excess "
            f"risk cannot fall below p₂²‖w₂ − w*‖²_Σ = {rep.fmt(floor)} (its T → ∞ limit).",
            "",
        ]
    lines += rep.figures_section(figures)
    run_dir.write_report("\n".join(lines) + "\n")
