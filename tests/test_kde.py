"""The KDE recursion: closed forms against simulation, the sampler, bandwidth rules against SciPy,
the datasets against scikit-learn in distribution, every policy, bad input and the study end to
end."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax.core.errors import ConfigError
from collapse_jax.core.experiments import load_experiment
from collapse_jax.core.loop import GenInput
from collapse_jax.core.runs import RunDir
from collapse_jax.families.kde import kernel as proc
from collapse_jax.families.kde import study
from collapse_jax.families.kde.datasets import SYNTHETIC, make_dataset

TINY = study.Config(
    samples=12, chains=16, generations=4, heldout=16, w2_samples=8, w2_chains=2, record_every=2
)
ROOT = Path(__file__).resolve().parents[1]


def _within(mc, se, expected, z=4.0):
    return abs(mc - expected) <= z * se


# ------------------------------------------------------------------------------------------
# Closed forms against simulation (parameters unlike the experiments': M = 100, h = 0.1)


@pytest.mark.parametrize(
    "changes",
    [
        dict(dataset="circles", samples=16, bandwidth="0.3", generations=12, record_every=4),
        dict(
            dataset="swiss-roll",
            samples=10,
            bandwidth="0.7",
            generations=6,
            record_every=3,
            schedule="list:10,18,7,14,9,12,11",
        ),
    ],
)
def test_closed_forms_match_simulation(changes):
    """E‖X_i − X_j‖² and E[ancestors] under replace with a fixed h, constant M and a varying
    schedule M_n, within 4 Monte Carlo standard errors (over 1024 chains, fixed seed)."""
    config = dataclasses.replace(TINY, chains=1024, heldout=8, w2_chains=1, seed=3, **changes)
    summary = study.run(config, RunDir(None), progress=False)
    checks = summary["checks"]
    names = {c["claim"].split("]")[0] for c in checks}
    assert names == {"E[pairwise_sq_distance", "E[ancestors"}
    for c in checks:
        assert abs(c["z"]) <= 4.0, c
    # The forms are not flat: both quantities move by many standard errors over the run.
    for key in ("pairwise_sq_distance", "ancestors"):
        s = summary[key]
        assert abs(s["mean"][-1] - s["mean"][0]) > 10 * s["stderr"][-1], key


# ------------------------------------------------------------------------------------------
# The KDE itself


def test_sampler_moments_and_padding():
    """Samples of a KDE have mean = the centres' mean and covariance = the centres' covariance
    (population) + h² I, within 4 standard errors; padded centres (weight 0) are never picked and
    the carried column is the chosen centre's."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 2)) * np.array([2.0, 0.5]) + np.array([1.0, -3.0])
    centers[30:] = 1e4  # padding, weight 0
    w = (np.arange(40) < 30).astype(np.float32)
    h = 0.4
    kde = proc.KDE(jnp.asarray(centers, jnp.float32), jnp.asarray(w), jnp.float32(h))
    n = 40_000
    ids = jnp.arange(40, dtype=jnp.float32)[:, None]
    out = np.asarray(jax.jit(lambda k: proc.sample(k, kde, n, extra=ids))(jax.random.key(1)))
    x, picked = out[:, :2].astype(np.float64), out[:, 2].astype(int)
    assert picked.max() < 30
    valid = centers[:30]
    mu = valid.mean(0)
    cov = np.cov(valid, rowvar=False, bias=True) + h**2 * np.eye(2)
    se_mean = x.std(0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(x.mean(0) - mu) <= 4 * se_mean)
    dev = x - x.mean(0)
    for i in range(2):
        for j in range(2):
            prod = dev[:, i] * dev[:, j]
            assert _within(prod.mean(), prod.std(ddof=1) / np.sqrt(n), cov[i, j]), (i, j)
    z = (x - centers[picked]) / h  # the kernel noise: N(0, I)
    assert np.all(np.abs(z.mean(0)) <= 4 / np.sqrt(n))
    assert np.all(np.abs((z**2).mean(0) - 1) <= 4 * np.sqrt(2 / n))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("rule", proc.RULES)
def test_bandwidth_rules_against_scipy(rule, d):
    """h² = tr(SciPy gaussian_kde covariance)/d for the valid points (padding excluded); in
    d = 1 that is SciPy's kernel variance itself."""
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(d)
    x = rng.normal(size=(50, d)) * rng.uniform(0.5, 3.0, d)
    w = (np.arange(50) < 37).astype(np.float32)
    h = float(proc.rule_bandwidth(jnp.asarray(x, jnp.float32), jnp.asarray(w), rule))
    ref = gaussian_kde(x[:37].T, bw_method=rule)
    np.testing.assert_allclose(h**2, np.trace(ref.covariance) / d, rtol=1e-5)


