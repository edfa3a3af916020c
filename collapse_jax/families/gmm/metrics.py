"""Gaussian-mixture densities and the distances and summaries used to measure their collapse.

A mixture is the NamedTuple :class:`GMM` (weights, means, full covariance matrices). Densities
are evaluated through Cholesky factors in log space; every mixture-level quantity uses
log-sum-exp. The squared L2 distance between two mixtures is closed-form (Gaussian overlap
integrals); the Wasserstein-2 distance between two point samples is estimated with entropic
optimal transport (``ott-jax`` Sinkhorn), with an exact assignment solver for small samples on
the host as a reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp, xlogy
from jaxtyping import Array, Float

from collapse_jax.numerics.linalg import cholesky, solve_lower


class GMM(NamedTuple):
    """A Gaussian mixture p(x) = Σ_k π_k N(x; μ_k, Σ_k) with full covariance matrices."""

    weights: Float[Array, " K"]  # mixture weights π_k (sum to 1; a dead component may be ~0)
    means: Float[Array, "K d"]  # component means μ_k
    covs: Float[Array, "K d d"]  # component covariances Σ_k (symmetric positive definite)


def _log_det_chol(chol: Float[Array, "... d d"]) -> Float[Array, "..."]:
    """log det Σ = 2 Σ_i log L_ii for Σ = L Lᵀ."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)


def precision_cholesky(chol: Float[Array, "K d d"]) -> Float[Array, "K d d"]:
    """``P_k = L_k^{-T}`` so that Σ_k^{-1} = P_k P_kᵀ (scikit-learn's ``precisions_cholesky_``)."""
    d = chol.shape[-1]
    eye = jnp.eye(d, dtype=chol.dtype)
    inv_l = solve_lower(chol, eye)
    return jnp.swapaxes(inv_l, -1, -2)


def component_log_densities_t(
    xt: Float[Array, "d N"], means: Float[Array, "K d"], prec_chol: Float[Array, "K d d"]
) -> Float[Array, "K N"]:
    """log N(x_n; μ_k, Σ_k) = -½(d log 2π + ‖P_kᵀ(x_n - μ_k)‖²) + log det P_k with Σ_k⁻¹ = P_k P_kᵀ,
    for points given as columns (``xt`` = xᵀ).

    The point axis is kept minor (last): on CPU, XLA's fused loops over a long minor axis are
    several times faster than the same arithmetic with the point axis first.
    """
    d = xt.shape[0]
    diff = xt[None, :, :] - means[:, :, None]  # K d N
    y = jnp.sum(diff[:, :, None, :] * prec_chol[:, :, :, None], 1)  # K d N
    log_det = jnp.sum(jnp.log(jnp.diagonal(prec_chol, axis1=-2, axis2=-1)), -1)  # K
    return -0.5 * (d * math.log(2 * math.pi) + jnp.sum(y * y, 1)) + log_det[:, None]


def log_prob(gmm: GMM, x: Float[Array, "N d"]) -> Float[Array, " N"]:
    """log p(x_n) = logsumexp_k(log π_k + log N(x_n; μ_k, Σ_k))."""
    chol = cholesky(gmm.covs)
    logp = component_log_densities_t(x.T, gmm.means, precision_cholesky(chol))
    return logsumexp(logp + jnp.log(gmm.weights)[:, None], axis=0)


def gaussian_overlap_log(
    mean_a: Float[Array, "K d"],
    cov_a: Float[Array, "K d d"],
    mean_b: Float[Array, "J d"],
    cov_b: Float[Array, "J d d"],
) -> Float[Array, "K J"]:
    """log ∫ N(x; a_k, A_k) N(x; b_j, B_j) dx = log N(a_k; b_j, A_k + B_j) for all pairs."""
    d = mean_a.shape[-1]
    s = cov_a[:, None, :, :] + cov_b[None, :, :, :]  # K J d d
    chol = cholesky(s)
    diff = mean_a[:, None, :] - mean_b[None, :, :]  # K J d
    z = solve_lower(chol, diff[..., None])[..., 0]
    return -0.5 * (d * math.log(2 * math.pi) + _log_det_chol(chol) + jnp.sum(z * z, -1))


def _cross_term(p: GMM, q: GMM) -> Float[Array, ""]:
    """∫ p q dx = Σ_kj π_k ρ_j N(μ_k; ν_j, Σ_k + S_j)."""
    log_o = gaussian_overlap_log(p.means, p.covs, q.means, q.covs)
    w = p.weights[:, None] * q.weights[None, :]
    return jnp.sum(w * jnp.exp(log_o))


