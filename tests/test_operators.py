"""Data operators (core/operators.py): curation, verification, temperature, top-k / top-p and
weighted real data against closed forms and independent NumPy / SciPy computations, with
tolerances of 4 Monte Carlo standard errors; operators off give the numbers of before;
families refuse what they cannot take."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import collapse_jax as cj
from collapse_jax.core import operators as op
from collapse_jax.core.errors import ConfigError
from collapse_jax.core.loop import GenInput, precision
from collapse_jax.core.policies import Policy
from collapse_jax.families.discrete import kernel as dk
from collapse_jax.families.discrete import study as dstudy

Z = 4.0  # tolerance in Monte Carlo standard errors


def assert_within(mc, se, theory, what):
    mc, se, theory = (np.asarray(v, np.float64) for v in (mc, se, theory))
    z = np.abs(mc - theory) / se
    print(f"z-score {what}: max {np.max(z):.2f}")  # shown with pytest -s
    assert np.all(z < Z), f"{what}: MC {mc} ± {se} vs theory {theory} (z = {z})"
    return float(np.max(z))


# --------------------------------------------------------------------------------------------
# Independent NumPy computations of the categorical laws


def np_curation_law(p, r, k):
    """Best-of-k by enumeration of all k-tuples of candidates: P(kept = i)."""
    p, r = np.asarray(p, np.float64), np.asarray(r, np.float64)
    out = np.zeros(len(p))
    for tup in itertools.product(range(len(p)), repeat=k):
        prob = np.prod(p[list(tup)])
        w = np.exp(r[list(tup)])
        for j, i in enumerate(tup):
            out[i] += prob * w[j] / w.sum()
    return out


def np_temper_truncate(p, tau=1.0, top_k=0, top_p=1.0):
    p = np.asarray(p, np.float64) ** (1.0 / tau)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.ones(len(p), bool)
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1:
        mass = 0.0
        for i in np.argsort(-q, kind="stable"):
            if mass >= top_p:
                keep[i] = False
            mass += q[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def discrete_state(counts, p0):
    k = len(counts)
    return dk.DiscreteState(
        counts=jnp.asarray(counts, jnp.int32),
        pool=jnp.zeros(k, jnp.int32),
        p0=jnp.asarray(p0, jnp.float32),
        index=jnp.arange(k, dtype=jnp.int32),
        p0_dropped=jnp.zeros((), jnp.float32),
        absorbed_at=jnp.asarray(-1, jnp.int32),
        absorbed_state=jnp.asarray(-1, jnp.int32),
    )


def one_step_counts(ops, counts, m, chains, seed=0):
    """Counts of T_n after one step of the discrete family from fixed counts (one vector for
    every chain, or one per chain), per chain."""
    counts = np.broadcast_to(np.asarray(counts), (chains, np.shape(counts)[-1]))
    p0 = counts[0] / counts[0].sum()
    state = jax.vmap(discrete_state, (0, None))(jnp.asarray(counts), p0)
    params = dk.DiscreteParams(
        jnp.asarray(p0, jnp.float32), jnp.asarray(0, jnp.int32), jnp.asarray(0.0, jnp.float32)
    )
    keys = jax.random.split(jax.random.key(seed), chains)
    return np.asarray(_stepper(ops, m)(keys, state, params).counts, np.float64)


@functools.lru_cache
def _stepper(ops, m):
    fam = dk.make_family(Policy(), "counts", max_size=m, ops=ops)
    gen = GenInput(jnp.int32(2), jnp.int32(m), jnp.asarray(False))
    return jax.jit(lambda k, s, p: jax.vmap(fam.step, (0, 0, None, None))(k, s, p, gen)[0])


def check_counts(counts, law, m, what):
    """Mean counts per state against m·law (multinomial standard errors)."""
    chains = counts.shape[0]
    se = np.sqrt(np.maximum(m * law * (1 - law), 1e-12) / chains)
    live = law > 0
    assert np.all(counts[:, ~live] == 0), f"{what}: a state outside the law's support was drawn"
    return assert_within(counts.mean(0)[live], se[live], m * law[live], what)


# --------------------------------------------------------------------------------------------
# Curation


def test_curation_factor_matches_enumeration():
    """H_K by quadrature (float64) equals the enumeration over all K-tuples."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    r = np.array([0.0, 1.5, -2.0, 3.0])
    with precision(True):
        for k in (1, 2, 3, 5):
            h = np.asarray(op.curation_factor(jnp.asarray(p), jnp.asarray(r), k))
            np.testing.assert_allclose(p * h, np_curation_law(p, r, k), rtol=1e-9, atol=1e-12)


