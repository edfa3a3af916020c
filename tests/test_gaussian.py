"""Gaussian process: exact random draws, both samplers, both estimators, closed forms, metrics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from collapse_jax.core.loop import GenInput, run_generations
from collapse_jax.core.policies import Policy
from collapse_jax.families.gaussian import d0 as gd0
from collapse_jax.families.gaussian import kernel as proc
from collapse_jax.families.gaussian import metrics as met
from collapse_jax.families.gaussian import theory as th
from collapse_jax.numerics import random as rnd
from collapse_jax.numerics.wishart import bartlett

Z = 4.0  # tolerance in Monte Carlo standard errors


def agree(mc, se, theory):
    mc, se, theory = (np.asarray(v, np.float64) for v in (mc, se, theory))
    assert np.all(np.abs(mc - theory) <= Z * se + 1e-12), (mc, se, theory)


def simulate(d0, sizes, chains, *, sampler="sufficient", estimator="unbiased", policy=None, seed=0):
    family = proc.make_family(d0, sizes, sampler=sampler, estimator=estimator, policy=policy)
    r = run_generations(
        family._replace(
            reduce=functools.partial(proc.reduce_info, log_trace0=float(np.log(d0.trace)))
        ),
        jax.random.key(seed),
        chains,
        np.concatenate([sizes, sizes[-1:]]),
        progress=False,
    )
    return r.trace


# ------------------------------------------------------------------------------ exact draws


def test_log_gamma_is_exact():
    shapes = np.array([0.05, 0.7, 1.0, 4.5, 499.5])
    keys = jax.random.split(jax.random.key(11), 20000)
    lx = np.asarray(jax.vmap(lambda k: rnd.log_gamma(k, jnp.asarray(shapes)))(keys))
    for j, a in enumerate(shapes):
        col = lx[:, j].astype(np.float64)
        p = stats.kstest(col, lambda t, a=a: stats.gamma(a).cdf(np.exp(t))).pvalue
        assert p > 1e-3, (a, p)
        x = np.exp(col)
        agree(x.mean(), x.std() / np.sqrt(x.size), a)


def _log_gamma_reference(key, a, dtype):
    """The rejection loop written plainly for one key: proposal r (r >= 1) takes uniforms j and
    n + j of ``uniforms(key, 2 n, stream=r)``, every shape redrawn until it is accepted."""
    n = a.shape[0]
    d = a - 1.0 / 3.0
    c = 1.0 / np.sqrt(9.0 * d)
    u = rnd.uniforms(key, 3 * n, dtype).reshape(3, n)
    ok, lv = (np.asarray(x) for x in rnd._mt_propose(u[0], u[1], d, c))
    r = 0
    while not ok.all():
        r += 1
        w = rnd.uniforms(key, 2 * n, dtype, stream=r)
        ok2, lv2 = (np.asarray(x) for x in rnd._mt_propose(w[:n], w[n:], d, c))
        lv = np.where(ok, lv, lv2)
        ok = ok | ok2
    return np.log(d) + lv, r


@pytest.mark.parametrize("x64", [False, True])
def test_log_gamma_retries_match_a_plain_loop(x64):
    """Rejected lanes are redrawn one at a time over the flattened batch; the draws must be
    those of a plain loop over keys and rejection rounds (shape 1: about 5 % rejected)."""
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        a = jnp.asarray([1.0, 1.5, 40.0], dtype)
        keys = jax.random.split(jax.random.key(21), 64)
        vm = np.asarray(jax.jit(jax.vmap(lambda k: rnd.log_gamma(k, a, boost=False)))(keys))
        refs = [_log_gamma_reference(k, a, dtype) for k in keys]
    ref = np.stack([value for value, _ in refs])
    assert ref.dtype == dtype
    assert sum(rounds for _, rounds in refs) >= 2  # the retry path ran (here for 2+ keys)
    # Equal up to the rounding of a fused, jitted evaluation against an eager one (a few ulps);
    # a proposal from the wrong counter or stream would differ in the leading digits.
    np.testing.assert_allclose(vm, ref, rtol=1e-12 if x64 else 3e-6, atol=1e-12 if x64 else 1e-6)


def test_uniforms_open_interval_and_loop_keys_independent():
    key = jax.random.key(0)
    u = np.asarray(rnd.uniforms(key, 50000, jnp.float32))
    assert u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # the rejection loop's streams are unrelated to the first proposal's
    u2 = np.asarray(rnd.uniforms(key, 50000, jnp.float32, stream=1))
    assert abs(np.corrcoef(u, u2)[0, 1]) < 4 / np.sqrt(50000)
    with jax.enable_x64(True):
        u64 = np.asarray(rnd.uniforms(jax.random.key(0), 20000, jnp.float64))
    assert u64.dtype == np.float64 and u64.min() > 0 and u64.max() < 1
    assert stats.kstest(u64, "uniform").pvalue > 1e-3
    assert len(np.unique(u64)) == u64.size  # 52 random bits, not 23


def test_unrolled_threefry_equals_jax():
    from jax.extend.random import threefry_2x32

    kd = jax.random.key_data(jax.random.key(42)).astype(jnp.uint32)
    count = jnp.arange(64, dtype=jnp.uint32)
    ref = np.asarray(threefry_2x32(kd, count))
    y0, y1 = rnd.threefry2x32(kd[0], kd[1], count[:32], count[32:])
    assert np.array_equal(np.concatenate([np.asarray(y0), np.asarray(y1)]), ref)


def test_bartlett_gives_wishart_moments():
    d, dof = 3, 6
    keys = jax.random.split(jax.random.key(5), 20000)
    lower, log_diag = jax.vmap(lambda k: bartlett(k, dof, d))(keys)
    a = np.asarray(lower) + np.einsum("ni,ij->nij", np.exp(np.asarray(log_diag)), np.eye(d))
    w = np.einsum("nij,nkj->nik", a, a)
    # E W = dof I, Var W_ij = dof (1 + δ_ij)
    se = np.sqrt(w.var(0) / w.shape[0])
    agree(w.mean(0), se, dof * np.eye(d))
    # Var W_01 = dof; the standard error of a sample variance is √((μ₄ − σ⁴) / n), with the
    # fourth central moment μ₄ estimated from the same draws.
    dev2 = (w[:, 0, 1] - w[:, 0, 1].mean()) ** 2
    agree(w[:, 0, 1].var(), dev2.std() / np.sqrt(w.shape[0]), dof)


def test_singular_bartlett_has_zero_columns():
    lower, log_diag = bartlett(jax.random.key(0), 2, 4)
    assert np.all(np.isneginf(np.asarray(log_diag)[2:]))
    assert np.all(np.asarray(lower)[:, 2:] == 0)


# ------------------------------------------------------------------- one generation, samplers


@functools.cache
def one_generation(sampler, estimator, m=6, n=20000, seed=0):
    """Fit generation 2 from a fixed N(μ, Σ) (generation 1 taken as given) for n chains."""
    d0 = gd0.make_d0("normal", 2, mean=[1.0, -2.0], cov=[[2.0, 0.6], [0.6, 0.5]])
    family = proc.make_family(d0, [m, m], sampler=sampler, estimator=estimator)
    state, _ = family.init(jax.random.key(0), None, GenInput(0, m, True))
    x = GenInput(jnp.int32(2), jnp.int32(m), jnp.bool_(True))
    keys = jax.random.split(jax.random.key(seed), n)
    new, info = jax.vmap(family.step, (0, None, None, None))(keys, state, None, x)
    lchol = np.asarray(new.chol) * np.exp(np.asarray(new.log_scale))[:, None, :]
    cov = np.einsum("nij,nkj->nik", lchol, lchol)
    return np.asarray(new.mean), cov, info, d0


@pytest.mark.parametrize(
    ("sampler", "estimator"),
    [("sufficient", "unbiased"), ("samples", "mle"), ("samples", "unbiased")],
)
def test_one_generation_moments(sampler, estimator):
    m = 6
    seed = 1 if sampler == "samples" and estimator == "unbiased" else 0
    mean, cov, info, d0 = one_generation(sampler, estimator, m, seed=seed)
    n = mean.shape[0]
    agree(mean.mean(0), mean.std(0) / np.sqrt(n), d0.mean)
    # Cov(μ̂) = Σ / M, each entry against the standard error of its own sample covariance.
    dev = mean - mean.mean(0)
    prod = dev[:, :, None] * dev[:, None, :]
    agree(np.cov(mean.T), prod.std(0) / np.sqrt(n), d0.cov / m)
    factor = (m - 1) / th.divisor(m, estimator)
    agree(cov.mean(0), cov.std(0) / np.sqrt(n), d0.cov * factor)
    # log det: E log det(S/D) = log det Σ + Σ_j ψ((k−j)/2) + d log 2 − d log D
    expect = np.linalg.slogdet(d0.cov)[1] + th.log_det_drift([m], 2, estimator)[1]
    ld = np.asarray(info.log_det_cov)
    agree(ld.mean(), ld.std() / np.sqrt(n), expect)


def test_samplers_agree_in_distribution():
    a_mean, a_cov, a_info, _ = one_generation("sufficient", "unbiased", seed=0)
    b_mean, b_cov, b_info, _ = one_generation("samples", "unbiased", seed=1)
    for x, y in [
        (a_mean[:, 0], b_mean[:, 0]),
        (a_mean[:, 1], b_mean[:, 1]),
        (a_cov[:, 0, 0], b_cov[:, 0, 0]),
        (a_cov[:, 0, 1], b_cov[:, 0, 1]),
        (a_cov[:, 1, 1], b_cov[:, 1, 1]),
        (np.asarray(a_info.w2_sq), np.asarray(b_info.w2_sq)),
    ]:
        assert stats.ks_2samp(x, y).pvalue > 1e-3


# ------------------------------------------------------------------ recursions vs theory


@pytest.mark.parametrize(("sampler", "estimator"), [("samples", "unbiased"), ("sufficient", "mle")])
def test_theorem_3_1_closed_forms_1d(sampler, estimator):
    sizes = np.full(12, 8)
    d0 = gd0.make_d0("normal", 1, 1.5)
    tr = simulate(d0, sizes, 4000, sampler=sampler, estimator=estimator, seed=0)
    s0 = 1.5
    mse, v = th.moments(sizes, s0**2, Policy(), estimator)
    for n in (1, 4, 12):
        agree(tr["mean_sq_error"]["mean"][n], tr["mean_sq_error"]["stderr"][n], mse[n])
        agree(tr["trace_cov"]["mean"][n], tr["trace_cov"]["stderr"][n], v[n])
        agree(
            tr["std"]["mean"][n],
            tr["std"]["stderr"][n],
            th.sigma_moment(sizes, 1, estimator, s0)[n],
        )
        agree(
            tr["w2_sq"]["mean"][n], tr["w2_sq"]["stderr"][n], th.w2_sq_1d(sizes, s0, estimator)[n]
        )
        agree(
            tr["log_det_cov"]["mean"][n],
            tr["log_det_cov"]["stderr"][n],
            np.log(s0**2) + th.log_det_drift(sizes, 1, estimator)[n],
        )
    if estimator == "unbiased":
        assert np.allclose(v, s0**2)  # E σ_n² = σ_0²
        assert np.allclose(mse[1:], s0**2 * np.cumsum(1 / sizes))


def test_multivariate_trace_and_log_det_with_schedule():
    sizes = np.array([6, 7, 9, 12, 16, 20])
    d0 = gd0.make_d0(
        "normal", 3, mean=[0.0, 1.0, 2.0], cov=[[1.0, 0.3, 0], [0.3, 2, 0.5], [0, 0.5, 1]]
    )
    tr = simulate(d0, sizes, 4000, seed=4)
    mse, v = th.moments(sizes, d0.trace)
    ld = np.linalg.slogdet(d0.cov)[1] + th.log_det_drift(sizes, 3)
    for n in range(1, 7):
        agree(tr["mean_sq_error"]["mean"][n], tr["mean_sq_error"]["stderr"][n], mse[n])
        agree(tr["trace_cov"]["mean"][n], tr["trace_cov"]["stderr"][n], v[n])
        agree(tr["log_det_cov"]["mean"][n], tr["log_det_cov"]["stderr"][n], ld[n])


@pytest.mark.parametrize(
    ("family", "policy"),
    [("uniform", Policy("accumulate")), ("student-t", Policy("replace", 0.7, 0.0, 0.3))],
)
def test_policies_follow_exact_moment_recursion_for_non_gaussian_d0(family, policy):
    sizes = np.full(10, 12)
    d0 = gd0.make_d0(family, 1, 2.0)
    tr = simulate(d0, sizes, 4000, policy=policy, seed=5)
    mse, v = th.moments(sizes, d0.trace, policy)
    for n in (1, 5, 10):
        agree(tr["mean_sq_error"]["mean"][n], tr["mean_sq_error"]["stderr"][n], mse[n])
        agree(tr["trace_cov"]["mean"][n], tr["trace_cov"]["stderr"][n], v[n])
    assert mse[-1] < th.accumulate_mean_limit(12, d0.trace) or policy.mode != "accumulate"


@pytest.mark.parametrize(("sampler", "estimator"), [("sufficient", "unbiased"), ("samples", "mle")])
def test_accumulate_closed_forms_at_every_generation(sampler, estimator):
    """Accumulate, d = 3, M = 20, 30 generations: E‖μ_n − μ_0‖² and E tr Σ_n of the closed
    forms (theory/gaussian.md, "Accumulate: closed forms") within 4 standard errors at every
    generation, and the mean error below the Σ-known curve (tr Σ_0/M) Σ_{i<=n} 1/i²."""
    sizes = np.full(30, 20)
    cov = [[1.5, 0.4, 0.0], [0.4, 1.0, -0.3], [0.0, -0.3, 0.5]]
    d0 = gd0.make_d0("normal", 3, mean=[1.0, 0.0, -1.0], cov=cov)
    policy = Policy("accumulate")
    tr = simulate(d0, sizes, 4000, sampler=sampler, estimator=estimator, policy=policy, seed=7)
    mse, v = th.accumulate_moments(sizes, d0.trace, estimator)
    n = np.arange(1, 31)
    agree(tr["mean_sq_error"]["mean"][n], tr["mean_sq_error"]["stderr"][n], mse[n])
    agree(tr["trace_cov"]["mean"][n], tr["trace_cov"]["stderr"][n], v[n])
    known = th.accumulate_mean_known_cov(sizes, d0.trace)
    assert np.all(mse <= known * (1 + 1e-12)) and mse[-1] < known[-1]
    assert known[-1] < th.accumulate_mean_limit(20, d0.trace)


def test_first_fitted_model_is_the_same_under_accumulate_and_replace():
    """Generation 1 is fitted to the M_0 real D0 samples drawn in init, whatever the policy."""
    d0 = gd0.make_d0("normal", 2, cov=[[1.0, 0.5], [0.5, 2.0]])
    sizes = np.array([7])
    for sampler in proc.SAMPLERS:
        states = []
        for policy in (Policy(), Policy("accumulate")):
            family = proc.make_family(d0, sizes, sampler=sampler, policy=policy)
            r = run_generations(
                family, jax.random.key(2), 16, np.concatenate([sizes, sizes]), progress=False
            )
            states.append(r.state)
        for name in ("mean", "chol", "log_scale"):
            a, b = (np.asarray(getattr(s, name)) for s in states)
            assert np.array_equal(a, b), (sampler, name)
        assert np.array_equal(np.asarray(states[1].pool.count), np.full(16, 7.0))


def test_accumulate_closed_forms_agree_with_the_moment_recursion():
    """Two derivations of the accumulate moments agree: the product/series closed form, its
    Gamma-function form for constant M, and the general moment recursion of :func:`moments`."""
    for estimator in th.ESTIMATORS:
        for sizes in (np.full(400, 6), np.array([5, 9, 2, 30, 4, 11])):
            closed = th.accumulate_moments(sizes, 2.5, estimator)
            recursion = th.moments(sizes, 2.5, Policy("accumulate"), estimator)
            assert np.allclose(closed, recursion, rtol=1e-12, atol=0)
        m = 6
        n = np.arange(1, 401)
        v = th.accumulate_moments(np.full(400, m), 1.0, estimator)[1]
        assert np.allclose(th.accumulate_trace_constant(m, n, 1.0, estimator), v[1:], rtol=1e-10)
        lim = th.accumulate_trace_limit(m, 1.0, estimator)
        far = float(th.accumulate_trace_constant(m, 1e7, 1.0, estimator))
        assert lim < v[-1] and np.isclose(far, lim, rtol=1e-6)
        mean_lim = th.accumulate_mean_limit_exact(m, 1.0, estimator)
        pi2_6 = th.accumulate_mean_limit(m)
        assert lim * pi2_6 < mean_lim < pi2_6
    # MLE: lim E tr Σ_n = sin(π/√M) / (π/√M) tr Σ_0 (Euler's sine product)
    assert np.isclose(th.accumulate_trace_limit(20, 3.0, "mle"), 3.0 * np.sinc(1 / np.sqrt(20)))
    # Σ known, constant M: (tr Σ_0 / M) Σ_{i=1}^n 1/i²
    known = th.accumulate_mean_known_cov(np.full(50, 8), 2.0)
    assert np.allclose(known[1:], 2.0 / 8 * np.cumsum(1 / np.arange(1, 51) ** 2))


def test_samples_sampler_reuse_and_subsample_policies_run():
    sizes = np.full(8, 10)
    d0 = gd0.make_d0("mixture", 2)
    for policy in (Policy("mix", 0.5, 0.3, 0.2), Policy("accumulate-subsample")):
        tr = simulate(d0, sizes, 256, sampler="samples", policy=policy, seed=6)
        for name in ("w2_sq", "mean_sq_error", "trace_cov", "log_det_cov"):
            assert np.all(np.isfinite(tr[name]["mean"]))
        # generation 1 is fitted to real D0 samples: E tr Σ_1 = tr Σ_0 (unbiased)
        agree(tr["trace_cov"]["mean"][1], tr["trace_cov"]["stderr"][1], d0.trace)


# ------------------------------------------------------------------------- closed forms


def test_closed_form_identities():
    sizes = np.array([5, 10, 100, 1000])
    a = th.alpha(sizes)
    assert np.all(a < 1)
    assert np.allclose(th.sigma_moment(sizes, 1.0), np.concatenate([[1], np.cumprod(a)]))
    assert np.allclose(th.sigma_moment(sizes, 2.0), 1.0)
    s = np.concatenate([[0], np.cumsum(1 / sizes)])
    assert np.allclose(th.w2_sq_1d(sizes, 2.0), 4 * (s + 2 - 2 * th.sigma_moment(sizes, 1.0)))
    drift = th.log_det_drift(sizes)
    k = sizes - 1.0
    from scipy.special import digamma

    assert np.allclose(np.diff(drift), digamma(k / 2) - np.log(k / 2))
    assert np.all(np.diff(drift) < 0)
    _, v = th.moments(sizes, 1.0, estimator="mle")
    assert np.allclose(v, np.concatenate([[1], np.cumprod((sizes - 1) / sizes)]))
    big = np.full(50, 10_000)
    assert np.allclose(th.w2_sq_1d(big)[1:], th.w2_sq_first_order(big)[1:], rtol=1e-3)


def test_schedules_bounded_vs_unbounded():
    g = np.arange(2000)
    superlinear = 10 * (g + 1) ** 2
    linear = 10 * (g + 1)
    w_sup, w_lin = th.w2_sq_1d(superlinear), th.w2_sq_1d(linear)
    assert w_sup[-1] < 1.5 * 1.5 * np.pi**2 / 6 / 10  # bounded by (3/2)Σ 1/M_i < (3/2)π²/60
    assert w_lin[-1] > 1.5 * np.log(2000) / 10 * 0.9  # grows like the harmonic series


def test_accumulate_bounded_mean_error():
    sizes = np.full(5000, 10)
    mse, v = th.moments(sizes, 1.0, Policy("accumulate"))
    assert np.all(np.diff(mse) >= 0) and mse[-1] < th.accumulate_mean_limit(10)
    assert v[-1] > 0.8  # the variance does not collapse


# ------------------------------------------------------------------------------ metrics


def test_w2_1d_matches_quantile_quadrature_for_every_d0(tmp_path):
    data = np.random.default_rng(0).gamma(2.0, size=301)
    path = tmp_path / "d.npy"
    np.save(path, data)
    for spec in ("normal", "uniform", "student-t", "mixture", str(path)):
        d0 = gd0.make_d0(spec, 1, 1.3)
        if d0.family == "data":
            xs = np.sort(data)
            q = lambda u, xs=xs: xs[np.minimum((u * xs.size).astype(int), xs.size - 1)]  # noqa: E731
        elif d0.family == "normal":
            q = stats.norm(0, 1.3).ppf
        elif d0.family == "uniform":
            q = stats.uniform(-1.3 * np.sqrt(3), 2 * 1.3 * np.sqrt(3)).ppf
        elif d0.family == "student-t":
            q = stats.t(5, scale=1.3 * np.sqrt(3 / 5)).ppf
        else:  # invert the mixture CDF on a fine grid
            a, b = gd0.MIXTURE_OFFSET * 1.3, gd0.MIXTURE_SD * 1.3
            grid = np.linspace(-12, 12, 400_001)
            cdf = 0.5 * (stats.norm.cdf(grid, -a, b) + stats.norm.cdf(grid, a, b))
            q = lambda u, grid=grid, cdf=cdf: np.interp(u, cdf, grid)  # noqa: E731
        spec_m = proc.d0_metric_spec(d0)
        for mu, sigma in [(0.3, 0.7), (-1.0, 2.0)]:
            exact = met.w2_sq_1d(mu, sigma, spec_m.mean[0], spec_m.trace, spec_m.kappa)
            quad = met.w2_sq_1d_quadrature(mu, sigma, q)
            assert abs(exact - quad) < 2e-3 * max(1, quad), (spec, exact, quad)


def test_bures_formula_and_log_space_metrics_agree():
    rng = np.random.default_rng(1)
    b = rng.normal(size=(3, 3))
    s1 = b @ b.T + 0.1 * np.eye(3)
    c = rng.normal(size=(3, 3))
    s0 = c @ c.T + 0.2 * np.eye(3)
    m1, m0 = rng.normal(size=3), rng.normal(size=3)
    spec = met.metric_spec(m0, s0)
    model, _ = proc.model_from_chol(jnp.asarray(m1), jnp.asarray(np.linalg.cholesky(s1)))
    m = met.gaussian_metrics(model.mean, model.chol, model.log_scale, spec, False)
    ref = met.bures_w2_sq(jnp.asarray(m1), jnp.asarray(s1), jnp.asarray(m0), jnp.asarray(s0))
    assert np.isclose(float(m.w2_sq), float(ref), rtol=1e-4)
    assert np.isclose(float(m.log_det_cov), np.linalg.slogdet(s1)[1], atol=1e-4)
    assert np.isclose(float(m.trace_cov), np.trace(s1), rtol=1e-5)
    # identical Gaussians: distance 0
    assert (
        float(met.bures_w2_sq(jnp.asarray(m0), jnp.asarray(s0), jnp.asarray(m0), jnp.asarray(s0)))
        < 1e-4
    )


def test_ot_estimate_close_to_bures_for_gaussians():
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (400, 2))
    y = jax.random.normal(k2, (400, 2)) * 2.0 + 1.0
    est = met.ot_w2_sq(x, y, epsilon=0.05)
    exact = 2 * 1.0 + 2 * (2.0 - 1.0) ** 2  # ‖Δμ‖² + Σ (σ1 − σ0)²
    assert abs(est - exact) < 0.25 * exact