def l2_distance_squared(p: GMM, q: GMM) -> Float[Array, ""]:
    """‖p - q‖²₂ = ∫p² - 2∫pq + ∫q², each a sum of Gaussian overlap integrals (closed form)."""
    return _cross_term(p, p) - 2.0 * _cross_term(p, q) + _cross_term(q, q)


def component_std(gmm: GMM) -> Float[Array, ""]:
    """Weight-averaged component standard deviation Σ_k π_k √(tr Σ_k / d)."""
    d = gmm.covs.shape[-1]
    tr = jnp.trace(gmm.covs, axis1=-2, axis2=-1)
    return jnp.sum(gmm.weights * jnp.sqrt(jnp.maximum(tr, 0.0) / d))


def component_stds(gmm: GMM) -> Float[Array, " K"]:
    """Each component's √(tr Σ_k / K), K the number of components: the per-component spread
    the paper's authors plot (their notebook divides the trace by K; in the paper's setting
    K = d = 2, so it is the component's root-mean-square standard deviation per coordinate)."""
    k = gmm.covs.shape[0]
    tr = jnp.trace(gmm.covs, axis1=-2, axis2=-1)
    return jnp.sqrt(jnp.maximum(tr, 0.0) / k)


def weight_entropy(gmm: GMM) -> Float[Array, ""]:
    """Entropy of the mixture weights -Σ_k π_k log π_k (nats; 0·log 0 = 0)."""
    return -jnp.sum(xlogy(gmm.weights, gmm.weights))


def mean_log_likelihood(gmm: GMM, x: Float[Array, "N d"]) -> Float[Array, ""]:
    """Average log-likelihood (1/N) Σ_n log p(x_n) of points ``x`` under ``gmm``."""
    return jnp.mean(log_prob(gmm, x))


def w2_sinkhorn(
    x: Float[Array, "N d"],
    y: Float[Array, "M d"],
    epsilon: float = 1e-3,
    threshold: float = 1e-3,
    max_iterations: int = 2000,
) -> Float[Array, ""]:
    """W₂² estimate between the empirical measures of ``x`` and ``y``: the transport cost
    ⟨P_ε, C⟩ of the entropic optimal plan (ott-jax Sinkhorn, squared Euclidean cost, absolute
    regularisation ``epsilon``).

    For uniform weights and a converged plan, W₂² ≤ ⟨P_ε, C⟩ ≤ W₂² + ε log min(N, M) (the optimal
    plan has entropy ≥ log max(N, M) and P_ε at most log N + log M), so a small ``epsilon`` gives
    an estimate close to the exact empirical W₂². Written for one pair; vmap over chains.
    """
    from ott.geometry import pointcloud
    from ott.solvers import linear

    with jax.numpy_rank_promotion("allow"):  # ott-jax relies on implicit rank promotion
        geom = pointcloud.PointCloud(x, y, epsilon=epsilon)
        out = linear.solve(geom, threshold=threshold, max_iterations=max_iterations)
        return out.primal_cost


def w2_exact(x: np.ndarray, y: np.ndarray) -> float:
    """Exact W₂² between two equal-size empirical measures by optimal assignment (host, SciPy).

    Cubic in the sample size; a reference for :func:`w2_sinkhorn` on small samples.
    """
    from scipy.optimize import linear_sum_assignment

    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"w2_exact needs equal-size samples, got {x.shape} and {y.shape}")
    cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def w2_pairs(model: Float[Array, "C S d"], original: Float[Array, "C S d"], due) -> dict:
    """What a record keeps for :func:`w2_exact_records`: the point pairs of the first C chains
    and whether this record is due an estimate (a boolean scalar)."""
    return {"w2_model": model, "w2_original": original, "w2_due": due}


def w2_exact_records(records: dict, n_chains: int) -> dict:
    """Host side of the exact W₂²: ``records`` (leading record axis) with the pairs of
    :func:`w2_pairs` replaced by ``w2`` (records × ``n_chains``): :func:`w2_exact` of each pair
    on due records, NaN elsewhere and past the C chains that have pairs.

    A ``Family.host_reduce``: run in the compiled step as a host callback, it kept the study's
    programs out of JAX's persistent compilation cache (compiled again at every start).
    """
    records = dict(records)
    model, original = records.pop("w2_model"), records.pop("w2_original")
    due = np.asarray(records.pop("w2_due"), bool)
    w2 = np.full((due.shape[0], n_chains), np.nan, model.dtype)
    for r in np.flatnonzero(due):
        w2[r, : model.shape[1]] = [
            w2_exact(a, b) for a, b in zip(model[r], original[r], strict=True)
        ]
    records["w2"] = w2
    return records