def test_curation_limit_and_reward_growth():
    """K → ∞ gives p·e^r / E[e^r] and E_p̃[e^r] >= E_p[e^r] for every K (Chebyshev's sum
    inequality, theory/operators.md), on random p and r computed in NumPy."""
    rng = np.random.default_rng(0)
    with precision(True):
        for _ in range(5):
            p = rng.dirichlet(np.ones(4))
            r = rng.normal(0, 1.5, 4)
            base = p @ np.exp(r)
            prev = base
            for k in (2, 3, 4):
                law = np_curation_law(p, r, k)
                grown = law @ np.exp(r)
                assert grown >= prev - 1e-12  # grows with K too
                prev = grown
            tilted = p * np.exp(r) / base
            big = p * np.asarray(op.curation_factor(jnp.asarray(p), jnp.asarray(r), 20000))
            np.testing.assert_allclose(big, tilted, atol=2e-3)
            np.testing.assert_allclose(np.asarray(op.tilt(jnp.asarray(p), jnp.asarray(r))), tilted)


def test_best_of_k_tournament_simulation_matches_curation_law():
    """A direct NumPy simulation of Bradley–Terry best-of-K (K candidates, keep one ∝ e^r)
    against p·H_K from the quadrature."""
    rng = np.random.default_rng(1)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    r = np.array([0.0, -1.0, 1.0, 2.0])
    k, n = 4, 200_000
    cand = rng.choice(4, size=(n, k), p=p)
    w = np.exp(r[cand])
    pick = (rng.random(n)[:, None] > np.cumsum(w / w.sum(1, keepdims=True), 1)).sum(1)
    kept = cand[np.arange(n), pick]
    freq = np.bincount(kept, minlength=4) / n
    with precision(True):
        law = p * np.asarray(op.curation_factor(jnp.asarray(p), jnp.asarray(r), k))
    assert_within(freq, np.sqrt(law * (1 - law) / n), law, "best-of-4 tournament")


# --------------------------------------------------------------------------------------------
# The discrete family: one generation's counts are multinomial of the transformed law


def _ops(**fields):
    cfg = dstudy.Config(**{"states": 5, **fields})
    return op.parse(cfg, "discrete", dk.OPERATORS, states=5)


COUNTS = np.array([400, 300, 150, 100, 50])
REWARD = "0,-1,1,2,0.5"


@pytest.mark.parametrize(
    ("fields", "law"),
    [
        ({"curate": "3", "reward": REWARD}, lambda p: np_curation_law(p, [0, -1, 1, 2, 0.5], 3)),
        (
            {"curate": "inf", "reward": REWARD},
            lambda p: p * np.exp([0, -1, 1, 2, 0.5]) / (p @ np.exp([0, -1, 1, 2, 0.5])),
        ),
        (
            {"verify": "0.9,0.2", "good": "2-4"},
            lambda p: p * np.array([0.2, 0.2, 0.9, 0.9, 0.9]) / (p @ [0.2, 0.2, 0.9, 0.9, 0.9]),
        ),
        ({"temperature": 0.5}, lambda p: np_temper_truncate(p, tau=0.5)),
        ({"temperature": 2.0, "top_k": 3}, lambda p: np_temper_truncate(p, 2.0, top_k=3)),
        ({"top_p": 0.8}, lambda p: np_temper_truncate(p, top_p=0.8)),
        (
            {"temperature": 1.5, "top_p": 0.9, "curate": "2", "reward": REWARD},
            lambda p: np_curation_law(np_temper_truncate(p, 1.5, top_p=0.9), [0, -1, 1, 2, 0.5], 2),
        ),
    ],
    ids=["curate3", "curate-inf", "verify", "temperature", "temp-topk", "top-p", "composed"],
)
def test_categorical_law(fields, law):
    """The transformed law (float64) equals p̃ computed independently in NumPy."""
    p = COUNTS / COUNTS.sum()
    ops = _ops(**fields)
    with precision(True):
        reward = jnp.asarray([0, -1, 1, 2, 0.5], jnp.float64) if ops.curate else None
        good = jnp.asarray([False, False, True, True, True]) if ops.verify else None
        got = np.asarray(op.categorical(jnp.asarray(p), ops, reward, good))
    np.testing.assert_allclose(got, law(p), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1.5, "top_p": 0.9, "curate": "2", "reward": REWARD},
        {"curate": "3", "reward": REWARD, "verify": "0.9,0.2", "good": "2-4", "top_k": 4},
    ],
    ids=["temp-topp-curate2", "topk-curate3-verify"],
)
def test_discrete_one_generation_counts(fields):
    """E[counts of T_n | p_n] = M·p̃ (the family's exact multinomial of the operators' law),
    p̃ computed independently in NumPy."""
    m, chains = 200, 4096
    counts = one_step_counts(_ops(**fields), COUNTS, m, chains)
    p = COUNTS / COUNTS.sum()
    law = np_temper_truncate(
        p, fields.get("temperature", 1.0), fields.get("top_k", 0), fields.get("top_p", 1.0)
    )
    law = np_curation_law(law, [0, -1, 1, 2, 0.5], int(fields["curate"]))
    if "verify" in fields:
        law = law * np.array([0.2, 0.2, 0.9, 0.9, 0.9])
        law /= law.sum()
    assert np.all(counts.sum(1) == m)
    check_counts(counts, law, m, str(fields))


