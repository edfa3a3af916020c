"""The regression family: closed forms against simulation (tolerances from the Monte Carlo
standard error), the sufficient-statistic path against the sample path in distribution, the
fit against scikit-learn, every policy, bad input."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from scipy import stats

from collapse_jax import cli
from collapse_jax.core.loop import precision, run_generations
from collapse_jax.families.regression import kernel as proc
from collapse_jax.families.regression import study
from collapse_jax.families.regression import theory as th

Z = 4.0


def _z(mean, stderr, theory):
    return (np.asarray(mean) - np.asarray(theory)) / np.asarray(stderr)


def _run(**kw):
    """The study in memory (no run directory); returns the summary and the arrays."""
    from collapse_jax.core.runs import RunDir

    run_dir = RunDir(None)
    summary = study.run(study.Config(**kw), run_dir, progress=False)
    return summary, run_dir.arrays


def _assert_theory(arrays, key="excess_risk", theory_key=None):
    g = arrays["generation"]
    mean, se = arrays[f"{key}_mean"][g >= 1], arrays[f"{key}_stderr"][g >= 1]
    theory = arrays[f"theory_{theory_key or key}"][g >= 1]
    z = _z(mean, se, theory)
    assert np.all(np.abs(z) < Z), z


@pytest.mark.parametrize(
    "kw",
    [
        dict(sampler="sufficient", design="fixed"),
        dict(sampler="samples", design="fixed", spectrum=1.3),
        dict(sampler="sufficient", design="fresh", spectrum=0.7),
        dict(sampler="samples", design="fresh"),
    ],
)
def test_ols_replace_closed_form(kw):
    """E‖ŵ_n − w*‖²_Σ = σ² n d/(T − d − 1) at every generation, both paths and designs (the
    Σ-norm makes the spectrum drop out)."""
    _, a = _run(dim=4, samples=15, noise=0.7, chains=3000, generations=8, seed=3, **kw)
    _assert_theory(a)
    np.testing.assert_allclose(a["theory_excess_risk"][1], 0.49 * 4 / 10)


def test_ols_replace_schedule_is_dohmatob_line():
    """Dohmatob et al.'s test error of a model fitted to T rows after n generations of T₀ rows:
    σ²(n d/(T₀ − d − 1) + d/(T − d − 1)), here with n = 5, T₀ = 12, T = 40 (fresh design)."""
    sizes = [12] * 5 + [40]
    _, a = _run(
        dim=3,
        samples=12,
        schedule="list:" + ",".join(map(str, sizes)),
        design="fresh",
        sampler="samples",
        chains=3000,
        generations=6,
        seed=5,
    )
    expected = 1.0 * (5 * 3 / (12 - 4) + 3 / (40 - 4))
    np.testing.assert_allclose(a["theory_excess_risk"][-1], expected)
    _assert_theory(a)


@pytest.mark.parametrize("sampler", ["sufficient", "samples"])
def test_ols_accumulate_pi2_over_6(sampler):
    """Fixed design, accumulate: σ² d/(T − d − 1) Σ_{i≤n} 1/i², under π²/6 times generation 1."""
    _, a = _run(
        dim=3,
        samples=11,
        noise=1.3,
        policy="accumulate",
        sampler=sampler,
        chains=3000,
        generations=7,
        seed=8,
    )
    _assert_theory(a)
    first = 1.69 * 3 / 7
    np.testing.assert_allclose(a["theory_excess_risk"][1], first)
    np.testing.assert_allclose(a["theory_excess_risk_limit"][0], np.pi**2 / 6 * first)
    assert (
        a["excess_risk_mean"][-1]
        < a["theory_excess_risk_limit"][0] + Z * a["excess_risk_stderr"][-1]
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(ridge=3.0, sampler="sufficient"),
        dict(ridge=3.0, sampler="samples", spectrum=1.0),
        dict(fresh_fraction=0.25, sampler="samples"),
        dict(ridge=0.5, fresh_fraction=0.4, wrong_fraction=0.3, wrong_shift=1.5),
        dict(wrong_fraction=0.2, wrong_shift=2.0, samples=30),
    ],
)
def test_given_design_expectation(kw):
    """Ridge, fresh real labels and a wrong-model fraction: the simulated mean agrees with the
    exact expectation given each chain's design (averaged over the chains) within 4 standard
    errors of their difference."""
    base = dict(dim=3, samples=12, noise=0.8, signal=1.5, chains=2000, generations=6, seed=11)
    _, a = _run(**{**base, **kw})
    g = a["generation"] >= 1
    diff = a["excess_risk_mean"][g] - a["theory_excess_risk_given_design"][g]
    se = np.hypot(a["excess_risk_stderr"][g], a["theory_excess_risk_given_design_stderr"][g])
    assert np.all(np.abs(diff / se) < Z), diff / se


def test_strong_collapse_floor():
    """A wrong-model fraction p₂ keeps the first fit's excess risk above p₂²‖Δ‖²_Σ: with many
    rows (T = 2000, d = 2) it is within its finite-T variance of the floor."""
    _, a = _run(
        dim=2, samples=2000, wrong_fraction=0.25, wrong_shift=2.0, chains=2000, generations=1
    )
    floor = 0.25**2 * 4.0
    np.testing.assert_allclose(a["theory_excess_risk_floor"][0], floor)
    # Excess risk of generation 1 = floor + O(d/T) (the noise term and the design's
    # fluctuation); the exact given-design value must sit within 5% of the floor here.
    given = a["theory_excess_risk_given_design"][1]
    assert floor < given < 1.05 * floor
    z = (a["excess_risk_mean"][1] - given) / np.hypot(
        a["excess_risk_stderr"][1], a["theory_excess_risk_given_design_stderr"][1]
    )
    assert abs(z) < Z


def test_train_loss_expectation():
    """Under OLS replace every fit's residual is (I − P)ε: E train loss = σ²(T − d)/T at every
    generation, on both paths (the sufficient path's Σy² bookkeeping included)."""
    for sampler in ("sufficient", "samples"):
        _, a = _run(dim=5, samples=14, noise=0.9, sampler=sampler, chains=3000, generations=5)
        g = a["generation"] >= 1
        z = _z(a["train_loss_mean"][g], a["train_loss_stderr"][g], 0.81 * 9 / 14)
        assert np.all(np.abs(z) < Z), (sampler, z)
        np.testing.assert_allclose(a["theory_train_loss"][g], 0.81 * 9 / 14)


def _per_chain(config: study.Config, sampler: str) -> dict:
    """Every chain's metrics at the last generation (identity reduce)."""
    spec, _, sizes, _ = study.setup(dataclasses.replace(config, sampler=sampler))
    with precision(True):
        fam = proc.make_family(spec, sampler)._replace(reduce=lambda info: info)
        res = run_generations(fam, jax.random.key(config.seed), config.chains, sizes)
        return {k: np.asarray(getattr(res.trace, k)[-1]) for k in study.METRICS}


@pytest.mark.parametrize(
    "kw",
    [
        dict(design="fixed", ridge=0.0),
        dict(design="fresh", ridge=2.0, spectrum=1.0),
        dict(design="fixed", ridge=1.0, policy="accumulate"),
        dict(design="fresh", ridge=0.0, policy="accumulate"),
    ],
)
def test_sufficient_path_equals_sample_path_in_distribution(kw):
    """The sufficient-statistic draw has the law of the sample-level recursion: two-sample
    Kolmogorov–Smirnov on every metric at the last generation (independent seeds)."""
    cfg = study.Config(dim=3, samples=9, chains=1200, generations=4, **kw)
    a = _per_chain(cfg, "sufficient")
    b = _per_chain(dataclasses.replace(cfg, seed=1), "samples")
    for name in study.METRICS:
        p = stats.ks_2samp(a[name], b[name]).pvalue
        assert p > 1e-4, (name, p)


def test_fit_matches_scikit_learn():
    """The weighted ridge / OLS solve equals scikit-learn's Ridge(fit_intercept=False) with
    sample weights (padding rows have weight 0)."""
    from sklearn.linear_model import LinearRegression, Ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = x @ rng.normal(size=4) + rng.normal(size=30)
    w = (np.arange(30) < 22).astype(np.float64)
    xw = x * w[:, None]
    with precision(True):
        for lam in (0.0, 2.5):
            ours = np.asarray(proc._solve(xw.T @ x, xw.T @ y, lam))
            ref = (
                Ridge(alpha=lam, fit_intercept=False)
                if lam
                else LinearRegression(fit_intercept=False)
            ).fit(x[:22], y[:22])
            np.testing.assert_allclose(ours, ref.coef_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        dict(policy="replace"),
        dict(policy="accumulate", design="fresh"),
        dict(policy="accumulate-subsample", ridge=0.1),
        dict(policy="mix:0.5,0.3,0.2", design="fresh"),
        dict(policy="replace", fresh_fraction=0.5, schedule="linear:3", design="fresh"),
        dict(policy="accumulate", schedule="poly:1", x64=False),
    ],
)
def test_every_policy_runs(kw):
    """Every shared policy and schedule, both designs, float32 too: finite metrics throughout."""
    summary, a = _run(dim=2, samples=6, chains=16, generations=5, **kw)
    for name in study.METRICS:
        assert np.all(np.isfinite(a[f"{name}_mean"])), name
    assert summary["sampler"] == "samples" or kw["policy"] in ("replace", "accumulate")


