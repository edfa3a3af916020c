"""The laws the data operators produce (written once; :mod:`collapse_jax.core.operators` holds
their configuration and validation). Pure, jittable functions of the fitted model and an
:class:`~collapse_jax.core.operators.Operators`:

* categorical: :func:`categorical` (temperature, top-k / top-p, curation p·H_K with H_K by
  quadrature, :func:`curation_factor`, and verification), :func:`tilt`, :func:`temper`,
  :func:`truncate`;
* points: :func:`point_samples` (K candidates per kept point, Gumbel-max Bradley–Terry choice,
  verifier tries), :func:`tilt_gaussian` (the K → ∞ curation law of a Gaussian),
  :func:`temper_mixture` (a mixture's components);
* host arrays: :func:`select_indices` (the neural studies' tournament and verifier in NumPy).

Derivations: ``theory/operators.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from collapse_jax.numerics.random import jax_uniform

if TYPE_CHECKING:
    from collapse_jax.core.operators import Operators, PointReward

# --------------------------------------------------------------------------------------------
# Categorical laws (exact)

#: Quadrature of H_K: nodes per unit of log t (trapezoid; the integrand is analytic and decays
#: doubly exponentially on the right and exponentially on the left, so the rule converges
#: geometrically in the node density).
_NODES_PER_UNIT = 16
_LOG_T_LOW = -40.0  # e^{-40}: the integrand's left tail below it is < 1e-17 of the total
MAX_REWARD_SPREAD = 60.0  # max r − min r over states, in nats (the quadrature's range)


def curation_factor(p: Float[Array, " K"], r: Float[Array, " K"], k: int) -> Float[Array, " K"]:
    """H_K(i) = E[K e^{r_i} / (e^{r_i} + Σ_{j<K} e^{r_{X_j}})], X_j iid ~ p (K − 1 of them).

    With 1/a = ∫_0^∞ e^{−ta} dt and independence,
    H_K(i) = K ∫_0^∞ e^{r_i} e^{−t e^{r_i}} φ(t)^{K−1} dt, φ(t) = Σ_j p_j e^{−t e^{r_j}},
    computed by the trapezoidal rule in s = log t (theory/operators.md, "Curation"). The
    rewards are shifted so that max r = 0 (H_K does not change). Exact to quadrature error
    (below 1e-9 relative in float64, float32 rounding otherwise).
    """
    r = r - jnp.max(jnp.where(p > 0, r, -jnp.inf))
    r = jnp.where(p > 0, r, 0.0)
    # s from −40 to MAX_REWARD_SPREAD + 5, where e^{s + r_i} >= e^5 for every state (the
    # parser refuses rewards spread over more than MAX_REWARD_SPREAD nats): one static grid.
    hi = MAX_REWARD_SPREAD + 5.0
    n = int((hi - _LOG_T_LOW) * _NODES_PER_UNIT) + 1
    s = jnp.linspace(_LOG_T_LOW, hi, n, dtype=p.dtype)
    h = s[1] - s[0]
    t = jnp.exp(s)
    logp = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
    log_phi = jax.scipy.special.logsumexp(logp[None, :] - t[:, None] * jnp.exp(r)[None, :], axis=1)
    # integrand in s: K e^{s + r_i} exp(−e^{s + r_i}) φ(e^s)^{K−1}
    u = s[:, None] + r[None, :]
    log_f = u - jnp.exp(u) + (k - 1) * log_phi[:, None]
    f = jnp.exp(log_f)
    total = h * (jnp.sum(f, axis=0) - 0.5 * (f[0] + f[-1]))
    return k * total


def tilt(p: Float[Array, " K"], r: Float[Array, " K"]) -> Float[Array, " K"]:
    """The K → ∞ curation law p ∝ p·e^r."""
    logw = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)) + r, -jnp.inf)
    return jax.nn.softmax(logw)


def temper(p: Float[Array, " K"], tau: float) -> Float[Array, " K"]:
    """p^{1/τ} / Σ p^{1/τ} (zero states stay zero)."""
    logw = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)) / tau, -jnp.inf)
    return jax.nn.softmax(logw)


def truncate(p: Float[Array, " K"], top_k: int = 0, top_p: float = 1.0) -> Float[Array, " K"]:
    """Keep the ``top_k`` most probable states (ties: the lower index), then the smallest set of
    most probable states whose mass reaches ``top_p`` (a state is kept when the mass of the states
    before it, in decreasing order, is below ``top_p``); renormalise."""
    keep = p > 0
    if top_k > 0:
        _, idx = jax.lax.top_k(p, top_k)
        keep = keep & jnp.zeros(p.shape, bool).at[idx].set(True)
    q = jnp.where(keep, p, 0.0)
    if top_p < 1.0:
        q = q / jnp.sum(q)
        order = jnp.argsort(-q, stable=True)
        before = jnp.cumsum(q[order]) - q[order]
        kept_sorted = before < top_p
        keep = keep & jnp.zeros(p.shape, bool).at[order].set(kept_sorted)
        q = jnp.where(keep, p, 0.0)
    return q / jnp.sum(q)


def temper_mixture(weights, covs, ops: Operators):
    """Temperature and top-k / top-p on a Gaussian mixture before sampling, component by
    component: weights π^{1/τ} (normalised), then truncated to the top-k / top-p components,
    and covariances τΣ_k (N(μ, Σ)^{1/τ} ∝ N(μ, τΣ)). The tempered density of a mixture is not a
    mixture; this is the analogue of the categorical operators on the choice of component and
    the exact tempering of each component. Returns (weights, covs)."""
    if ops.temperature != 1.0:
        weights = temper(weights, ops.temperature)
        covs = covs * jnp.asarray(ops.temperature, covs.dtype)
    if ops.top_k > 0 or ops.top_p < 1.0:
        weights = truncate(weights, ops.top_k, ops.top_p)
    return weights, covs


def categorical(p, ops: Operators, reward=None, good=None) -> Float[Array, " K"]:
    """The law of one sample after the operators, in the order temperature, top-k, top-p,
    curation, verification (each exact; theory/operators.md). ``reward`` and ``good`` are the
    per-slot reward vector and correct-state mask (gathered through a compacted state axis).

    Verification keeps drawing until a sample is accepted (the training set keeps its size):
    p̃ ∝ p·a with a = tpr on good states and fpr on the others; when the verifier would accept
    nothing (Σ p·a = 0) the law is left unfiltered.
    """
    if ops.temperature != 1.0:
        p = temper(p, ops.temperature)
    if ops.top_k > 0 or ops.top_p < 1.0:
        p = truncate(p, ops.top_k, ops.top_p)
    if ops.curate is not None:
        if math.isinf(ops.curate.k):
            p = tilt(p, reward)
        else:
            p = p * curation_factor(p, reward, int(ops.curate.k))
            p = p / jnp.sum(p)
    if ops.verify is not None:
        a = jnp.where(good, ops.verify.tpr, ops.verify.fpr).astype(p.dtype)
        q = p * a
        z = jnp.sum(q)
        p = jnp.where(z > 0, q / jnp.where(z > 0, z, 1.0), p)
    return p


# --------------------------------------------------------------------------------------------
# Points


def point_samples(
    key: jax.Array,
    sample: Callable[[jax.Array, int], jax.Array],
    n: int,
    ops: Operators,
    coords: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``n`` points of the model after finite-K curation and verification, and their weights.

    Curation: K candidates per point, the kept one drawn by Gumbel-max on r (exactly the
    Bradley–Terry choice, probability e^{r_k} / Σ_j e^{r_j}). Verification: ``draws`` curated
    candidates per point, each accepted with probability tpr (inside the region) or fpr; the first
    accepted is kept, and a point with none accepted gets weight 0 (probability (1 − A)^draws
    for acceptance rate A). ``sample(key, m)`` draws m model points (leading axis); the reward
    and the region read their first ``coords`` columns (all when ``None``; e.g. the KDE's points
    carry an ancestor index after the d coordinates).
    """

    def feat(x):
        return x if coords is None else x[..., :coords]

    curate = ops.curate if ops.curate is not None and math.isfinite(ops.curate.k) else None

    def curated(key, m):
        if curate is None:
            return sample(key, m)
        k_draw, k_pick = jax.random.split(key)
        k = int(curate.k)
        x = sample(k_draw, m * k)
        x = x.reshape(m, k, *x.shape[1:])
        score = curate.reward(feat(x)) + jax.random.gumbel(k_pick, (m, k), x.dtype)
        return jnp.take_along_axis(x, jnp.argmax(score, 1)[:, None, None], 1)[:, 0]

    if ops.verify is None:
        x = curated(key, n)
        return x, jnp.ones((n,), x.dtype)
    v = ops.verify
    k_draw, k_accept = jax.random.split(key)
    x = curated(k_draw, n * v.draws)
    x = x.reshape(n, v.draws, *x.shape[1:])
    rate = jnp.where(v.good.contains(feat(x)), v.tpr, v.fpr)
    accept = jax_uniform(k_accept, (n, v.draws), x.dtype) < rate
    first = jnp.argmax(accept, 1)
    kept = jnp.take_along_axis(x, first[:, None, None], 1)[:, 0]
    return kept, jnp.any(accept, 1).astype(x.dtype)