def test_temperature_fixed_points():
    """The mean map p ↦ p^{1/τ}/Z iterates to p_n ∝ p_0^{τ^{-n}}: towards the mode for τ < 1 and
    towards uniform for τ > 1. Simulated with M = 10^6 (the finite-M bias is O(1/M), far below
    the standard error of 64 chains) for 3 generations from fixed counts."""
    p0 = COUNTS / COUNTS.sum()
    m, chains = 1_000_000, 64
    for tau in (0.6, 1.8):
        ops = _ops(temperature=tau)
        counts = np.tile(COUNTS, (chains, 1))
        for g in range(3):  # each chain continues from its own counts
            counts = one_step_counts(ops, counts.astype(np.int64), m, chains, seed=g)
        pn = counts / m
        theory = p0 ** (tau**-3) / np.sum(p0 ** (tau**-3))
        se = pn.std(0, ddof=1) / np.sqrt(chains)
        assert_within(pn.mean(0), np.maximum(se, 1e-7), theory, f"temperature {tau}")
        far = special.softmax(np.log(p0) * tau**-20)
        expected = np.eye(5)[0] if tau < 1 else np.full(5, 0.2)
        np.testing.assert_allclose(far, expected, atol=1e-3)


# --------------------------------------------------------------------------------------------
# The Gaussian family


def gaussian_one_step(fields, mean, cov, m, chains, sampler="sufficient", seed=0):
    """Means and covariances fitted at generation 2 from a fixed model N(mean, cov), per chain
    (float64)."""
    from collapse_jax.families.gaussian import d0 as gd0
    from collapse_jax.families.gaussian import kernel as gk
    from collapse_jax.families.gaussian import study as gstudy

    d = len(mean)
    cfg = gstudy.Config(dim=d, **fields)
    ops = op.parse(cfg, "gaussian", gk.OPERATORS, dim=d)
    with precision(True):
        d0 = gd0.make_d0("normal", d, 1.0)
        fam = gk.make_family(d0, [m, m, m], sampler=sampler, policy=Policy(), ops=ops)
        keys = jax.random.split(jax.random.key(seed), 2 * chains)
        state, _ = jax.vmap(fam.init, (0, None, None))(
            keys[:chains], None, GenInput(jnp.int32(0), jnp.int32(m), jnp.asarray(False))
        )
        model, _ = gk.model_from_chol(jnp.asarray(mean), jnp.linalg.cholesky(jnp.asarray(cov)))
        state = state._replace(
            mean=jnp.broadcast_to(model.mean, state.mean.shape),
            chol=jnp.broadcast_to(model.chol, state.chol.shape),
            log_scale=jnp.broadcast_to(model.log_scale, state.log_scale.shape),
        )
        gen = GenInput(jnp.int32(2), jnp.int32(m), jnp.asarray(False))
        new, _ = jax.jit(jax.vmap(fam.step, (0, 0, None, None)))(keys[chains:], state, None, gen)
        lchol = new.chol * jnp.exp(new.log_scale)[:, None, :]
        covs = np.asarray(lchol @ jnp.swapaxes(lchol, 1, 2))
        assert not np.any(np.asarray(new.collapsed))
        return np.asarray(new.mean), covs


def mean_se(x):
    return x.mean(0), x.std(0, ddof=1) / np.sqrt(x.shape[0])


def test_gaussian_curation_limit_quadratic_reward():
    """K → ∞ with r(x) = −(a/2)‖x − c‖²: one generation's fitted mean and (unbiased) covariance
    have expectations μ̃ = Σ̃(Σ⁻¹μ + a c), Σ̃ = (Σ⁻¹ + aI)⁻¹ (NumPy)."""
    mean = np.array([0.5, -1.0])
    cov = np.array([[2.0, 0.6], [0.6, 1.0]])
    a, c = 0.8, np.array([2.0, 1.0])
    means, covs = gaussian_one_step(
        {"curate": "inf", "reward": f"quadratic:{a}:{c[0]},{c[1]}"}, mean, cov, 30, 4000
    )
    sigma = np.linalg.inv(np.linalg.inv(cov) + a * np.eye(2))
    mu = sigma @ (np.linalg.solve(cov, mean) + a * c)
    assert_within(*mean_se(means), mu, "tilted mean")
    assert_within(*mean_se(covs.reshape(-1, 4)), sigma.ravel(), "tilted covariance")