def test_study_writes_run_directory(tmp_path):
    """`collapse-jax run regression`: the run directory, the `excess_risk` series with
    generation 1 = the first fit (on real labels), and the theory table."""
    out = tmp_path / "run"
    args = ["--dim", "3", "--samples", "10", "--chains", "64", "--generations", "4"]
    assert cli.main(["run", "regression", "--out", str(out), *args]) == 0
    for name in ("config.json", "metrics.npz", "summary.json", "report.md", "regression.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    series = summary["excess_risk"]
    assert series["generation"] == [0, 1, 2, 3, 4]
    assert series["mean"][0] == 0.0 and series["mean"][1] > 0
    assert set(series) == {"generation", "mean", "stderr", "q10", "q50", "q90"}
    # The quantiles of the last generation are those of the saved per-chain values (NumPy).
    finals = np.load(out / "metrics.npz")["excess_risk_final_chains"]
    assert finals.shape == (64,)
    np.testing.assert_allclose(
        [series["q10"][-1], series["q50"][-1], series["q90"][-1]],
        np.quantile(finals, [0.1, 0.5, 0.9]),
        rtol=1e-12,
    )
    assert summary["checks"] and summary["all_checks_agree"]
    assert "Theory vs Monte Carlo" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dim", "0"], "dim must be >= 1, got 0"),
        (["--dim", "10", "--samples", "10"], "OLS needs more rows than features: samples 10"),
        (["--ridge", "-1"], "ridge must be >= 0.0, got -1.0"),
        (["--noise", "nan"], "noise must be"),
        (["--noise", "inf"], "noise must be"),
        (["--design", "random"], "unknown design 'random'"),
        (["--spectrum", "-2"], "spectrum must be >= 0.0"),
        (["--wrong-fraction", "1.5"], "wrong_fraction must be <= 1.0"),
        (["--sampler", "sufficient", "--policy", "accumulate-subsample"], "sampler 'sufficient'"),
        (["--samples", "0"], "samples must be >= 1"),
        (["--generations", "0"], "generations must be >= 1"),
        (["--dim", "x"], "invalid int value: 'x'"),
    ],
)
def test_bad_input_one_line_error(args, message, capsys, tmp_path):
    out = tmp_path / "run"
    try:
        rc = cli.main(["run", "regression", "--out", str(out), *args])
    except SystemExit as e:  # argparse's own type errors exit through SystemExit(2)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (out / "summary.json").exists()


def test_inverse_wishart_trace_against_scipy():
    """E tr W⁻¹ = d/(m − d − 1): SciPy's inverse-Wishart mean is I/(m − d − 1)."""
    d, m = 4, 13
    assert np.isclose(
        float(th.inverse_wishart_trace(d, m)), np.trace(stats.invwishart(m, np.eye(d)).mean())
    )
    assert np.isinf(th.inverse_wishart_trace(d, d + 1))
