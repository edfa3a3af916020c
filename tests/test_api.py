"""The Python API and the kernel contract: a user-defined family (a Poisson rate refitted from
M counts) defined here gets every policy and schedule, and its exact moments agree with the
simulation; built-in studies run in memory; the pure loop equals the host driver."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import collapse_jax as cj
from collapse_jax.core.errors import ConfigError
from collapse_jax.core.policies import split_batch

LAMBDA0 = 3.0
Z = 4.0  # agreement within Z Monte Carlo standard errors


def _fit(x, w):
    return jnp.sum(w * x) / jnp.sum(w)  # maximum likelihood rate of weighted counts


def _sample(key, rate, n):
    return jax.random.poisson(key, rate, (n,)).astype(jnp.float32)


def _metrics(rate):
    return {"rate": rate, "rate_sq": rate**2}


def _second_moment(gens, sizes, policy):
    """E[λ_n] = λ0 and E[λ_n²] exactly, for replace-like policies (β = 0) and accumulate.

    λ_1 = S_0 / M_0 with S_0 ~ Poisson(M_0 λ0). Replace-like, a batch of M = M_{n-1} holds
    a ~ Poisson(aλ_{n-1}) model counts and g = M − a fresh Poisson(gλ0) counts, so
    M² v_n = Mλ0 + a² v_{n−1} + 2ag λ0² + g² λ0². Accumulate: the pooled count S over N points
    gains Y | S ~ Poisson(a S / N) and Z ~ Poisson(g λ0), so with r = a / N
    E[S'²] = (1 + r)² E[S²] + aλ0 + gλ0 + (gλ0)² + 2(N + a) λ0 · gλ0, and v = E[S²] / N².
    """
    g_max = int(gens[-1])
    v = np.empty(g_max + 1)
    v[0] = LAMBDA0**2
    if policy.mode == "accumulate":
        total = 0
        s2 = 0.0  # E[S_n²] of the pooled count S_n
        for n in range(1, g_max + 1):
            m = int(sizes[n - 1])
            model, _, fresh = (int(c) for c in split_batch(m, policy))
            if n == 1:
                s2 = m * LAMBDA0 + (m * LAMBDA0) ** 2
            else:  # S += Y + Z, Y | λ ~ Poisson(model λ), Z ~ Poisson(fresh λ0), λ = S / total
                r = model / total
                s2 = (
                    s2 * (1 + r) ** 2
                    + model * LAMBDA0
                    + fresh * LAMBDA0
                    + (fresh * LAMBDA0) ** 2
                    + 2 * (1 + r) * (total * LAMBDA0) * fresh * LAMBDA0
                )
            total += m
            v[n] = s2 / total**2
        return {"rate_sq": v[gens], "rate": np.full(len(gens), LAMBDA0)}
    for n in range(1, g_max + 1):
        m = int(sizes[n - 1])
        if n == 1:
            v[n] = LAMBDA0**2 + LAMBDA0 / m
            continue
        a, _, g = (int(c) for c in split_batch(m, policy))
        v[n] = (LAMBDA0 * m + a**2 * v[n - 1] + 2 * a * g * LAMBDA0**2 + g**2 * LAMBDA0**2) / m**2
    return {"rate_sq": v[gens], "rate": np.full(len(gens), LAMBDA0)}


POISSON = cj.PointFamily(
    name="poisson",
    fit=_fit,
    sample=_sample,
    metrics=_metrics,
    d0=jnp.float32(LAMBDA0),
    theory=_second_moment,
    description="A Poisson rate refitted from M counts.",
)


@pytest.mark.parametrize(
    "policy,schedule",
    [
        ("replace", "constant"),
        ("replace", "linear:5"),
        ("accumulate", "constant"),
        ("accumulate-subsample", "constant"),
        ("mix:0.6,0.2,0.2", "constant"),
    ],
)
def test_user_family_under_every_policy(policy, schedule):
    res = cj.run(POISSON, samples=10, chains=4000, generations=12, policy=policy, schedule=schedule)
    rate = res.series["rate"]
    mean, se = np.asarray(rate["mean"]), np.asarray(rate["stderr"])
    # E[λ_n] = λ0 under every policy: each part of every batch is an unbiased draw.
    assert np.all(np.abs(mean[1:] - LAMBDA0) <= Z * se[1:]), (mean, se)
    if policy in ("replace", "accumulate"):
        # The exact second moment (closed form above) against the simulation, every generation.
        assert res.checks and all(c["agrees"] for c in res.checks), res.checks
        sq = res.series["rate_sq"]
        theory = res.arrays["theory_rate_sq"]
        assert np.all(np.abs(np.asarray(sq["mean"]) - theory) <= Z * np.asarray(sq["stderr"]))
    assert res.final_state.x.shape[0] == 4000
    assert res.run_dir is None


def test_user_family_fresh_fraction_second_moment():
    res = cj.run(POISSON, samples=10, chains=4000, generations=15, fresh_fraction=0.3)
    sq = res.series["rate_sq"]
    theory = res.arrays["theory_rate_sq"]
    assert np.all(np.abs(np.asarray(sq["mean"]) - theory) <= Z * np.asarray(sq["stderr"]))
    # Fresh data bounds the variance: far below the replace recursion's λ0² + nλ0/M.
    assert theory[-1] < LAMBDA0**2 + 15 * LAMBDA0 / 10 - 2.0


def test_user_family_writes_a_run_directory_when_asked(tmp_path):
    res = cj.run(POISSON, samples=5, chains=64, generations=4, out=tmp_path / "run")
    for name in ("config.json", "metrics.npz", "summary.json", "metrics.png", "report.md"):
        assert (tmp_path / "run" / name).exists(), name
    assert (
        "| claim | theory | Monte Carlo ± stderr | agrees? |"
        in (tmp_path / "run" / "report.md").read_text()
    )
    assert res.run_dir == tmp_path / "run"
    sweep = cj.sweep(POISSON, "samples", [5, 20], chains=64, generations=3)
    assert sorted(sweep) == [5, 20] and sweep[20].config.samples == 20


def test_builtin_study_in_memory_writes_nothing(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = cj.run("discrete", states=5, samples=20, chains=64, generations=30)
    finally:
        os.chdir(cwd)
    assert list(tmp_path.iterdir()) == []
    het = res.series["heterozygosity"]
    assert len(het["mean"]) == 31 and res.arrays["generation"][-1] == 30
    assert res.checks and {"claim", "theory", "monte_carlo", "agrees"} <= set(res.checks[0])
    assert res.final_state.counts.shape[0] == 64


@pytest.mark.parametrize(
    "study,settings,series",
    [
        ("gaussian", dict(dim=2, samples=10, chains=32, generations=20, record_every=5), "w2_sq"),
        (
            "gmm",
            dict(samples=60, chains=4, generations=3, record_every=1, w2_samples=16),
            "l2_distance",
        ),
    ],
)
def test_scan_studies_run_in_memory(study, settings, series):
    res = cj.run(study, **settings)
    assert res.run_dir is None
    assert len(res.series[series]["mean"]) == len(res.arrays["generation"])
    assert jax.tree.leaves(res.final_state)[0].shape[0] == settings["chains"]


def test_unknown_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown config key"):
        cj.run("discrete", chain=10)
    with pytest.raises(ConfigError, match="unknown study"):
        cj.run("poisson")
    with pytest.raises(ConfigError, match="samples"):
        cj.run(POISSON, samples=0)
    with pytest.raises(ConfigError, match="out=DIR"):
        cj.run("vae")


def test_pure_loop_inside_jit_equals_the_host_driver():
    from collapse_jax.core.point_family import make_family

    policy = cj.Policy.parse("accumulate-subsample")
    sizes = np.full(8, 6)
    family = make_family(POISSON, policy, 6, int(sizes[:-1].sum()) + 6)
    run = jax.jit(
        lambda key: cj.scan_generations(family, key, None, sizes, n_chains=16, record_every=3)
    )
    state, trace = run(jax.random.key(7))
    host = cj.run_generations(family, jax.random.key(7), 16, sizes, record_every=3, progress=False)
    np.testing.assert_array_equal(host.generations, [0, 3, 6, 7])
    np.testing.assert_allclose(np.asarray(trace["rate"].mean), host.trace["rate"].mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.pool_x), np.asarray(host.state.pool_x))


def test_readme_user_family_runs_as_written(tmp_path, monkeypatch):
    """The README's Poisson example, executed verbatim; its replace closed form agrees."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (code,) = [b for b in blocks if "cj.PointFamily(" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    checks = namespace["res"].checks
    assert checks and all(c["agrees"] for c in checks), checks
    assert (tmp_path / "runs" / "poisson" / "report.md").exists()