def test_gaussian_curation_limit_linear_reward_drift():
    """K → ∞ with r(x) = bx in 1-D: μ̃ = μ + σ² b and σ̃ = σ, so with the unbiased estimator
    E μ_G = μ_0 + (G − 1) σ_0² b (generation 1 is the fit to real data)."""
    b, g, chains = 0.3, 6, 2000
    res = cj.run(
        "gaussian",
        samples=20,
        chains=chains,
        generations=g,
        record_every=1,
        seed=1,
        curate="inf",
        reward=f"linear:{b}",
        d0_scale=1.5,
    )
    mu = res.arrays["final_mean_chains"][:, 0]
    assert_within(mu.mean(), mu.std(ddof=1) / np.sqrt(chains), (g - 1) * 1.5**2 * b, "drift")
    assert "curate" in res.summary["operators"][0]


def test_gaussian_verify_halfspace():
    """Verification of a 1-D model by {x >= c} with tpr, fpr: the fitted mean's expectation is
    the mean of p̃ ∝ φ·(tpr 1{x >= c} + fpr 1{x < c}) (SciPy normal integrals)."""
    from scipy import stats

    mu, sigma, c, tpr, fpr = 0.2, 1.3, 0.5, 0.9, 0.3
    means, _ = gaussian_one_step(
        {"verify": f"{tpr},{fpr}", "good": f"halfspace:1:{c}"},
        [mu],
        [[sigma**2]],
        40,
        4000,
        sampler="samples",
    )
    al = (c - mu) / sigma
    upper = mu * stats.norm.sf(al) + sigma * stats.norm.pdf(al)  # ∫_c^∞ x φ
    lower = mu * stats.norm.cdf(al) - sigma * stats.norm.pdf(al)
    theory = (tpr * upper + fpr * lower) / (tpr * stats.norm.sf(al) + fpr * stats.norm.cdf(al))
    assert_within(*mean_se(means[:, 0]), theory, "verified mean")


def test_gaussian_best_of_k_points_against_numpy_tournament():
    """Finite K on points (the shared point operator) against an independent NumPy tournament:
    the fitted mean's expectation is the mean of the best-of-K law."""
    mu, sigma, k, a, c = 0.0, 1.0, 3, 1.0, 1.5
    means, _ = gaussian_one_step(
        {"curate": str(k), "reward": f"quadratic:{a}:{c}"},
        [mu],
        [[sigma**2]],
        40,
        4000,
        sampler="samples",
    )
    rng = np.random.default_rng(5)
    n = 400_000
    x = rng.normal(mu, sigma, (n, k))
    w = np.exp(-0.5 * a * (x - c) ** 2)
    pick = (rng.random(n)[:, None] > np.cumsum(w / w.sum(1, keepdims=True), 1)).sum(1)
    kept = x[np.arange(n), pick]
    m1, s1 = mean_se(means[:, 0])
    assert_within(m1, np.hypot(s1, kept.std() / np.sqrt(n)), kept.mean(), "best-of-3 mean")


def test_real_weight_stationary_error_and_optimum():
    """He, Xu & Cheng's weighted real data: E‖μ_n − μ_0‖² reaches
    (σ²/n)[w² + k(1 − w)²]/[w(2 − w)] (derived in theory/operators.md), minimised at
    w* = (√(k² + 4k) − k)/2 (checked by SciPy's minimiser)."""
    from scipy import optimize

    n, k, w, chains = 12, 3.0, 0.45, 4000
    res = cj.run(
        "gaussian",
        samples=n,
        chains=chains,
        generations=25,
        record_every=1,
        seed=2,
        real_weight=w,
        real_ratio=k,
    )
    stationary = (w**2 + k * (1 - w) ** 2) / (w * (2 - w)) / n
    z = assert_within(
        res.arrays["mean_sq_error_mean"][-1],
        res.arrays["mean_sq_error_stderr"][-1],
        stationary,
        "stationary MSE",
    )
    assert all(ch["agrees"] for ch in res.checks)
    for kk in (0.5, 1.0, 3.0, 10.0):
        f = lambda ww, kk=kk: (ww**2 + kk * (1 - ww) ** 2) / (ww * (2 - ww))  # noqa: E731
        best = optimize.minimize_scalar(
            f, bounds=(1e-6, 1 - 1e-9), method="bounded", options={"xatol": 1e-10}
        ).x
        assert abs(best - (math.sqrt(kk * kk + 4 * kk) - kk) / 2) < 1e-6
    assert abs((math.sqrt(5) - 1) / 2 - 0.6180339887) < 1e-9 and z < Z


# --------------------------------------------------------------------------------------------
# Operators off: the numbers of before (computed on the code before operators existed, same
# seeds and settings), and refusals


