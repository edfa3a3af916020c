"""Distances between a fitted Gaussian and the original distribution D0.

* :func:`bures_w2_sq` — W₂² between two Gaussians (Bures formula; for any two laws with these
  moments it is the Gelbrich lower bound on W₂²).
* :func:`w2_sq_1d` — exact W₂² between N(μ, σ²) and any 1-D law D0, from the quantile formula
  W₂² = ∫_0^1 (μ + σΦ⁻¹(u) − Q_0(u))² du = (μ − m_0)² + σ² + v_0 − 2σκ_0 with the constant
  κ_0 = ∫_0^1 Φ⁻¹(u) Q_0(u) du (:func:`kappa_empirical`, :func:`kappa_symmetric`, or
  :func:`kappa_quadrature` for any quantile function).
* :func:`gaussian_metrics` — per-chain metrics of a fitted model in the log-space Cholesky
  representation of :mod:`collapse_jax.families.gaussian.kernel`.
* :func:`ot_w2_sq` — a sample-based W₂² estimate with ``ott-jax`` for non-Gaussian D0 in d > 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from collapse_jax.numerics.linalg import nuclear_norm


class MetricSpec(NamedTuple):
    """Constants of D0 that the metrics need (host-side, float64)."""

    mean: np.ndarray  # m_0, shape (d,)
    trace: float  # tr Σ_0
    sqrt_cov: np.ndarray  # Σ_0^{1/2}, shape (d, d)
    kappa: float  # 1-D quantile constant κ_0 (unused for d > 1)
    one_d: bool


def metric_spec(mean, cov, kappa: float = 0.0) -> MetricSpec:
    """Precompute Σ_0^{1/2} (symmetric square root) and tr Σ_0."""
    cov = np.atleast_2d(np.asarray(cov, np.float64))
    w, v = np.linalg.eigh(cov)
    root = (v * np.sqrt(np.maximum(w, 0.0))[None, :]) @ v.T
    return MetricSpec(
        np.asarray(mean, np.float64), float(np.trace(cov)), root, float(kappa), cov.shape[0] == 1
    )


class GaussianMetrics(NamedTuple):
    """Per-chain metrics of the fitted Gaussian of one generation."""

    w2_sq: Float[Array, ""]  # W₂²(N(μ_n, Σ_n), D0): exact (Gaussian D0 or 1-D) or Gelbrich bound
    mean_sq_error: Float[Array, ""]  # ‖μ_n − μ_0‖²
    trace_cov: Float[Array, ""]  # tr Σ_n
    log_trace_cov: Float[Array, ""]  # log tr Σ_n (finite long after tr Σ_n underflows)
    log_det_cov: Float[Array, ""]  # log det Σ_n
    std: Float[Array, ""]  # √(tr Σ_n) (σ_n in 1-D)
    collapsed: Bool[Array, ""]  # numerically collapsed chain


def sqrtm_psd(s: Float[Array, "d d"]) -> Float[Array, "d d"]:
    """Symmetric square root of a positive semi-definite matrix (eigendecomposition)."""
    w, v = jnp.linalg.eigh(s)
    return (v * jnp.sqrt(jnp.maximum(w, 0.0))[None, :]) @ v.T


def bures_w2_sq(m1, s1, m0, s0) -> Float[Array, ""]:
    """W₂²(N(m1, S1), N(m0, S0)) = ‖m1 − m0‖² + tr S1 + tr S0 − 2 tr (S0^{1/2} S1 S0^{1/2})^{1/2}.

    For arbitrary laws with these means and covariances this is Gelbrich's lower bound on W₂².
    """
    r0 = sqrtm_psd(s0)
    cross = sqrtm_psd(r0 @ s1 @ r0)
    diff = m1 - m0
    return jnp.maximum(
        jnp.sum(diff * diff) + jnp.trace(s1) + jnp.trace(s0) - 2 * jnp.trace(cross), 0.0
    )


def w2_sq_1d(mu, sigma, m0: float, v0: float, kappa: float):
    """Exact W₂²(N(μ, σ²), D0) in 1-D: (μ − m_0)² + σ² + v_0 − 2σκ_0 (quantile formula)."""
    return (mu - m0) ** 2 + sigma**2 + v0 - 2 * sigma * kappa


def kappa_empirical(x) -> float:
    """κ_0 of the empirical law of ``x``: Σ_k x_(k) (φ(Φ⁻¹((k−1)/n)) − φ(Φ⁻¹(k/n))) (exact)."""
    from scipy import stats

    x = np.sort(np.asarray(x, np.float64).ravel())
    u = np.arange(x.shape[0] + 1) / x.shape[0]
    phi = stats.norm.pdf(stats.norm.ppf(u))  # φ(Φ⁻¹(u)), zero at u = 0 and u = 1
    return float(np.sum(x * (phi[:-1] - phi[1:])))


def kappa_symmetric(pdf: Callable, sf: Callable) -> float:
    """κ_0 of a law symmetric about 0 with density ``pdf`` and survival function ``sf``.

    κ_0 = E[X Φ⁻¹(F(X))] = 2 ∫_0^∞ x (−Φ⁻¹(SF(x))) f(x) dx (quadrature; the survival function
    keeps Φ⁻¹ accurate in the upper tail).
    """
    from scipy import integrate, stats

    def integrand(x):
        p, q = pdf(x), sf(x)
        return 0.0 if p == 0 or q <= 0 else x * stats.norm.isf(q) * p  # 0·∞ in the far tail

    val, _ = integrate.quad(integrand, 0, np.inf, limit=200, epsabs=1e-13)
    return float(2 * val)


def kappa_quadrature(quantile: Callable, points: int = 200_001) -> float:
    """κ_0 = ∫_0^1 Φ⁻¹(u) Q_0(u) du by the midpoint rule in u (any quantile function)."""
    from scipy import stats

    u = (np.arange(points) + 0.5) / points
    return float(np.mean(stats.norm.ppf(u) * quantile(u)))


def w2_sq_1d_quadrature(
    mu: float, sigma: float, quantile: Callable, points: int = 200_001
) -> float:
    """W₂² = ∫_0^1 (μ + σΦ⁻¹(u) − Q_0(u))² du by the midpoint rule (a direct check)."""
    from scipy import stats

    u = (np.arange(points) + 0.5) / points
    return float(np.mean((mu + sigma * stats.norm.ppf(u) - quantile(u)) ** 2))


def gaussian_metrics(mean, chol, log_scale, spec: MetricSpec, collapsed) -> GaussianMetrics:
    """Metrics of N(μ, Σ), Σ = N diag(e^{2ℓ}) Nᵀ (N unit-norm columns), against D0.

    tr Σ = Σ_j e^{2ℓ_j} and log det Σ = 2 Σ_j (ℓ_j + log N_jj) are evaluated in log space.
    W₂²: in 1-D exact for any D0 (:func:`w2_sq_1d`); in d > 1 the Bures formula, exact for a
    Gaussian D0 and the Gelbrich lower bound otherwise, with the cross term computed as the
    nuclear norm of Σ_0^{1/2} L (no square root of a near-singular Σ).
    """
    dtype = mean.dtype
    diff = mean - jnp.asarray(spec.mean, dtype)
    mse = jnp.sum(diff * diff)
    log_tr = jax.scipy.special.logsumexp(2 * log_scale)
    tr = jnp.exp(log_tr)
    std = jnp.exp(0.5 * log_tr)
    log_det = 2 * jnp.sum(log_scale + jnp.log(jnp.abs(jnp.diagonal(chol))))
    if spec.one_d:
        w2 = mse + tr + spec.trace - 2 * std * spec.kappa
    else:
        lchol = chol * jnp.exp(log_scale)[None, :]
        r = jnp.asarray(spec.sqrt_cov, dtype) @ lchol
        nuc = nuclear_norm(r)
        w2 = mse + tr + spec.trace - 2 * nuc
    w2 = jnp.maximum(w2, 0.0)
    return GaussianMetrics(w2, mse, tr, log_tr, log_det, std, jnp.asarray(collapsed, bool))


def zero_metrics(dtype) -> GaussianMetrics:
    z = jnp.zeros((), dtype)
    return GaussianMetrics(z, z, z, z, z, z, jnp.zeros((), bool))


def ot_w2_sq(x: Float[Array, "n d"], y: Float[Array, "m d"], epsilon: float | None = None) -> float:
    """Sample-based W₂² between the empirical laws of ``x`` and ``y`` with ``ott-jax``.

    Entropic (Sinkhorn) optimal transport with the squared Euclidean cost; the transport cost
    ⟨P, C⟩ of the regularised plan is returned (it converges to W₂² as ε → 0 and n, m → ∞; it
    carries the usual O(n^{−1/d}) sampling bias, so treat it as an estimate).
    """
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    with jax.numpy_rank_promotion("allow"):  # ott-jax relies on implicit rank promotion
        geom = pointcloud.PointCloud(jnp.asarray(x), jnp.asarray(y), epsilon=epsilon)
        out = sinkhorn.Sinkhorn(max_iterations=2000)(linear_problem.LinearProblem(geom))
        return float(out.primal_cost)