def test_log_density_against_scikit_learn():
    from sklearn.neighbors import KernelDensity

    rng = np.random.default_rng(2)
    c = rng.normal(size=(60, 2))
    y = rng.normal(size=(25, 2)) * 2
    w = (np.arange(60) < 45).astype(np.float32)
    kde = proc.fit(jnp.asarray(c, jnp.float32), jnp.asarray(w), 0.35)
    ours = np.asarray(proc.log_density(kde, jnp.asarray(y, jnp.float32)))
    ref = KernelDensity(bandwidth=0.35).fit(c[:45]).score_samples(y)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_pairwise_and_ancestor_counts():
    x = jnp.asarray([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [1e3, 1e3]])
    w = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    # pairs: 25, 100, 25 -> mean 50
    assert float(proc.pairwise_sq_distance(x, w)) == pytest.approx(50.0)
    ids = jnp.asarray([4.0, 2.0, 4.0, 7.0, 9.0])
    assert int(proc.distinct_count(ids, jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0]))) == 3


# ------------------------------------------------------------------------------------------
# Datasets against scikit-learn, in distribution


def _sklearn_points(name, n, ds):
    from sklearn import datasets as skd

    if name == "blobs":
        return skd.make_blobs(n, centers=ds.centers, cluster_std=ds.cluster_std, random_state=0)[0]
    if name == "circles":
        return skd.make_circles(n, noise=ds.noise, factor=ds.factor, random_state=0)[0]
    if name == "moons":
        return skd.make_moons(n, noise=ds.noise, random_state=0)[0]
    return skd.make_swiss_roll(n, noise=ds.noise, random_state=0)[0][:, [0, 2]]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_datasets_match_scikit_learn(name):
    """First and second moments (E x_k, E x_k x_l) of our sampler and of scikit-learn's generator
    agree within 4 standard errors of their difference; the exact tr Cov used by the theory
    matches scikit-learn's sample within 4 standard errors."""
    ds = make_dataset(name, seed=7)
    n = 20_000
    ours = np.asarray(ds.sample(jax.random.key(0), n), np.float64)
    ref = np.asarray(_sklearn_points(name, n, ds), np.float64)
    feats = lambda p: np.stack(  # noqa: E731
        [p[:, 0], p[:, 1], p[:, 0] ** 2, p[:, 1] ** 2, p[:, 0] * p[:, 1]], 1
    )
    a, b = feats(ours), feats(ref)
    se = np.sqrt(a.var(0, ddof=1) / n + b.var(0, ddof=1) / n)
    assert np.all(np.abs(a.mean(0) - b.mean(0)) <= 4 * se), (a.mean(0), b.mean(0), se)
    dev = ref - ref.mean(0)
    sq = np.sum(dev**2, 1)
    assert _within(sq.mean(), sq.std(ddof=1) / np.sqrt(n), ds.trace_cov)
    assert ds.pair_second_moment == pytest.approx(2 * ds.trace_cov)


# ------------------------------------------------------------------------------------------
# Policies, the .npy path, bad input


@pytest.mark.parametrize(
    "changes",
    [
        dict(policy="accumulate"),
        dict(policy="accumulate-subsample", fresh_fraction=0.25, schedule="linear:4"),
        dict(policy="mix:0.5,0.25,0.25", bandwidth="silverman", dataset="blobs"),
    ],
)
def test_every_policy_runs(changes):
    config = dataclasses.replace(TINY, **changes)
    run_dir = RunDir(None)
    summary = study.run(config, run_dir, progress=False)
    assert summary["checks"] == []  # no closed form outside replace
    a = run_dir.arrays
    _, _, sizes, _ = study.setup(study.validate(config))
    for name in ("pairwise_sq_distance", "ancestors", "w2"):
        assert np.all(np.isfinite(a[f"{name}_chains"][:, : config.w2_chains])), name
    assert np.all(np.isfinite(a["heldout_nll_chains"][1:]))
    gens = a["generation"]
    assert np.all(a["ancestors_chains"] <= sizes[gens][:, None])
    assert np.all(a["ancestors_chains"] >= 1)
    state = run_dir.final_state.data
    if config.policy == "accumulate":  # everything drawn is kept
        assert np.all(np.asarray(state.count) == sizes.sum())