#: (study, settings, metric, value at the last generation) from the pre-operator code path.
BEFORE = [
    (
        "discrete",
        dict(
            states=10, p0="zipf:1.1", samples=50, chains=64, generations=20, seed=3, method="counts"
        ),
        "heterozygosity_mean",
        0.5531250834465027,
    ),
    (
        "gaussian",
        dict(samples=20, chains=64, generations=20, seed=3, record_every=1),
        "mean_sq_error_mean",
        1.0624145814513462,
    ),
    (
        "gaussian",
        dict(
            samples=20,
            chains=64,
            generations=20,
            seed=3,
            record_every=1,
            sampler="samples",
            fresh_fraction=0.1,
        ),
        "trace_cov_mean",
        1.0552717107919907,
    ),
    (
        "gmm",
        dict(samples=60, chains=8, generations=3, seed=3, record_every=1),
        "heldout_loglik_mean",
        -3.326697587966919,
    ),
    (
        "kde",
        dict(samples=60, chains=8, generations=3, seed=3, record_every=1),
        "pairwise_sq_distance_mean",
        2.0676417350769043,
    ),
]


@pytest.mark.parametrize(
    ("study", "settings", "metric", "value"),
    BEFORE,
    ids=[f"{b[0]}-{i}" for i, b in enumerate(BEFORE)],
)
def test_operators_off_give_the_numbers_of_before(study, settings, metric, value):
    res = cj.run(study, **settings)
    if study == "gmm":
        # EM runs in float32 and stops on a tolerance, so its last digits follow the processor's
        # order of float32 sums: the recorded value came from an AVX-512 machine, and an AVX2
        # one gives -3.3266168 (2.4e-5 relative; tolerance 1e-4). Any operator that is not off
        # moves it far more: best-of-2 curation with a reward slope of only 0.01 by 1.0e-3
        # relative, a verifier that rejects 0.1 % of points by 2.9e-2.
        assert float(res.arrays[metric][-1]) == pytest.approx(value, rel=1e-4, abs=0)
    else:
        assert float(res.arrays[metric][-1]) == value
    assert res.summary["operators"] == []
    if study == "discrete":  # identity settings are "off" too: the same numbers
        same = cj.run(study, temperature=1.0, top_p=1.0, top_k=0, verify="off", **settings)
        assert float(same.arrays[metric][-1]) == value


@pytest.mark.parametrize(
    ("study", "settings", "operator"),
    [
        ("gaussian", {"temperature": 0.5}, "temperature"),
        ("gmm", {"real_weight": 0.5}, "real_weight"),
        ("kde", {"real_weight": 0.5}, "real_weight"),
        ("regression", {"curate": "4", "reward": "linear:1"}, "curate"),
        ("discrete", {"real_weight": 0.5}, "real_weight"),
        ("gmm", {"curate": "inf", "reward": "linear:1,0"}, "curate inf"),
        ("gaussian", {"verify": "0.9,0.1", "good": "halfspace:1:0"}, "verify"),  # sufficient
    ],
)
def test_family_refuses_an_operator(study, settings, operator):
    with pytest.raises(ConfigError) as e:
        cj.run(study, chains=8, generations=2, **settings)
    msg = str(e.value)
    assert "\n" not in msg and study in msg and operator in msg, msg


# --------------------------------------------------------------------------------------------
# Point families (GMM, KDE, user): the shared point operator


def test_point_operator_law_against_numpy():
    """point_samples on a 1-D standard normal: curated-and-verified points have the law
    ∝ p·H_K·(tpr on the region, fpr off it); compared with an independent NumPy tournament
    followed by rejection, and the dropped fraction with (1 − A)^V."""
    fields = {
        "curate": "2",
        "reward": "linear:1.0",
        "verify": "0.8,0.2",
        "good": "ball:1:0",
        "verify_draws": 3,
    }
    from collapse_jax.core.point_family import PointConfig

    ops = op.parse(PointConfig(**fields), "point", op.POINT_OPERATORS, dim=1)
    n = 200_000
    x, w = jax.jit(
        lambda k: op.point_samples(k, lambda kk, m: jax.random.normal(kk, (m, 1)), n, ops)
    )(jax.random.key(3))
    x, w = np.asarray(x[:, 0], np.float64), np.asarray(w, np.float64)
    rng = np.random.default_rng(7)
    cand = rng.normal(size=(4 * n, 2))
    pick = np.where(rng.random(4 * n) < np.exp(cand[:, 1]) / np.exp(cand).sum(1), 1, 0)
    cur = cand[np.arange(4 * n), pick]
    acc = rng.random(4 * n) < np.where(np.abs(cur) <= 1, 0.8, 0.2)
    ref = cur[acc]
    kept = x[w > 0]
    se = np.hypot(kept.std() / np.sqrt(len(kept)), ref.std() / np.sqrt(len(ref)))
    assert_within(kept.mean(), se, ref.mean(), "curated+verified mean")
    se2 = np.hypot(kept.var() * np.sqrt(2 / len(kept)), ref.var() * np.sqrt(2 / len(ref)))
    assert_within(kept.var(), se2, ref.var(), "curated+verified variance")
    a = acc.mean()
    drop = (1 - a) ** 3
    # the dropped fraction against (1 − A)^V, A from the NumPy reference (its error included)
    se_a = np.sqrt(a * (1 - a) / (4 * n))
    se3 = np.hypot(np.sqrt(drop * (1 - drop) / n), 3 * (1 - a) ** 2 * se_a)
    assert_within(1 - w.mean(), se3, drop, "dropped fraction")


