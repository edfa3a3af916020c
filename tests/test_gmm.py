"""EM for Gaussian mixtures against scikit-learn, closed-form GMM metrics, sampling, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from collapse_jax.core.errors import ConfigError
from collapse_jax.families.gmm import kernel as proc
from collapse_jax.families.gmm import metrics as metrics
from collapse_jax.families.gmm.metrics import GMM

# Per-point log-likelihood agreement with scikit-learn demanded by the issue is 1e-3; float32
# EM lands within ~1e-5 of float64 scikit-learn on these cases, so we check the stricter 1e-4.
LOGLIK_TOL = 1e-4
NPAD = 640
_fit_em = jax.jit(proc.fit_em, static_argnums=3)
_log_prob = jax.jit(metrics.log_prob)


def _precisions(covs, covariance_type):
    if covariance_type == "full":
        return np.linalg.inv(covs)
    diag = np.diagonal(covs, axis1=1, axis2=2)
    return 1.0 / diag if covariance_type == "diag" else 1.0 / diag[:, 0]


def _compare(x, weights, means, covs, covariance_type, tol=1e-5, reg=1e-6):
    """Fit both from the same initial parameters; return (ours, sklearn) mean log-likelihoods."""
    sk = GaussianMixture(
        len(weights),
        covariance_type=covariance_type,
        tol=tol,
        reg_covar=reg,
        max_iter=100,
        weights_init=weights,
        means_init=means,
        precisions_init=_precisions(covs, covariance_type),
    ).fit(x)
    cfg = proc.EMConfig(covariance_type, tol, 100, reg)
    init = GMM(*(jnp.asarray(a, jnp.float32) for a in (weights, means, covs)))
    # Pad to a fixed buffer (weight-0 rows) so every case of a given K and d shares one compile.
    n, d = x.shape
    # Padding rows hold far-away points: with weight 0 they must not affect the fit.
    xj = jnp.full((NPAD, d), 50.0, jnp.float32).at[:n].set(jnp.asarray(x, jnp.float32))
    wj = (jnp.arange(NPAD) < n).astype(jnp.float32)
    gmm, info = _fit_em(xj, wj, init, cfg)
    xj = xj[:n]
    assert np.all(np.isfinite(np.asarray(gmm.covs))) and np.all(np.isfinite(np.asarray(gmm.means)))
    ours = float(info.loglik)
    # Our reported log-likelihood is the mean log-density at the returned parameters.
    np.testing.assert_allclose(ours, float(np.mean(_log_prob(gmm, xj))), atol=1e-5)
    return ours, sk.score(x), gmm, sk


def _blobs(seed=0, n=400):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n // 2, 2)) @ np.array([[1.0, 0.3], [0.0, 0.5]]) + [-2.0, 0.0]
    b = rng.normal(size=(n - n // 2, 2)) * 0.7 + [2.0, 1.0]
    return np.concatenate([a, b])


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_em_matches_sklearn_from_same_init(covariance_type):
    x = _blobs()
    w0 = np.array([0.5, 0.5])
    mu0 = np.array([[-1.0, 0.0], [1.0, 0.0]])
    cov0 = np.stack([np.eye(2), np.eye(2)])
    ours, sk, gmm, skm = _compare(x, w0, mu0, cov0, covariance_type)
    assert abs(ours - sk) < LOGLIK_TOL
    order = np.argsort(np.asarray(gmm.means)[:, 0])
    np.testing.assert_allclose(
        np.asarray(gmm.means)[order], skm.means_[np.argsort(skm.means_[:, 0])], atol=1e-3
    )


def test_em_three_components_diag():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(150, 3)) + c for c in ([0, 0, 0], [4, 0, 0], [0, 4, 1])])
    mu0 = x[[0, 150, 300]]
    cov0 = np.stack([np.eye(3)] * 3)
    ours, sk, _, _ = _compare(x, np.full(3, 1 / 3), mu0, cov0, "diag")
    assert abs(ours - sk) < LOGLIK_TOL


def test_em_duplicate_points():
    """300 copies of one point: one component collapses onto them (covariance = reg_covar)."""
    rng = np.random.default_rng(2)
    x = np.concatenate([np.repeat([[0.5, -0.5]], 300, 0), rng.normal(size=(300, 2))])
    mu0 = np.array([[0.4, -0.4], [1.0, 1.0]])
    cov0 = np.stack([0.5 * np.eye(2)] * 2)
    for ct in ("full", "diag", "spherical"):
        ours, sk, _, _ = _compare(x, np.array([0.5, 0.5]), mu0, cov0, ct)
        assert abs(ours - sk) < LOGLIK_TOL, ct


def test_em_all_points_identical():
    x = np.repeat([[1.0, 2.0]], 50, 0)
    ours, sk, _, _ = _compare(
        x,
        np.array([0.5, 0.5]),
        np.array([[1.0, 2.0], [0.0, 0.0]]),
        np.stack([np.eye(2)] * 2),
        "full",
    )
    assert np.isfinite(ours)
    assert abs(ours - sk) < LOGLIK_TOL


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_em_component_loses_all_points(covariance_type):
    """A component initialised far from every point gets no responsibility: it is kept with a
    ~0 weight (not NaN) and the fit matches scikit-learn's."""
    x = np.random.default_rng(3).normal(size=(500, 2))
    mu0 = np.array([[0.0, 0.0], [1e3, 1e3]])
    ours, sk, gmm, _ = _compare(
        x, np.array([0.5, 0.5]), mu0, np.stack([np.eye(2)] * 2), covariance_type
    )
    assert abs(ours - sk) < LOGLIK_TOL
    w = np.asarray(gmm.weights)
    assert w[1] < 1e-12 and np.all(np.isfinite(np.asarray(gmm.means)))
    # The dead component keeps its previous parameters.
    np.testing.assert_allclose(np.asarray(gmm.means)[1], mu0[1])


