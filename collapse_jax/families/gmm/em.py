"""A vectorised EM for Gaussian mixtures (full / diagonal / spherical covariances, k-means or
k-means++ initialisation or a warm start) and exact sampling, for ONE weighted data set with
static shapes (weight 0 = padding).

The EM follows scikit-learn's ``GaussianMixture`` step by step (so the two can be compared on the
same initialisation): E-step in log space with Cholesky-based log densities, M-step with
``n_k + 10 ε`` counts and ``reg_covar`` added to the covariance diagonal, stopping when the
change of the mean log-likelihood (evaluated in the E-step, before the M-step) is below ``tol``
or after ``max_iter`` iterations. It is written here rather than taken from a library because no
maintained JAX library offers a batched, jittable EM with these options.

Degenerate cases never produce NaN: a component whose responsibilities sum to (almost) nothing
keeps its previous mean and covariance and a weight of ~10 ε / N (a dead component; it stays dead
under warm starts and is re-seeded by k-means initialisation at the next generation); a
covariance whose Cholesky factorisation fails in floating point (e.g. duplicate points with a
tiny ``reg_covar``) is retried with a larger diagonal jitter, and as a last resort keeps the
previous factor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jaxtyping import Array, Bool, Float, Int

from collapse_jax.core.errors import ConfigError, check_choice, check_float, check_int
from collapse_jax.families.gmm.metrics import (
    GMM,
    component_log_densities_t,
    precision_cholesky,
)
from collapse_jax.numerics import linalg
from collapse_jax.numerics.random import jax_categorical, jax_normal

COVARIANCE_TYPES = ("full", "diag", "spherical")
INITS = ("kmeans", "kmeans++", "warm")
#: scikit-learn adds 10 float64 machine epsilons to every component count.
_COUNT_EPS = 10.0 * float(np.finfo(np.float64).eps)
#: A component with less responsibility mass than this (in points) is "dead" and keeps its
#: previous mean and covariance.
_DEAD_MASS = 1e-6


# --------------------------------------------------------------------------------------------
# EM for one data set


class EMInfo(NamedTuple):
    """Diagnostics of one EM fit."""

    loglik: Float[Array, ""]  # mean log-likelihood of the (weighted) data under the fitted GMM
    lower_bound: Float[Array, ""]  # last E-step value tested for convergence (scikit-learn's)
    n_iter: Int[Array, ""]  # EM iterations performed
    converged: Bool[Array, ""]  # |Δ lower bound| < tol reached before max_iter


@dataclasses.dataclass(frozen=True)
class EMConfig:
    """Static options of the EM (they fix the compiled program)."""

    covariance_type: str = "full"  # full | diag | spherical
    tol: float = 1e-3  # stop when the mean log-likelihood changes by less than this
    max_iter: int = 100  # maximum EM iterations per fit
    reg_covar: float = 1e-6  # added to every covariance diagonal (scikit-learn's reg_covar)
    kmeans_iter: int = 300  # maximum Lloyd iterations of the k-means initialisation
    kmeans_tol: float = 1e-4  # Lloyd stops when centres move less than this × mean variance

    def __post_init__(self):
        check_choice("covariance type", self.covariance_type, COVARIANCE_TYPES)
        check_float("tol", self.tol, 0.0)
        check_int("max_iter", self.max_iter, 1)
        check_float("reg_covar", self.reg_covar, 0.0, open_min=True)
        check_int("kmeans_iter", self.kmeans_iter, 1)
        check_float("kmeans_tol", self.kmeans_tol, 0.0)


def safe_cholesky(
    covs: Float[Array, "K d d"], fallback: Float[Array, "K d d"] | None = None
) -> Float[Array, "K d d"]:
    """Cholesky factors of ``covs``; a factor that fails (NaN) is retried with a diagonal jitter
    of 1e-6 × (mean variance + 1), then replaced by ``fallback`` (or a scaled identity)."""
    d = covs.shape[-1]
    eye = jnp.eye(d, dtype=covs.dtype)
    chol = linalg.cholesky(covs)
    bad = jnp.any(~jnp.isfinite(chol), axis=(-2, -1))
    scale = jnp.abs(jnp.trace(covs, axis1=-2, axis2=-1)) / d + 1.0
    jitter = (1e-6 * scale)[:, None, None] * eye[None]
    chol2 = linalg.cholesky(covs + jitter)
    chol = jnp.where(bad[:, None, None], chol2, chol)
    bad = jnp.any(~jnp.isfinite(chol), axis=(-2, -1))
    if fallback is None:
        fallback = jnp.sqrt(scale)[:, None, None] * eye[None]
    return jnp.where(bad[:, None, None], fallback, chol)


def e_step(
    xt: Float[Array, "d N"], w: Float[Array, " N"], gmm: GMM, chol: Float[Array, "K d d"]
) -> tuple[Float[Array, ""], Float[Array, "K N"]]:
    """Mean log-likelihood Σ_n w_n log p(x_n) / Σ_n w_n and responsibilities
    r_kn = exp(log π_k + log N(x_n; μ_k, Σ_k) - logsumexp_j(...)). Points are columns of ``xt``."""
    logp = component_log_densities_t(xt, gmm.means, precision_cholesky(chol))
    logp = logp + jnp.log(gmm.weights)[:, None]
    lse = logsumexp(logp, axis=0)
    resp = jnp.exp(logp - lse[None, :])
    mean_ll = jnp.sum(jnp.where(w > 0, w * lse, 0.0)) / jnp.sum(w)
    return mean_ll, resp


def m_step(
    xt: Float[Array, "d N"],
    w: Float[Array, " N"],
    resp: Float[Array, "K N"],
    prev: GMM,
    covariance_type: str,
    reg_covar: float,
) -> GMM:
    """Weighted maximum-likelihood update (scikit-learn's ``_estimate_gaussian_parameters``):
    n_k = Σ_n w_n r_kn + 10ε, μ_k = Σ_n w_n r_kn x_n / n_k, Σ_k = Σ_n w_n r_kn (x_n-μ_k)(x_n-μ_k)ᵀ / n_k
    + reg_covar·I (diagonal / spherical: the diagonal, or its mean), π_k = n_k / Σ_j n_j.

    Covariances are computed from centred points (not E[x²] - μ²) to avoid cancellation in
    float32. A dead component (mass < 1e-6 points) keeps ``prev``'s mean and covariance. Points
    are columns of ``xt``; the sums over points are contractions over the long axis, which XLA
    runs as efficient dot products.
    """
    d = xt.shape[0]
    r = resp * w[None, :]  # K N
    mass = jnp.sum(r, 1)
    nk = mass + _COUNT_EPS
    means = (r @ xt.T) / nk[:, None]
    diff = xt[None, :, :] - means[:, :, None]  # K d N
    rd = r[:, None, :] * diff
    eye = jnp.eye(d, dtype=xt.dtype)
    if covariance_type == "full":
        covs = jnp.einsum("kin,kjn->kij", rd, diff) / nk[:, None, None]
        covs = covs + reg_covar * eye[None]
    else:
        var = jnp.sum(rd * diff, -1) / nk[:, None] + reg_covar  # K d
        if covariance_type == "spherical":
            var = jnp.broadcast_to(jnp.mean(var, -1, keepdims=True), var.shape)
        covs = var[:, :, None] * eye[None]
    dead = mass < _DEAD_MASS
    means = jnp.where(dead[:, None], prev.means, means)
    covs = jnp.where(dead[:, None, None], prev.covs, covs)
    weights = nk / jnp.sum(nk)
    return GMM(weights, means, covs)


def fit_em(
    x: Float[Array, "N d"], w: Float[Array, " N"], init: GMM, config: EMConfig
) -> tuple[GMM, EMInfo]:
    """EM from ``init`` until |L_t - L_{t-1}| < tol or ``max_iter`` iterations, where L_t is the
    mean log-likelihood at the parameters of iteration t (scikit-learn's ``lower_bound_``);
    ``lax.while_loop`` under vmap runs until every chain has stopped (stopped chains are frozen).
    """
    chol0 = safe_cholesky(init.covs)
    xt = x.T
    ninf = jnp.asarray(-jnp.inf, x.dtype)

    def cond(carry):
        _, _, _, it, done = carry
        return (it < config.max_iter) & ~done

    def body(carry):
        gmm, chol, prev_lb, it, _ = carry
        lb, resp = e_step(xt, w, gmm, chol)
        new = m_step(xt, w, resp, gmm, config.covariance_type, config.reg_covar)
        new_chol = safe_cholesky(new.covs, chol)
        done = jnp.abs(lb - prev_lb) < config.tol
        return new, new_chol, lb, it + 1, done

    carry = (init, chol0, ninf, jnp.asarray(0, jnp.int32), jnp.asarray(False))
    gmm, chol, lb, it, done = jax.lax.while_loop(cond, body, carry)
    loglik, _ = e_step(xt, w, gmm, chol)
    return gmm, EMInfo(loglik, lb, it, done)


# --------------------------------------------------------------------------------------------
# Initialisation


def weighted_covariance(x: Float[Array, "N d"], w: Float[Array, " N"]) -> Float[Array, "d d"]:
    """Weighted covariance of the points (used for components without any point)."""
    mu = (w @ x) / jnp.sum(w)
    diff = x - mu[None, :]
    return (diff * w[:, None]).T @ diff / jnp.sum(w)


def kmeans_plusplus(
    key: jax.Array, x: Float[Array, "N d"], w: Float[Array, " N"], n_components: int
) -> Float[Array, "K d"]:
    """Greedy k-means++ seeding on weighted points (Arthur & Vassilvitskii 2007; the greedy
    variant of scikit-learn's ``kmeans_plusplus``, 2 + ⌊log K⌋ candidates per centre): each
    new centre is drawn with probability ∝ w_n D(x_n)², keeping the candidate that most lowers
    the potential Σ_n w_n D(x_n)². Padded points (w = 0) are never chosen."""
    n_trials = 2 + int(math.log(n_components))
    keys = jax.random.split(key, n_components)
    logw = jnp.log(w)
    xt = x.T
    first = jax.random.categorical(keys[0], logw)
    centers = jnp.zeros((n_components, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum((xt - x[first][:, None]) ** 2, 0)
    for k in range(1, n_components):
        p = w * d2
        logits = jnp.where(jnp.sum(p) > 0, jnp.log(p), logw)  # all points equal: any valid one
        cand = jax_categorical(keys[k], logits, (n_trials,))
        cd2 = jnp.sum((xt[None, :, :] - x[cand][:, :, None]) ** 2, 1)  # trials N
        cd2 = jnp.minimum(cd2, d2[None, :])
        best = jnp.argmin(jnp.sum(cd2 * w[None, :], -1))
        centers = centers.at[k].set(x[cand[best]])
        d2 = cd2[best]
    return centers


def _nearest(xt, centers):
    """Index of the nearest centre of every point (points are columns of ``xt``)."""
    d2 = jnp.sum((xt[None, :, :] - centers[:, :, None]) ** 2, 1)  # K N
    return jnp.argmin(d2, 0)


def _onehot(labels, k, dtype):
    return (labels[None, :] == jnp.arange(k)[:, None]).astype(dtype)  # K N


def lloyd(
    x: Float[Array, "N d"], w: Float[Array, " N"], centers: Float[Array, "K d"], config: EMConfig
) -> Float[Array, "K d"]:
    """Weighted Lloyd iterations from ``centers`` until the squared centre shift is below
    ``kmeans_tol`` × mean per-dimension variance (scikit-learn's rule) or ``kmeans_iter``
    iterations; an empty cluster keeps its centre."""
    k = centers.shape[0]
    xt = x.T
    var = jnp.mean(jnp.diagonal(weighted_covariance(x, w)))
    tol = config.kmeans_tol * var

    def cond(c):
        _, it, shift = c
        return (it < config.kmeans_iter) & (shift > tol)

    def body(c):
        cen, it, _ = c
        onehot = _onehot(_nearest(xt, cen), k, x.dtype) * w[None, :]
        mass = jnp.sum(onehot, 1)
        total = onehot @ x
        new = jnp.where(mass[:, None] > 0, total / jnp.maximum(mass, 1e-30)[:, None], cen)
        return new, it + 1, jnp.sum((new - cen) ** 2)

    init = (centers, jnp.asarray(0, jnp.int32), jnp.asarray(jnp.inf, x.dtype))
    out, _, _ = jax.lax.while_loop(cond, body, init)
    return out


def init_from_centers(
    x: Float[Array, "N d"], w: Float[Array, " N"], centers: Float[Array, "K d"], config: EMConfig
) -> GMM:
    """Initial GMM from hard assignments to the nearest centre followed by one M-step (as
    scikit-learn's ``init_params='kmeans'``); a centre without points keeps the centre and the
    data covariance."""
    k, d = centers.shape
    resp = _onehot(_nearest(x.T, centers), k, x.dtype)
    cov = weighted_covariance(x, w) + config.reg_covar * jnp.eye(d, dtype=x.dtype)
    prev = GMM(jnp.full((k,), 1.0 / k, x.dtype), centers, jnp.broadcast_to(cov, (k, d, d)))
    if config.covariance_type != "full":
        diag = jnp.diagonal(cov)
        if config.covariance_type == "spherical":
            diag = jnp.full_like(diag, jnp.mean(diag))
        prev = prev._replace(
            covs=jnp.broadcast_to(diag[:, None] * jnp.eye(d, dtype=x.dtype), (k, d, d))
        )
    return m_step(x.T, w, resp, prev, config.covariance_type, config.reg_covar)


def initialize(
    key: jax.Array,
    x: Float[Array, "N d"],
    w: Float[Array, " N"],
    n_components: int,
    config: EMConfig,
    method: str = "kmeans",
) -> GMM:
    """Initial GMM by ``kmeans`` (k-means++ seeding + Lloyd, scikit-learn's default) or
    ``kmeans++`` (seeding only), each followed by one M-step on the hard assignments."""
    centers = kmeans_plusplus(key, x, w, n_components)
    if method == "kmeans":
        centers = lloyd(x, w, centers, config)
    elif method != "kmeans++":
        raise ConfigError(f"unknown initialisation {method!r}; choose kmeans or kmeans++")
    return init_from_centers(x, w, centers, config)


def fit(
    key: jax.Array,
    x: Float[Array, "N d"],
    w: Float[Array, " N"],
    n_components: int,
    config: EMConfig,
    method: str = "kmeans",
    warm: GMM | None = None,
) -> tuple[GMM, EMInfo]:
    """Fit a GMM to weighted points: initialise (``warm`` overrides ``method``) and run EM."""
    init = warm if warm is not None else initialize(key, x, w, n_components, config, method)
    return fit_em(x, w, init, config)


# --------------------------------------------------------------------------------------------
# Sampling


def sample(key: jax.Array, gmm: GMM, n: int) -> Float[Array, "n d"]:
    """``n`` i.i.d. points of the mixture: k ~ Categorical(π), x = μ_k + L_k z, z ~ N(0, I)."""
    k_comp, k_norm = jax.random.split(key)
    d = gmm.means.shape[-1]
    comp = jax_categorical(k_comp, jnp.log(gmm.weights), (n,))
    z = jax_normal(k_norm, (n, d), gmm.means.dtype)
    chol = safe_cholesky(gmm.covs)
    return gmm.means[comp] + jnp.sum(chol[comp] * z[:, None, :], -1)