def test_gmm_and_user_family_take_curation():
    """The GMM study and a user point family run with curate and verify: the reward pulls the
    mixture's mass towards it, and the report lists the operators."""
    cur = cj.run(
        "gmm",
        samples=100,
        chains=8,
        generations=3,
        seed=1,
        components=1,
        record_every=1,
        curate="4",
        reward="linear:2,0",
        verify="0.9,0.1",
        good="halfspace:1,0:0",
    )
    assert len(cur.summary["operators"]) == 2
    # best-of-4 with r = 2x moves the mean by more than σ per generation; the plain recursion's
    # L2 distance after 3 generations of 100 points is about 0.01
    assert cur.arrays["l2_distance_mean"][-1] > 0.1

    from collapse_jax.core.point_family import PointFamily

    def fit(x, w):
        m = jnp.sum(w[:, None] * x, 0) / jnp.sum(w)
        return m

    pf = PointFamily(
        "shift",
        fit,
        lambda k, m, n: m[None, :] + jax.random.normal(k, (n, 1)),
        lambda m: {"mean": m[0]},
        jnp.zeros(1),
    )
    with pytest.raises(ConfigError, match="shift family cannot take the curate inf"):
        cj.run(pf, samples=50, chains=8, generations=2, curate="inf", reward="linear:1")
    # best-of-K with r = x on N(μ, 1): E[μ_{n+1} − μ_n] = E[max-by-Gumbel] (NumPy tournament)
    k, chains = 3, 512
    res = cj.run(pf, samples=50, chains=chains, generations=2, curate=str(k), reward="linear:1")
    rng = np.random.default_rng(11)
    cand = rng.normal(size=(400_000, k))
    g = cand + rng.gumbel(size=cand.shape)
    shift = cand[np.arange(len(cand)), g.argmax(1)].mean()
    mu = res.arrays["mean_final_chains"]
    # μ_2 = μ_1 + shift + noise/√50 with μ_1 ~ N(0, 1/50): E μ_2 = shift
    assert_within(mu.mean(), mu.std(ddof=1) / np.sqrt(chains), shift, "user family best-of-3")


# --------------------------------------------------------------------------------------------
# Tale of tails: top-k truncation of Zipf data and a memorising learner


def test_zipf_truncation_memorising_learner():
    """T samples of the top-k truncation q of p = Zipf(β) over K states (the discrete family's
    top-k operator); a memorising learner errs on a test token from p that its T samples never
    showed: E err = Σ_{i<=k} p_i (1 − q_i)^T + Σ_{i>k} p_i (exact; NumPy), whose two terms
    follow T^{−(1−1/β)} and k^{−(β−1)} (theory/operators.md)."""
    beta, k_states, top_k, t, chains = 1.5, 400, 60, 300, 1024
    ranks = np.arange(1, k_states + 1)
    p = ranks**-beta / np.sum(ranks**-beta)
    counts = np.round(p * 2**24).astype(np.int64)  # the fitted model: p to float32 precision
    pf = counts / counts.sum()
    q = np.where(ranks <= top_k, pf, 0.0)
    q /= q.sum()
    exact = np.sum(pf * (1 - q) ** t)
    ops = op.parse(
        dstudy.Config(states=k_states, top_k=top_k), "discrete", dk.OPERATORS, states=k_states
    )
    drawn = one_step_counts(ops, counts, t, chains)
    err = (drawn == 0) @ pf
    assert_within(err.mean(), err.std(ddof=1) / np.sqrt(chains), exact, "tale-of-tails error")
    # The asymptotic law (theory/operators.md): err ≈ A T^{−(1−1/β)} + B k^{−(β−1)} with
    # A = Γ(1 − 1/β)/(β ζ(β)^{1/β}) and B = 1/((β − 1) ζ(β)); each term is the error where it
    # dominates (T p_k ≪ 1: the sample never reaches the cut; T p_k ≫ 1: only the lost tail is
    # missed), compared with the exact sum on a 2·10^6-state Zipf support.
    big = np.arange(1, 2_000_001, dtype=np.float64)
    zeta = special.zeta(beta)
    pz = big**-beta / zeta
    a_coef = special.gamma(1 - 1 / beta) / (beta * zeta ** (1 / beta))
    for tt, kk, term in ((10**4, 10**5, "T"), (10**7, 100, "k")):
        qz = np.where(big <= kk, pz, 0.0) / pz[:kk].sum()
        ex = np.sum(pz * (1 - qz) ** tt) + (1 - pz.sum())
        law_t = a_coef * tt ** -(1 - 1 / beta)
        law_k = kk ** (1 - beta) / ((beta - 1) * zeta)
        law = law_t if term == "T" else law_k
        assert abs(ex / law - 1) < 0.05, (tt, kk, ex, law_t, law_k)
        assert max(law_t, law_k) * 0.9 < ex < law_t + law_k