_initialize = jax.jit(proc.initialize, static_argnums=(3, 4, 5))


def test_kmeans_init_finds_separated_clusters():
    rng = np.random.default_rng(5)
    centres = np.array([[-5.0, 0.0], [5.0, 0.0], [0.0, 6.0]])
    x = np.concatenate([rng.normal(size=(100, 2)) * 0.3 + c for c in centres])
    cfg = proc.EMConfig()
    for method in ("kmeans", "kmeans++"):
        g = _initialize(
            jax.random.key(0), jnp.asarray(x, jnp.float32), jnp.ones(300), 3, cfg, method
        )
        found = np.asarray(g.means)
        d = np.linalg.norm(found[:, None] - centres[None], axis=-1).min(0)
        assert np.all(d < 0.2), (method, found)
        np.testing.assert_allclose(np.asarray(g.weights), np.full(3, 1 / 3), atol=0.01)


def test_kmeans_plusplus_never_picks_padding():
    x = jnp.concatenate([jnp.zeros((5, 2)) + 1.0, jnp.full((50, 2), 99.0)])
    w = jnp.concatenate([jnp.ones(5), jnp.zeros(50)])
    keys = jax.random.split(jax.random.key(0), 16)
    c = jax.jit(jax.vmap(lambda k: proc.kmeans_plusplus(k, x, w, 2)))(keys)
    assert np.all(np.asarray(c) == 1.0)


