"""Recursive Gaussian-mixture fitting: a vectorised EM (full / diagonal / spherical covariances,
k-means or k-means++ initialisation or a warm start) and one chain's generational kernels.

Everything is written for ONE chain and ONE data set with static shapes; points carry weights
(0 for padding), so variable sample sizes M_i live in a fixed buffer. The shared runner
:func:`collapse_jax.core.loop.run_generations` vmaps the kernels over independent recursions
and scans generations.

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
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jaxtyping import Array, Bool, Float, Int

from collapse_jax.core.errors import ConfigError, check_choice, check_float, check_int, load_array
from collapse_jax.core.loop import Family, GenInput
from collapse_jax.core.policies import (
    PointBuffer,
    Policy,
    initial_buffer,
    new_batch,
    next_buffer,
    subsample,
)
from collapse_jax.families.gmm.metrics import (
    GMM,
    component_log_densities_t,
    component_std,
    l2_distance_squared,
    log_prob,
    mean_log_likelihood,
    precision_cholesky,
    weight_entropy,
)
from collapse_jax.numerics import linalg

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
        cand = jax.random.categorical(keys[k], logits, shape=(n_trials,))
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
    comp = jax.random.categorical(k_comp, jnp.log(gmm.weights), shape=(n,))
    z = jax.random.normal(k_norm, (n, d), gmm.means.dtype)
    chol = safe_cholesky(gmm.covs)
    return gmm.means[comp] + jnp.sum(chol[comp] * z[:, None, :], -1)


# --------------------------------------------------------------------------------------------
# Original data D0


@dataclasses.dataclass(frozen=True)
class OriginalData:
    """The original data source: an explicit mixture (sampled exactly) or a fixed point set."""

    mixture: GMM | None  # D0 as a mixture (NumPy arrays), or None for a point set
    points: np.ndarray | None  # (N, d) points when D0 is a point set, else None
    label: str  # human-readable description
    heldout: np.ndarray | None = None  # point sets: (H, d) points set aside for evaluation

    def split_heldout(self, n_heldout: int, seed: int) -> OriginalData:
        """Point sets: set ``n_heldout`` random points aside (NumPy seed ``seed``) for the
        held-out log-likelihood and W2; the rest is the original training data. Mixtures are
        returned unchanged (their held-out points are fresh samples)."""
        if self.points is None:
            return self
        n = self.points.shape[0]
        if n_heldout >= n:
            raise ConfigError(
                f"d0 point set has {n} points; held-out size {n_heldout} must leave some for training"
            )
        perm = np.random.default_rng(seed).permutation(n)
        return dataclasses.replace(
            self, points=self.points[perm[n_heldout:]], heldout=self.points[perm[:n_heldout]]
        )

    @property
    def dim(self) -> int:
        return int(
            self.mixture.means.shape[1] if self.mixture is not None else self.points.shape[1]
        )


def mixture_from_lists(weights, means, covs, name: str = "d0") -> GMM:
    """Validate and build a mixture from nested lists. ``covs`` may be full (K, d, d), diagonal
    (K, d) or one variance per component (K,)."""
    try:
        w = np.asarray(weights, dtype=np.float64)
        mu = np.asarray(means, dtype=np.float64)
        cv = np.asarray(covs, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} mixture is not a numeric array: {e}") from None
    if mu.ndim != 2:
        raise ConfigError(f"{name} means must be a K × d list of lists, got shape {mu.shape}")
    k, d = mu.shape
    if w.shape != (k,):
        raise ConfigError(
            f"{name} weights must have {k} entries (one per mean), got shape {w.shape}"
        )
    for label, arr in (("weights", w), ("means", mu), ("covariances", cv)):
        if not np.all(np.isfinite(arr)):
            raise ConfigError(f"{name} {label} contain a non-finite value: {arr.tolist()}")
    if np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
        raise ConfigError(f"{name} weights must be non-negative and sum to 1, got {w.tolist()}")
    if cv.shape == (k,):
        cv = cv[:, None, None] * np.eye(d)
    elif cv.shape == (k, d):
        cv = cv[:, :, None] * np.eye(d)
    elif cv.shape != (k, d, d):
        raise ConfigError(
            f"{name} covariances must have shape ({k},), ({k}, {d}) or ({k}, {d}, {d}), got {cv.shape}"
        )
    for i in range(k):
        if not np.allclose(cv[i], cv[i].T, atol=1e-10):
            raise ConfigError(
                f"{name} covariance of component {i} is not symmetric: {cv[i].tolist()}"
            )
        eig = np.linalg.eigvalsh(cv[i])
        if eig.min() <= 0:
            raise ConfigError(
                f"{name} covariance of component {i} is not positive definite "
                f"(smallest eigenvalue {eig.min():.4g}): {cv[i].tolist()}"
            )
    return GMM(w / w.sum(), mu, cv)


def original_data(
    spec: str,
    weights=(),
    means=(),
    covs=(),
) -> OriginalData:
    """D0 from a spec: ``paper`` (one isotropic 2-D standard Gaussian, as in the paper's
    supplementary GMM experiment), ``two-gaussians`` (equal mixture of N((±2, 0), I)),
    ``mixture`` (``weights``/``means``/``covs`` given explicitly) or a path to a ``.npy``
    file of shape (N, d) holding the original points."""
    spec = str(spec).strip()
    if spec == "paper":
        return OriginalData(GMM(np.ones(1), np.zeros((1, 2)), np.eye(2)[None]), None, "N(0, I₂)")
    if spec == "two-gaussians":
        mix = GMM(np.full(2, 0.5), np.array([[-2.0, 0.0], [2.0, 0.0]]), np.stack([np.eye(2)] * 2))
        return OriginalData(mix, None, "½N((−2,0), I) + ½N((2,0), I)")
    if spec == "mixture":
        if not len(means):
            raise ConfigError("d0 = 'mixture' needs d0_weights, d0_means and d0_covs")
        mix = mixture_from_lists(weights, means, covs)
        return OriginalData(
            mix, None, f"{mix.means.shape[0]}-component mixture in d = {mix.means.shape[1]}"
        )
    if spec.endswith(".npy"):
        pts = load_array("d0 points", spec, ndim=(2,))
        return OriginalData(None, pts, f"{pts.shape[0]} points from {Path(spec).name}")
    raise ConfigError(
        f"unknown d0 {spec!r}; use paper, two-gaussians, mixture or a path to a .npy file"
    )


# --------------------------------------------------------------------------------------------
# One chain of the recursion


class GMMChainState(NamedTuple):
    """One recursion after generation n: the training set T_n that fits generation n + 1."""

    data: PointBuffer  # T_n (and the pool) by the shared policies
    gmm: GMM  # model n (the warm start of generation n + 1)
    reference: GMM  # generation-0 mixture of the L2 distance (D0, or a fit to the D0 points)
    heldout: Float[Array, "H d"]  # held-out original points


class GMMInfo(NamedTuple):
    """What generation n reports for one recursion (generation 0: the reference mixture)."""

    l2_distance: Float[Array, ""]  # ‖p_0 - p_n‖²₂ (closed form)
    component_std: Float[Array, ""]  # Σ_k π_k √(tr Σ_k / d)
    heldout_loglik: Float[Array, ""]  # mean log p_n(x) over held-out original points
    weight_entropy: Float[Array, ""]  # -Σ_k π_k log π_k
    train_loglik: Float[Array, ""]  # mean log p_n over the training set it was fitted to
    em_iterations: Int[Array, ""]  # EM iterations of this generation's fit (0 at n = 0)
    em_converged: Bool[Array, ""]  # whether that fit met tol
    generation: Int[Array, ""]  # n
    batch: Float[Array, "B d"]  # the batch B_n drawn after fitting model n (T_0 at n = 0)
    batch_w: Float[Array, " B"]  # 1 for its points, 0 for padding
    w2_model: Float[Array, "S d"]  # fresh samples of model n for the W2 estimate
    w2_original: Float[Array, "S d"]  # held-out original points for the W2 estimate


@dataclasses.dataclass(frozen=True)
class RecursionSpec:
    """Static description of one recursion; it fixes every shape of the compiled kernels."""

    n_components: int  # K
    em: EMConfig  # EM options
    init: str  # kmeans | kmeans++ | warm
    policy: Policy  # data policy
    m0: int  # |T_0|, the number of original points that fit generation 1
    max_batch: int  # B >= every M_i (batch buffer size)
    pool_capacity: int  # accumulating policies: pool buffer size (>= all points + B slack)
    heldout: int  # H held-out original points (mixtures: fresh samples per recursion)
    w2_samples: int  # S points per side of the W2 estimate (S <= H)

    def __post_init__(self):
        check_choice("init", self.init, INITS)
        check_int("components", self.n_components, 1)
        check_int("m0", self.m0, self.n_components)
        check_int("max_batch", self.max_batch, self.m0)
        check_int("heldout", self.heldout, 1)
        check_int("w2_samples", self.w2_samples, 1, self.heldout)
        if self.policy.accumulates:
            check_int("pool_capacity", self.pool_capacity, self.max_batch)


def _mask(n, size, dtype):
    return (jnp.arange(size) < n).astype(dtype)


def make_family(spec: RecursionSpec, d0: OriginalData, dtype=jnp.float32) -> Family:
    """The GMM family for one recursion (:class:`collapse_jax.core.loop.Family`, no params).

    Generation n (``step``, ``gen.size`` = M_n): fit model n to T_{n-1} by EM (initialised
    by ``spec.init``), measure it against the reference mixture and the held-out original points,
    draw the batch B_n of M_n points (round(α M_n) samples of model n, round(β M_n) points of
    T_{n-1} without replacement, round(γ M_n) fresh D0 points) and form T_n by the policy:
    replace / mix: T_n = B_n; accumulate: T_n = T_{n-1} ∪ B_n; accumulate-subsample: pool
    P_n = P_{n-1} ∪ B_n and T_n = M_n points of P_n uniformly without replacement.
    """
    K = spec.n_components
    B = spec.max_batch
    H = spec.heldout
    S = spec.w2_samples
    policy = spec.policy
    d = d0.dim
    mixture = GMM(*(jnp.asarray(a, dtype) for a in d0.mixture)) if d0.mixture is not None else None
    points = jnp.asarray(d0.points, dtype) if d0.points is not None else None
    fixed_heldout = jnp.asarray(d0.heldout, dtype) if d0.heldout is not None else None
    if mixture is None and fixed_heldout is None:
        raise ConfigError("a D0 point set needs held-out points: call OriginalData.split_heldout")

    def draw_original(key, n):
        """n points of D0: exact mixture samples, or points of the D0 set (without replacement
        when it holds at least n)."""
        if mixture is not None:
            return sample(key, mixture, n)
        if points.shape[0] >= n:
            return subsample(key, points, jnp.ones(points.shape[0], dtype), n)
        return points[jax.random.randint(key, (n,), 0, points.shape[0])]

    def measure(key, gmm, ref, heldout, train_ll, em_iter, em_conv, gen, batch, batch_w):
        return GMMInfo(
            l2_distance=l2_distance_squared(ref, gmm),
            component_std=component_std(gmm),
            heldout_loglik=mean_log_likelihood(gmm, heldout),
            weight_entropy=weight_entropy(gmm),
            train_loglik=train_ll,
            em_iterations=em_iter,
            em_converged=em_conv,
            generation=gen,
            batch=batch,
            batch_w=batch_w,
            w2_model=sample(key, gmm, S),
            w2_original=heldout[:S],
        )

    def init(key: jax.Array, params, gen_in: GenInput) -> tuple[GMMChainState, GMMInfo]:
        """Generation 0: T_0 = M_0 original points, held-out points and the reference mixture."""
        k_train, k_held, k_ref, k_w2 = jax.random.split(key, 4)
        x0 = draw_original(k_train, B)
        w0 = _mask(gen_in.size, B, dtype)
        heldout = draw_original(k_held, H) if fixed_heldout is None else fixed_heldout[:H]
        if mixture is not None:
            ref = mixture
        else:
            ref, _ = fit(k_ref, x0, w0, K, spec.em, "kmeans")
        if spec.init == "warm":
            start = initialize(k_ref, x0, w0, K, spec.em, "kmeans")  # first fit: k-means
        else:
            start = GMM(
                jnp.full((K,), 1.0 / K, dtype),
                jnp.zeros((K, d), dtype),
                jnp.broadcast_to(jnp.eye(d, dtype=dtype), (K, d, d)),
            )
        train_ll = weighted_log_likelihood(ref, x0, w0)
        gen = jnp.asarray(gen_in.generation, jnp.int32)
        info = measure(
            k_w2,
            ref,
            ref,
            heldout,
            train_ll,
            jnp.asarray(0, jnp.int32),
            jnp.asarray(True),
            gen,
            x0,
            w0,
        )
        data = initial_buffer(x0, w0, policy, B, spec.pool_capacity)
        return GMMChainState(data, start, ref, heldout), info

    def step(
        key: jax.Array, state: GMMChainState, params, gen_in: GenInput
    ) -> tuple[GMMChainState, GMMInfo]:
        """Generation n = ``gen_in.generation`` (see :func:`make_family`)."""
        k_fit, k_model, k_prev, k_orig, k_sub, k_w2 = jax.random.split(key, 6)
        gen = jnp.asarray(gen_in.generation, jnp.int32)
        size = jnp.asarray(gen_in.size, jnp.int32)
        data = state.data
        if spec.init == "warm":
            gmm, em = fit_em(data.x, data.w, state.gmm, spec.em)
        else:
            gmm, em = fit(k_fit, data.x, data.w, K, spec.em, spec.init)
        model_points = sample(k_model, gmm, B)
        batch, batch_w = new_batch(k_prev, k_orig, model_points, draw_original, data, size, policy)
        info = measure(
            k_w2,
            gmm,
            state.reference,
            state.heldout,
            em.loglik,
            em.n_iter,
            em.converged,
            gen,
            batch,
            batch_w,
        )
        data = next_buffer(k_sub, data, batch, batch_w, size, policy)
        return state._replace(data=data, gmm=gmm), info

    return Family(init, step)


def weighted_log_likelihood(gmm: GMM, x: Float[Array, "N d"], w: Float[Array, " N"]):
    """Weighted mean log-likelihood Σ_n w_n log p(x_n) / Σ_n w_n."""
    lp = log_prob(gmm, x)
    return jnp.sum(jnp.where(w > 0, w * lp, 0.0)) / jnp.sum(w)