def tilt_gaussian(mean: Float[Array, " d"], lchol: Float[Array, "d d"], reward: PointReward):
    """The K → ∞ curation law of N(μ, Σ = L Lᵀ) with reward r(x) = bᵀx − (a/2)‖x‖² + const:
    N(μ̃, Σ̃) with Σ̃ = (Σ⁻¹ + aI)⁻¹ = L (I + a LᵀL)⁻¹ Lᵀ and μ̃ = μ + Σ̃ (b − aμ).
    Returns (μ̃, L̃) with L̃ L̃ᵀ = Σ̃ (L̃ = L C⁻ᵀ, C the Cholesky factor of I + a LᵀL)."""
    a, b = reward.natural()
    b = jnp.asarray(b, mean.dtype)
    if a == 0.0:
        return mean + lchol @ (lchol.T @ b), lchol
    d = mean.shape[0]
    c = jnp.linalg.cholesky(jnp.eye(d, dtype=mean.dtype) + a * (lchol.T @ lchol))
    lt = jax.scipy.linalg.solve_triangular(c, lchol.T, lower=True).T  # L C^{-T}
    return mean + lt @ (lt.T @ (b - a * mean)), lt


# --------------------------------------------------------------------------------------------
# Host arrays of examples (the neural families)


def candidates_per_example(ops: Operators) -> int:
    """Model samples one kept example of :func:`select_indices` consumes (K × tries)."""
    k = int(ops.curate.k) if ops.curate is not None and math.isfinite(ops.curate.k) else 1
    return k * (ops.verify.draws if ops.verify is not None else 1)