# --------------------------------------------------------------------------------------------
# Host arrays (language model): curation and verification of decoded sequences


def test_select_indices_law_against_enumeration():
    """select_indices on a pool of 5 outputs (uniform candidates): the kept law is the best-of-K
    law of the uniform pool times the verifier's acceptance (NumPy enumeration), and the kept
    count is n (1 − (1 − A)^V)."""
    from collapse_jax.families.lm import config as lmc

    cfg = lmc.Config(
        curate="3", reward="length", verify="0.9,0.2", good="loglik:-1", verify_draws=2
    )
    ops = op.parse(cfg, "lm", lmc.OPERATORS, sequences=True)
    reward = np.array([0.0, 1.0, 2.0, -1.0, 0.5])
    correct = np.array([True, False, True, False, True])
    n = 200_000
    idx = op.select_indices(np.random.default_rng(0), 5, n, ops, reward, correct)
    law = np_curation_law(np.full(5, 0.2), reward, 3)
    acc = np.where(correct, 0.9, 0.2)
    a = law @ acc
    kept_law = law * acc / a
    freq = np.bincount(idx, minlength=5) / len(idx)
    assert_within(freq, np.sqrt(kept_law * (1 - kept_law) / len(idx)), kept_law, "kept law")
    keep = 1 - (1 - a) ** 2
    assert_within(len(idx) / n, np.sqrt(keep * (1 - keep) / n), keep, "kept fraction")


def test_lm_study_takes_curation_and_verification(tmp_path):
    """The LM study at tiny scale with curate (token-set reward) and verify (the synthetic
    source's likelihood): every training sequence of generation 2 is one of generation 1's
    decoded sequences, the set is no larger than the real one, and the report lists the
    operators."""
    import dataclasses

    from collapse_jax.families.lm import study as lm

    tiny = lm.Config(
        model="micro",
        block_size=8,
        synthetic_vocab=16,
        synthetic_blocks=64,
        train_blocks=16,
        eval_blocks=16,
        pretrain_blocks=16,
        pretrain_epochs=1,
        generations=2,
        epochs=1,
        seeds=1,
        fresh_fractions=(0.0,),
        batch_size=8,
        generate_batch_size=8,
        eval_batch_size=8,
        n_prompts=0,
        num_beams=2,
    )
    cfg = dataclasses.replace(
        tiny, curate="2", reward="tokens:0-7", verify="0.9,0.3", good="loglik:-2.5"
    )
    summary = lm.run(cfg, tmp_path / "run", progress=False)
    assert len(summary["operators"]) == 2
    assert "curate" in (tmp_path / "run" / "report.md").read_text()
    work = tmp_path / "run" / "work" / "seed0" / "arm0"
    train = np.load(work / "gen02" / "train.npy")
    generated = np.load(work / "gen01" / "generated.npy")
    assert 0 < len(train) <= 16
    assert all((row == generated).all(1).any() for row in train)


