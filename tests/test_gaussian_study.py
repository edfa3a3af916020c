"""Gaussian study: Σ_n → 0 in float64, bad input, end-to-end run."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

import collapse_jax as cj
from collapse_jax.core.errors import ConfigError
from collapse_jax.core.loop import run_generations
from collapse_jax.families.gaussian import d0 as gd0
from collapse_jax.families.gaussian import kernel as proc
from collapse_jax.families.gaussian import study as study
from collapse_jax.families.gaussian import theory as th


def collapse_run(chains=512, generations=2000, m=10):
    d0 = gd0.make_d0("normal", 1, 2.0)
    sizes = np.full(generations, m)
    family = proc.make_family(d0, sizes)
    r = run_generations(
        family._replace(
            reduce=functools.partial(proc.reduce_info, log_trace0=float(np.log(d0.trace)))
        ),
        jax.random.key(0),
        chains,
        np.concatenate([sizes, sizes[-1:]]),
        record_every=50,
        progress=False,
    )
    return r, sizes


@pytest.mark.parametrize("x64", [True, False])
def test_sigma_collapses_without_nan(x64):
    """Theorem 3.1: M = 10, 2,000 generations: >= 99% of chains have tr Σ_n < 1e-6 tr Σ_0, and no
    metric is NaN or inf at any generation (float64; float32 too, thanks to the log-space state)."""
    with jax.enable_x64(x64):
        r, sizes = collapse_run()
    tr = r.trace
    collapsed = tr["below_fraction"][:, proc.THRESHOLDS.index(1e-6)]
    assert collapsed[-1] >= 0.99
    for name in ("w2_sq", "mean_sq_error", "trace_cov", "log_trace_cov", "log_det_cov", "std"):
        for stat in ("mean", "stderr"):
            assert np.all(np.isfinite(tr[name][stat])), (name, stat)
        assert np.all(tr[name]["finite"] == 1.0), name
    assert np.all(tr["numerically_collapsed"] == 0)
    # the engine of the collapse: E log σ_n² drifts down by ψ(k/2) − log(k/2) per generation
    gens = r.generations
    drift = np.log(4.0) + th.log_det_drift(sizes)[gens]
    mean, se = tr["log_det_cov"]["mean"], tr["log_det_cov"]["stderr"]
    assert np.all(np.abs(mean[1:] - drift[1:]) <= 4 * se[1:])
    state_ok = [np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(r.state)]
    assert all(state_ok)


def test_bad_inputs_raise_config_error(tmp_path):
    base = study.Config(chains=8, generations=3)
    with pytest.raises(ConfigError, match="not positive definite"):
        study.validate(dataclasses.replace(base, dim=2, d0_cov=((1.0, 2.0), (2.0, 1.0))))
    with pytest.raises(ConfigError, match="M − 1"):
        study.validate(dataclasses.replace(base, samples=1))
    with pytest.raises(ConfigError, match="singular"):
        study.validate(dataclasses.replace(base, dim=5, samples=4))
    data = np.random.default_rng(0).normal(size=(50, 3))
    path = tmp_path / "d.npy"
    np.save(path, data)
    with pytest.raises(ConfigError, match="dimension 3 but --dim is 2"):
        study.validate(dataclasses.replace(base, d0=str(path), dim=2))
    data[7, 1] = np.nan
    bad = tmp_path / "nan.npy"
    np.save(bad, data)
    with pytest.raises(ConfigError, match="non-finite value nan at index"):
        study.validate(dataclasses.replace(base, d0=str(bad), dim=3))
    with pytest.raises(ConfigError, match="sufficient sampler"):
        study.validate(dataclasses.replace(base, policy="accumulate-subsample"))
    with pytest.raises(ConfigError, match="sufficient sampler"):
        study.validate(dataclasses.replace(base, policy="mix:0.5,0.5,0"))
    with pytest.raises(ConfigError, match="unknown d0"):
        study.validate(dataclasses.replace(base, d0="cauchy"))
    with pytest.raises(ConfigError, match="degrees of freedom"):
        study.validate(dataclasses.replace(base, d0="student-t", d0_df=2.0))
    with pytest.raises(ConfigError, match="not found"):
        study.validate(dataclasses.replace(base, d0=str(tmp_path / "missing.npy")))


def test_cli_flags_map_onto_config():
    import argparse

    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(
        ["--dim", "2", "--d0", "uniform", "--samples", "30", "--no-x64", "--fresh-fraction", "0.1"]
    )
    cfg = study.config_from_args(args, study.Config())
    assert (cfg.dim, cfg.d0, cfg.samples, cfg.x64, cfg.fresh_fraction) == (
        2,
        "uniform",
        30,
        False,
        0.1,
    )
    assert cfg.generations == study.Config().generations  # unset flags keep the base


def test_run_end_to_end(tmp_path):
    cfg = study.Config(samples=12, chains=256, generations=40, record_every=4, x64=False)
    summary = study.run(cfg, tmp_path)
    for name in (
        "config.json",
        "metrics.npz",
        "summary.json",
        "report.md",
        "gaussian_metrics.png",
        "gaussian_covariance.png",
    ):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("w2_sq", "mean_sq_error", "trace_cov"):
        assert set(saved[key]) == {"generation", "mean", "stderr", "q10", "q50", "q90"}
        assert len(saved[key]["mean"]) == len(saved[key]["generation"]) == 11
    assert len(saved["collapsed_fraction"]) == 11
    # Per-chain final values are saved, and the quantiles of the last generation are theirs.
    a = np.load(tmp_path / "metrics.npz")
    assert a["final_mean_chains"].shape == (256, 1) and a["trace_cov_final_chains"].shape == (256,)
    last = [saved["trace_cov"][q][-1] for q in ("q10", "q50", "q90")]
    np.testing.assert_allclose(
        last, np.quantile(a["trace_cov_final_chains"], [0.1, 0.5, 0.9]), rtol=1e-5
    )
    assert summary["checks"] and summary["all_checks_agree"]
    report = (tmp_path / "report.md").read_text()
    assert "| claim | theory | Monte Carlo ± stderr | agrees? |" in report
    assert not jax.config.jax_enable_x64  # the run boundary restored the precision


def test_last_record_is_generation_g_when_record_every_does_not_divide_g():
    d0 = gd0.make_d0("normal", 1)
    sizes = np.full(10, 6)
    out = []
    for every in (4, 1):
        family = proc.make_family(d0, sizes)
        r = run_generations(
            family._replace(reduce=functools.partial(proc.reduce_info, log_trace0=0.0)),
            jax.random.key(3),
            16,
            np.concatenate([sizes, sizes[-1:]]),
            record_every=every,
            progress=False,
        )
        assert r.generations[-1] == 10
        out.append(r.trace["log_det_cov"]["mean"][-1])
    assert np.isclose(out[0], out[1], rtol=1e-5)


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("sampler", ["sufficient", "samples"])
@pytest.mark.parametrize(
    "policy,fresh",
    [
        ("replace", 0.0),
        ("replace", 0.2),
        ("accumulate", 0.0),
        ("accumulate-subsample", 0.0),
        ("mix:0.6,0.2,0.2", 0.0),
    ],
)
def test_every_policy_sampler_precision_runs(policy, fresh, sampler, x64):
    """Every combination the README offers runs to the end (d = 2, tiny sizes) with finite
    metrics; the sufficient sampler refuses the policies that need the points, naming them."""
    settings = dict(
        dim=2, samples=10, chains=8, generations=3, record_every=1, policy=policy,
        fresh_fraction=fresh, sampler=sampler, x64=x64,
    )  # fmt: skip
    needs_points = policy == "accumulate-subsample" or policy.startswith("mix")
    if sampler == "sufficient" and needs_points:
        with pytest.raises(ConfigError, match="--sampler samples"):
            cj.run("gaussian", **settings)
        return
    res = cj.run("gaussian", **settings)
    for name in ("w2_sq", "trace_cov", "mean_sq_error"):
        assert np.all(np.isfinite(res.series[name]["mean"])), name


def test_accumulate_report_has_closed_forms_and_pi2_6(tmp_path):
    """Under accumulate the report, summary.json and figure carry the closed forms (checked at
    the first, middle and last recorded generations) and Dey & Donoho's π²/6 bound."""
    cfg = study.Config(
        dim=2, samples=20, chains=2000, generations=30, record_every=3, policy="accumulate"
    )
    summary = study.run(cfg, tmp_path)
    claims = [c["claim"] for c in summary["checks"]]
    assert sum("(accumulate)" in c for c in claims) == 6, claims
    assert summary["all_checks_agree"]
    acc = summary["accumulate"]
    assert acc["generation"] == 30 and acc["pi2_over_6"] == np.pi**2 / 6
    # the closed form lies below the Σ-known curve, which lies below π²/6
    assert acc["ratio_closed_form"] < acc["ratio_known_cov"] < acc["pi2_over_6"]
    assert abs(acc["ratio_monte_carlo"] - acc["ratio_closed_form"]) <= 4 * acc["ratio_stderr"]
    for key in ("mean_sq_error_known_cov", "mean_sq_error_limit", "trace_cov_limit"):
        assert key in summary["theory"], key
    report = (tmp_path / "report.md").read_text()
    assert "π²/6 bound (Dey & Donoho, arXiv:2410.22812)" in report
    replace = study.run(dataclasses.replace(cfg, policy="replace"), tmp_path / "replace")
    assert replace["accumulate"] is None


def test_user_collapse_threshold(tmp_path):
    """`--collapse-threshold ε`: the collapsed fraction at the last generation is the fraction
    of the saved per-chain final traces below ε tr Σ_0 (tr Σ_0 = d for the default D0)."""
    cfg = study.Config(
        dim=2, samples=8, chains=256, generations=60, record_every=6, collapse_threshold=3e-4
    )
    summary = study.run(cfg, tmp_path)
    finals = np.load(tmp_path / "metrics.npz")["trace_cov_final_chains"]
    expected = float(np.mean(finals < 3e-4 * 2.0))
    assert 0.05 < expected < 0.95  # the threshold splits the chains
    assert summary["collapsed_fraction"][-1] == pytest.approx(expected, abs=1e-9)
    assert "0.0003" in summary["below_fraction"]