def select_indices(
    rng: np.random.Generator,
    pool: int,
    n: int,
    ops: Operators,
    reward: np.ndarray | None = None,
    correct: np.ndarray | None = None,
    fresh: bool = False,
) -> np.ndarray:
    """Indices of ``n`` examples drawn from a pool of ``pool`` model outputs after curation and
    verification: the NumPy twin of :func:`point_samples` for host arrays. Candidates are drawn
    uniformly with replacement from the pool (the model's law as its decoded outputs); curation
    keeps one of K by Gumbel-max on ``reward`` (per pool entry), verification gives each example
    ``draws`` tries accepted with probability tpr (``correct``) or fpr; an example with none
    accepted is dropped, so fewer than ``n`` indices may come back. With ``fresh`` the pool
    holds exactly n·tries·K fresh model samples, each used as one candidate (the exact law of
    :func:`point_samples`)."""
    curate = ops.curate if ops.curate is not None and math.isfinite(ops.curate.k) else None
    tries = ops.verify.draws if ops.verify is not None else 1
    k = int(curate.k) if curate is not None else 1
    if fresh:
        if pool != n * tries * k:
            raise ValueError(f"a fresh pool needs {n * tries * k} samples, got {pool}")
        cand = np.arange(pool).reshape(n, tries, k)
    else:
        cand = rng.integers(0, pool, size=(n, tries, k))
    if curate is not None:
        score = np.asarray(reward, np.float64)[cand] + rng.gumbel(size=cand.shape)
        cand = np.take_along_axis(cand, score.argmax(2)[..., None], 2)
    cand = cand[..., 0]  # (n, tries)
    if ops.verify is None:
        return cand[:, 0]
    rate = np.where(np.asarray(correct, bool)[cand], ops.verify.tpr, ops.verify.fpr)
    accept = rng.random(cand.shape) < rate
    kept = accept.any(1)
    return cand[np.arange(n), accept.argmax(1)][kept]