def test_npy_dataset(tmp_path):
    """N = M: generation 1 is fitted to every point of the file (ancestor index = row) and the
    NLL is in-sample; N > M: held-out rows are disjoint from T_0; NaN is refused."""
    pts = np.random.default_rng(0).normal(size=(12, 3))
    path = tmp_path / "pts.npy"
    np.save(path, pts)
    config = study.validate(dataclasses.replace(TINY, dataset=str(path)))
    ds, _, sizes, spec = study.setup(config)
    assert spec.in_sample and spec.heldout == 12
    family = proc.make_family(spec, ds)
    state, info = family.init(jax.random.key(0), None, GenInput(0, int(sizes[0]), True))
    x0 = np.asarray(state.data.x)
    assert sorted(x0[:, 3].astype(int)) == list(range(12))
    np.testing.assert_allclose(x0[:, :3], pts[x0[:, 3].astype(int)], rtol=1e-6)
    assert int(info.ancestors) == 12

    np.save(path, np.concatenate([pts, pts + 10]))
    config = study.validate(dataclasses.replace(TINY, dataset=str(path)))
    ds, _, sizes, spec = study.setup(config)
    assert not spec.in_sample and spec.heldout == 12
    state, _ = proc.make_family(spec, ds).init(jax.random.key(1), None, GenInput(0, 12, True))
    train = {tuple(r) for r in np.asarray(state.data.x)[:, :3].round(5)}
    held = {tuple(r) for r in np.asarray(state.heldout).round(5)}
    assert not train & held and len(train | held) == 24
    summary = study.run(config, RunDir(None), progress=False)
    assert summary["ancestors"]["mean"][0] == 12

    pts[4, 1] = np.nan
    np.save(path, pts)
    with pytest.raises(ConfigError, match="non-finite"):
        study.validate(dataclasses.replace(TINY, dataset=str(path)))


def test_config_errors():
    bad = [
        (dict(bandwidth="-1"), r"bandwidth must be > 0\.0, got -1\.0"),
        (dict(bandwidth="0"), "bandwidth must be > 0"),
        (dict(bandwidth="wide"), "'wide'"),
        (dict(dataset="spirals"), "unknown dataset 'spirals'"),
        (dict(dataset="missing.npy"), "not found"),
        (dict(samples=1), "at least 2 points"),
        (dict(factor=1.5), "factor"),
        (dict(policy="sideways"), "unknown policy"),
    ]
    for changes, message in bad:
        with pytest.raises(ConfigError, match=message):
            study.validate(dataclasses.replace(TINY, **changes))


def test_cli_bad_input_exits_2(tmp_path, capsys):
    """One line naming the value, exit code 2, no traceback: in a subprocess for the bandwidth,
    in-process for the dataset and a NaN file."""
    proc_ = subprocess.run(
        [sys.executable, "-m", "collapse_jax.cli", "run", "kde", "--bandwidth", "-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLLAPSE_JAX_NO_CACHE": "1"},
    )
    assert proc_.returncode == 2
    lines = proc_.stderr.strip().splitlines()
    assert len(lines) == 1 and "-1" in lines[0] and "Traceback" not in proc_.stderr
    from collapse_jax import cli

    pts = np.ones((20, 2))
    pts[3, 0] = np.nan
    np.save(tmp_path / "bad.npy", pts)
    for flags, needle in (
        (["--dataset", "spirals"], "spirals"),
        (["--dataset", str(tmp_path / "bad.npy")], "nan"),
    ):
        assert cli.main(["run", "kde", "--out", str(tmp_path / "o"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


# ------------------------------------------------------------------------------------------
# The study end to end and the experiments


def test_study_writes_run_directory(tmp_path):
    """End to end with Scott's rule: the files, the two required series, and the theory that
    still holds (the genealogy is Wright–Fisher whatever h: ancestors within 4 standard errors);
    the pairwise distance has no closed form and is drawn against the fixed-h curve."""
    out = tmp_path / "run"
    config = dataclasses.replace(TINY, bandwidth="scott", chains=256, seed=5)
    study.run(config, out, progress=False)
    for name in ("config.json", "metrics.npz", "summary.json", "report.md", "metrics.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "summary.json").read_text())
    for key in ("pairwise_sq_distance", "ancestors"):
        assert saved[key]["generation"] == [0, 2, 4]
        assert all(np.isfinite(saved[key]["mean"]))
    assert saved["ancestors"]["mean"][0] == TINY.samples
    assert {c["claim"].split("]")[0] for c in saved["checks"]} == {"E[ancestors"}
    assert all(abs(c["z"]) <= 4.0 for c in saved["checks"])
    assert np.isfinite(saved["reference_bandwidth"])
    assert "reference_pairwise_sq_distance" in np.load(out / "metrics.npz")
    assert "| claim" in (out / "report.md").read_text()


def test_experiments_load():
    files = sorted((ROOT / "experiments").glob("kde_*.toml"))
    assert len(files) == 12
    for path in files:
        module, config, description = load_experiment(path)
        assert module is study and "2410.16713" in description
        study.validate(config)