@pytest.mark.parametrize(("tau", "top_k"), [(0.5, 0), (2.0, 0), (1.0, 1)])
def test_gmm_temperature_and_top_k_on_components(tau, top_k):
    """The GMM's next batch is drawn from the fitted mixture with weights π^{1/τ} (normalised,
    then top-k) and covariances τΣ_k: per component, the batch fraction nearest its mean and
    the variance of its first coordinate agree with that law (computed here with NumPy from the
    fit the step kept) within 4 standard errors; top-1 draws only from the heaviest."""
    from collapse_jax.families.gmm import kernel as gk
    from collapse_jax.families.gmm import study as gs

    config = gs.validate(
        gs.Config(
            samples=4000, chains=1, generations=1, components=2, d0="mixture",
            d0_weights=(0.3, 0.7), d0_means=((-10.0, 0.0), (10.0, 0.0)), d0_covs=(1.0, 1.0),
            heldout=16, w2_samples=8, temperature=tau, top_k=top_k, tol=1e-4, max_iter=200,
        )
    )  # fmt: skip
    d0, _, sizes, spec = gs.setup(config)
    family = gk.make_family(spec, d0)
    state, _ = jax.jit(family.init)(jax.random.key(0), None, GenInput(0, int(sizes[0]), True))
    state, info = jax.jit(family.step)(
        jax.random.key(1), state, None, GenInput(1, int(sizes[1]), True)
    )
    fit = [np.asarray(a, np.float64) for a in state.gmm]  # model 1: weights, means, covs
    m = int(sizes[1])
    batch = np.asarray(info.batch[:m], np.float64)
    w = fit[0] ** (1 / tau)
    w = w / w.sum()
    if top_k:
        w = np.where(np.arange(2) == np.argmax(w), 1.0, 0.0)
    nearest = np.argmin(((batch[:, None, :] - fit[1][None]) ** 2).sum(-1), axis=1)
    for k in range(2):
        frac = np.mean(nearest == k)
        assert_within(frac, max(np.sqrt(w[k] * (1 - w[k]) / m), 1e-12), w[k], f"weight {k}")
        if w[k] > 0:
            x = batch[nearest == k, 0]
            var = tau * fit[2][k][0, 0]
            assert_within(x.var(ddof=1), var * np.sqrt(2 / (x.size - 1)), var, f"var {k}")


# --------------------------------------------------------------------------------------------
# Discrete: the exact two-class chain of curation and verification


@pytest.mark.parametrize(
    "fields",
    [
        {"verify": "0.9,0.3", "good": "6-9"},
        {"curate": "4", "reward": "0,0,0,0,0,0,1.5,1.5,1.5,1.5"},
        {"curate": "inf", "reward": "0,0,0,0,0,0,1,1,1,1"},
        {"curate": "3", "reward": "2,2,2,2,2,2,0,0,0,0", "verify": "0.8,0.4", "good": "0-5"},
    ],
    ids=["verify", "curate4", "curate-inf", "curate3-verify"],
)
def test_discrete_two_class_chain_matches_simulation(fields):
    """When curation and verification see two classes of states, the class mass is a binomial
    Markov chain whose mean the study computes exactly (theory/operators.md, "Two classes").
    The simulation draws every generation from the full 10-state law; at every recorded
    generation the mean over chains of the mass on correct states / the mean reward must be
    within 4 standard errors of the chain, and the report's rows must agree."""
    res = cj.run(
        "discrete",
        states=10,
        p0="zipf:1",
        samples=40,
        chains=2048,
        generations=12,
        seed=5,
        **fields,
    )
    names = [n for n in ("good_mass", "reward", "exp_reward") if f"theory_{n}" in res.arrays]
    assert names == [n for n in ("good_mass", "reward", "exp_reward") if f"{n}_mean" in res.arrays]
    a = res.arrays
    later = a["generation"] >= 1
    for name in names:
        # Standard error from the chain's exact variance: the empirical one is 0 once every
        # chain is absorbed, however far below 1 the exact mean still is.
        se = a[f"theory_{name}_sd"][later] / np.sqrt(2048)
        assert_within(a[f"{name}_mean"][later], se, a[f"theory_{name}"][later], name)
    rows = [c for c in res.summary["checks"] if "two-class chain" in c["claim"]]
    assert len(rows) >= 2 and all(c["agrees"] for c in rows), rows


def test_two_class_chain_moves_and_lumped_law_matches_the_full_law():
    """The lumped one-sample law (a finite binomial sum for curation) equals the full K-state
    law of :func:`operators.categorical` (quadrature) summed over the class, and the chain does
    move: verification with tpr > fpr drives the correct mass up from 0.2."""
    from collapse_jax.families.discrete import theory as wf

    p = np.array([0.05, 0.15, 0.3, 0.1, 0.4])
    reward, good = np.array([1.2, 1.2, -0.3, -0.3, -0.3]), np.array([1, 1, 0, 0, 0], bool)
    ops = _ops(curate="5", reward=",".join(map(str, reward)), verify="0.7,0.2", good="0-1")
    with precision(True):
        full = np.asarray(op.categorical(jnp.asarray(p), ops, jnp.asarray(reward), good))
    lumped = wf.lumped_law(np.array([0.2]), 5, (1.2, -0.3), (0.7, 0.2))
    np.testing.assert_allclose(full[:2].sum(), lumped[0], rtol=1e-9)
    means = wf.lumped_operator_means(p, ops, 30, 20)
    assert np.all(means["good_mass_sd"][1:] > 0)
    assert means["good_mass"][0] == pytest.approx(0.2)
    assert means["good_mass"][-1] > 0.9
    three = _ops(curate="5", reward="1,0.5,0,0,0")  # three reward levels: no lumping
    assert wf.lumped_operator_means(p, three, 30, 20) == {}