def test_safe_cholesky_singular_is_finite():
    covs = jnp.array([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 3.0]]])
    chol = jax.jit(proc.safe_cholesky)(covs)
    assert np.all(np.isfinite(np.asarray(chol)))
    np.testing.assert_allclose(
        np.asarray(chol[2]), np.linalg.cholesky(np.asarray(covs[2])), rtol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Metrics


def _mixture_density(g, pts):
    from scipy.stats import multivariate_normal

    return sum(
        w * multivariate_normal(m, c).pdf(pts)
        for w, m, c in zip(g.weights, g.means, g.covs, strict=True)
    )


def test_l2_closed_form_matches_grid_integration():
    p = GMM(
        np.array([0.3, 0.7]),
        np.array([[0.0, 0.0], [1.5, -0.5]]),
        np.array([[[1.0, 0.3], [0.3, 0.5]], [[0.4, 0.0], [0.0, 0.8]]]),
    )
    q = GMM(
        np.array([0.5, 0.2, 0.3]),
        np.array([[0.5, 0.5], [-1.0, 0.0], [2.0, 1.0]]),
        np.array([np.eye(2) * 0.3, [[0.6, -0.2], [-0.2, 0.4]], np.eye(2) * 0.9]),
    )
    h = 0.04
    g = np.arange(-7, 7, h)
    xx, yy = np.meshgrid(g, g)
    pts = np.stack([xx.ravel(), yy.ravel()], -1)
    grid = float(((_mixture_density(p, pts) - _mixture_density(q, pts)) ** 2).sum() * h * h)
    closed = float(
        metrics.l2_distance_squared(GMM(*map(jnp.asarray, p)), GMM(*map(jnp.asarray, q)))
    )
    np.testing.assert_allclose(closed, grid, rtol=1e-4)
    assert (
        float(metrics.l2_distance_squared(GMM(*map(jnp.asarray, p)), GMM(*map(jnp.asarray, p))))
        < 1e-6
    )


def test_component_std_entropy_and_loglik():
    g = GMM(
        jnp.array([0.25, 0.75]),
        jnp.zeros((2, 2)),
        jnp.array([jnp.eye(2) * 4.0, jnp.diag(jnp.array([1.0, 0.0]))]),
    )
    expected = 0.25 * 2.0 + 0.75 * np.sqrt(0.5)
    np.testing.assert_allclose(float(metrics.component_std(g)), expected, rtol=1e-6)
    h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    np.testing.assert_allclose(float(metrics.weight_entropy(g)), h, rtol=1e-6)
    dead = GMM(jnp.array([1.0, 0.0]), jnp.zeros((2, 2)), jnp.stack([jnp.eye(2)] * 2))
    assert float(metrics.weight_entropy(dead)) == 0.0
    p = GMM(
        np.array([0.3, 0.7]),
        np.array([[0.0, 0.0], [1.5, -0.5]]),
        np.stack([np.eye(2), 0.5 * np.eye(2)]),
    )
    pts = np.random.default_rng(0).normal(size=(20, 2))
    np.testing.assert_allclose(
        np.asarray(metrics.log_prob(GMM(*map(jnp.asarray, p)), jnp.asarray(pts))),
        np.log(_mixture_density(p, pts)),
        rtol=1e-5,
    )


def test_w2_exact_and_sinkhorn_bound():
    """Exact assignment on a case with a known answer; Sinkhorn's transport cost lies in
    [W₂², W₂² + ε log n] (entropic bias bound) up to its marginal tolerance."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2))
    shift = np.array([3.0, -1.0])
    assert abs(metrics.w2_exact(x, x + shift) - float(shift @ shift)) < 1e-9
    y = rng.normal(size=(64, 2)) * 0.3 + 0.5
    exact = metrics.w2_exact(x, y)
    eps = 1e-2
    est = float(metrics.w2_sinkhorn(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), eps))
    assert exact - 1e-3 <= est <= exact + eps * np.log(64) + 1e-3
    # The host side over records: due records get each pair's exact W₂², the rest NaN (and
    # every chain past the pairs).
    pairs = [metrics.w2_pairs(np.stack([x, x]), np.stack([y, x + shift]), due) for due in (1, 0)]
    records = {k: np.stack([p[k] for p in pairs]) for k in pairs[0]}
    records["other"] = np.arange(2)
    out = metrics.w2_exact_records(records, n_chains=3)
    assert set(out) == {"other", "w2"} and out["w2"].shape == (2, 3)
    np.testing.assert_allclose(out["w2"][0, :2], [exact, shift @ shift], rtol=1e-12)
    assert np.isnan(out["w2"][0, 2]) and np.isnan(out["w2"][1]).all()


def test_sampling_moments():
    g = GMM(
        jnp.array([0.2, 0.8]),
        jnp.array([[-1.0, 2.0], [3.0, 0.0]]),
        jnp.array([[[1.0, 0.5], [0.5, 2.0]], [[0.3, -0.1], [-0.1, 0.2]]]),
    )
    n = 20000
    x = np.asarray(jax.jit(proc.sample, static_argnums=2)(jax.random.key(0), g, n), np.float64)
    w, mu, cov = (np.asarray(a, np.float64) for a in g)
    mean = w @ mu
    second = sum(wk * (ck + np.outer(mk, mk)) for wk, mk, ck in zip(w, mu, cov, strict=True))
    covar = second - np.outer(mean, mean)
    se_mean = np.sqrt(np.diag(covar) / n)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * se_mean)
    c = x - mean
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / np.sqrt(n)
    assert np.all(np.abs(prods.mean(0) - covar) < 4 * se_cov)


# ---------------------------------------------------------------------------------------------
# Original data validation


def test_mixture_validation_errors():
    with pytest.raises(ConfigError, match="not positive definite"):
        proc.mixture_from_lists([0.5, 0.5], [[0, 0], [1, 1]], [[[1, 0], [0, 1]], [[1, 2], [2, 1]]])
    with pytest.raises(ConfigError, match="not positive definite"):
        proc.mixture_from_lists([1.0], [[0, 0]], [0.0])
    with pytest.raises(ConfigError, match="non-finite"):
        proc.mixture_from_lists([1.0], [[0, float("nan")]], [1.0])
    with pytest.raises(ConfigError, match="sum to 1"):
        proc.mixture_from_lists([0.5, 0.6], [[0, 0], [1, 1]], [1.0, 1.0])
    with pytest.raises(ConfigError, match="weights must have 2"):
        proc.mixture_from_lists([1.0], [[0, 0], [1, 1]], [1.0, 1.0])
    m = proc.mixture_from_lists([0.5, 0.5], [[0, 0], [1, 1]], [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(m.covs[1], np.diag([3.0, 4.0]))


def test_original_data_from_npy(tmp_path):
    pts = np.random.default_rng(0).normal(size=(50, 3))
    good = tmp_path / "good.npy"
    np.save(good, pts)
    d0 = proc.original_data(str(good)).split_heldout(10, 0)
    assert d0.points.shape == (40, 3) and d0.heldout.shape == (10, 3) and d0.dim == 3
    bad = tmp_path / "bad.npy"
    pts[3, 1] = np.nan
    np.save(bad, pts)
    with pytest.raises(ConfigError, match="non-finite value nan at index \\(3, 1\\)"):
        proc.original_data(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        proc.original_data(str(tmp_path / "missing.npy"))
    with pytest.raises(ConfigError, match="unknown d0"):
        proc.original_data("gaussian")
    with pytest.raises(ConfigError, match="leave some for training"):
        proc.original_data(str(good)).split_heldout(50, 0)
