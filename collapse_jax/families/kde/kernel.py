"""Gaussian kernel density estimation, one chain: fit (the centres and the bandwidth), sample,
metrics, and the generational kernels on the shared point policies.

A KDE fitted to weighted points (c_i, w_i) with bandwidth h is p(x) = Σ_i w_i N(x; c_i, h² I) /
Σ_i w_i; sampling picks a centre with probability w_i / Σ w (weights 0 are padding) and adds
N(0, h² I). Each point of the shared :class:`~collapse_jax.core.policies.PointBuffer` carries one
extra column after its d coordinates: the index of its D0 ancestor (an exact integer in float32),
which a sampled point inherits from its centre, so the number of D0 points still represented is
counted exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float

from collapse_jax.core import operators
from collapse_jax.core.loop import Family, GenInput
from collapse_jax.core.operators import Operators
from collapse_jax.core.policies import PointBuffer, Policy, initial_buffer, new_batch, next_buffer
from collapse_jax.families.kde.datasets import Dataset
from collapse_jax.numerics.random import jax_normal

#: Bandwidth rules besides a fixed number.
RULES = ("scott", "silverman")
#: Largest integer float32 holds exactly (ancestor indices are stored as float32).
MAX_INDEX = 2**24


class KDE(NamedTuple):
    """A Gaussian KDE: centres with weights (0 = padding) and one isotropic bandwidth."""

    centers: Float[Array, "T d"]
    weights: Float[Array, " T"]
    bandwidth: Float[Array, ""]


def rule_factor(n, d: int, rule: str):
    """SciPy's ``gaussian_kde`` bandwidth factor for n (effective) points in d dimensions:
    Scott n^(−1/(d+4)), Silverman (n (d + 2) / 4)^(−1/(d+4))."""
    if rule == "scott":
        return n ** (-1.0 / (d + 4))
    if rule == "silverman":
        return (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
    raise ValueError(f"unknown bandwidth rule {rule!r}")


def rule_bandwidth(x: Float[Array, "T d"], w: Float[Array, " T"], rule: str) -> Float[Array, ""]:
    """The isotropic version of SciPy's rule: h² = factor² · tr(Σ̂)/d, where Σ̂ is the weighted
    unbiased covariance of the points (``np.cov(..., aweights=w)``, as ``gaussian_kde``) and the
    factor uses the effective size n = (Σw)²/Σw². SciPy's kernel covariance is factor² Σ̂; its
    trace over d is h² here (equal to SciPy's in d = 1)."""
    d = x.shape[-1]
    sw = jnp.sum(w)
    n_eff = sw**2 / jnp.sum(w * w)
    mean = jnp.sum(w[:, None] * x, 0) / sw
    dev = x - mean[None, :]
    # np.cov with aweights: Σ w dev² / (Σw − Σw²/Σw).
    var = jnp.sum(w[:, None] * dev * dev) / (sw - jnp.sum(w * w) / sw)
    return rule_factor(n_eff, d, rule) * jnp.sqrt(var / d)


def fit(x: Float[Array, "T d"], w: Float[Array, " T"], bandwidth: float | str) -> KDE:
    """The KDE of the points ``x`` with weights ``w``: a fixed bandwidth, or a rule of
    :data:`RULES` applied to the points."""
    if isinstance(bandwidth, str):
        h = rule_bandwidth(x, w, bandwidth)
    else:
        h = jnp.asarray(bandwidth, x.dtype)
    return KDE(x, w, h)


def pick_centers(key: jax.Array, w: Float[Array, " T"], n: int) -> Array:
    """Indices of ``n`` centres drawn with probabilities w / Σw, by inverse CDF (O(T + n log T),
    not O(nT) like Gumbel-max over every centre)."""
    cdf = jnp.cumsum(w)
    u = jax.random.uniform(key, (n,), w.dtype) * cdf[-1]
    idx = jnp.searchsorted(cdf, u, side="right")
    return jnp.minimum(idx, w.shape[0] - 1)


def sample(key: jax.Array, kde: KDE, n: int, extra=None) -> Float[Array, "n d"]:
    """``n`` points of the KDE: a centre with probability w_i/Σw, plus N(0, h² I). ``extra``
    (T, k) columns are carried along from the chosen centres (e.g. ancestor indices) and
    appended after the d coordinates."""
    k_pick, k_noise = jax.random.split(key)
    idx = pick_centers(k_pick, kde.weights, n)
    noise = jax_normal(k_noise, (n, kde.centers.shape[1]), kde.centers.dtype)
    pts = kde.centers[idx] + kde.bandwidth * noise
    if extra is None:
        return pts
    return jnp.concatenate([pts, extra[idx]], 1)


def log_density(kde: KDE, y: Float[Array, "H d"]) -> Float[Array, " H"]:
    """log p(y) = logsumexp_i(log w_i − ‖y − c_i‖²/(2h²)) − log Σw − (d/2) log(2π h²)."""
    d = y.shape[1]
    h2 = kde.bandwidth**2
    sq = (
        jnp.sum(y * y, 1)[:, None]
        - 2.0 * y @ kde.centers.T
        + jnp.sum(kde.centers * kde.centers, 1)[None, :]
    )
    sq = jnp.maximum(sq, 0.0)
    logw = jnp.where(
        kde.weights > 0, jnp.log(jnp.where(kde.weights > 0, kde.weights, 1.0)), -jnp.inf
    )
    lse = logsumexp(logw[None, :] - sq / (2.0 * h2), axis=1)
    return lse - jnp.log(jnp.sum(kde.weights)) - 0.5 * d * jnp.log(2.0 * math.pi * h2)


def pairwise_sq_distance(x: Float[Array, "B d"], w: Float[Array, " B"]) -> Float[Array, ""]:
    """Mean of ‖x_i − x_j‖² over the distinct pairs i ≠ j of the points with w > 0:
    (2n Σ‖x_i‖² − 2‖Σ x_i‖²) / (n(n − 1)), computed about the mean for accuracy."""
    m = (w > 0).astype(x.dtype)
    n = jnp.sum(m)
    mean = jnp.sum(m[:, None] * x, 0) / n
    dev = (x - mean[None, :]) * m[:, None]
    return 2.0 * jnp.sum(dev * dev) / (n - 1.0)


def distinct_count(ids: Float[Array, " B"], w: Float[Array, " B"]) -> Array:
    """Number of distinct values of ``ids`` among the rows with w > 0."""
    s = jnp.sort(jnp.where(w > 0, ids, jnp.inf))
    new = jnp.concatenate([jnp.isfinite(s[:1]), (s[1:] != s[:-1]) & jnp.isfinite(s[1:])])
    return jnp.sum(new).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# One chain of the recursion


class KDEState(NamedTuple):
    """One chain after generation n: T_n (the centres of model n + 1) with ancestor indices."""

    data: PointBuffer  # rows (x_1..x_d, ancestor index), by the shared policies
    original: Float[Array, "M0 e"]  # T_0 with indices (a .npy D0's fresh points come from it)
    heldout: Float[Array, "H d"]  # real points for the held-out NLL and W2


class KDEInfo(NamedTuple):
    """What generation n reports for one chain (generation 0: the D0 sample T_0)."""

    heldout_nll: Float[Array, ""]  # −mean log p_n(y) over held-out real points (NaN at n = 0)
    pairwise_sq_distance: Float[Array, ""]  # mean ‖X_i − X_j‖², i ≠ j, over the batch B_n
    ancestors: Array  # distinct D0 indices among the points of B_n
    bandwidth: Float[Array, ""]  # h of model n (NaN at n = 0)
    w2_model: Float[Array, "S d"]  # the first S points of B_n
    w2_original: Float[Array, "S d"]  # the first S held-out real points
    batch: Float[Array, "B d"]  # B_n's coordinates (snapshots of chain 0)
    batch_w: Float[Array, " B"]


@dataclasses.dataclass(frozen=True)
class KDESpec:
    """Static description of one chain; it fixes every shape of the compiled kernels."""

    bandwidth: float | str  # h, or a rule of RULES
    policy: Policy
    m0: int  # |T_0|
    max_batch: int  # B >= every M_n
    pool_capacity: int  # accumulating policies: pool rows (>= every point drawn + B)
    heldout: int  # H held-out real points
    in_sample: bool  # .npy with N = M_0: the "held-out" points are T_0 itself
    w2_samples: int  # S <= min(M_n, H)
    ops: Operators = operators.NONE  # data operators on the model samples (curate, verify)


def make_family(spec: KDESpec, dataset: Dataset, dtype=jnp.float32) -> Family:
    """The KDE family for one chain (:class:`collapse_jax.core.loop.Family`, no params).

    ``init`` (generation 0): T_0 = M_0 points of D0 with ancestor indices 0..M_0−1 (a ``.npy``
    D0: a uniform random M_0-subset of the file, indexed by file row; the other rows, up to
    H, are held out), and H held-out real points. ``step`` (generation n): model n = the KDE of
    T_{n−1}; its held-out NLL (on recorded generations only); the batch B_n of M_n points
    (α M_n samples of model n, β M_n points of T_{n−1}, γ M_n fresh D0 points, which get new
    ancestor indices M_0 + (n − 1) B + j, or for a file are redrawn from T_0 with their own
    indices) measured for pairwise distance and ancestors; T_n by the policy.
    """
    B = spec.max_batch
    H = spec.heldout
    S = spec.w2_samples
    d = dataset.dim
    m0 = spec.m0
    policy = spec.policy
    points = jnp.asarray(dataset.points, dtype) if dataset.is_file else None

    def measure_batch(batch, batch_w, heldout, nll, h):
        return KDEInfo(
            heldout_nll=nll,
            pairwise_sq_distance=pairwise_sq_distance(batch[:, :d], batch_w),
            ancestors=distinct_count(batch[:, d], batch_w),
            bandwidth=h,
            w2_model=batch[:S, :d],
            w2_original=heldout[:S],
            batch=batch[:, :d],
            batch_w=batch_w,
        )

    def init(key: jax.Array, params, gen: GenInput) -> tuple[KDEState, KDEInfo]:
        k_train, k_held = jax.random.split(key)
        ids = jnp.arange(B, dtype=dtype)[:, None]
        if points is None:
            x0 = jnp.concatenate([dataset.sample(k_train, B, dtype), ids], 1)
            heldout = dataset.sample(k_held, H, dtype)
        else:
            perm = jax.random.permutation(k_train, points.shape[0])
            rows = perm[: min(B, points.shape[0])]
            x0 = jnp.concatenate([points[rows], rows[:, None].astype(dtype)], 1)
            x0 = jnp.zeros((B, d + 1), dtype).at[: rows.shape[0]].set(x0)
            heldout = points[rows[:H]] if spec.in_sample else points[perm[m0 : m0 + H]]
        w0 = (jnp.arange(B) < gen.size).astype(dtype)
        nan = jnp.full((), jnp.nan, dtype)
        info = measure_batch(x0, w0, heldout, nan, nan)
        data = initial_buffer(x0, w0, policy, B, spec.pool_capacity)
        return KDEState(data, x0[:m0], heldout), info

    def step(key: jax.Array, state: KDEState, params, gen: GenInput) -> tuple[KDEState, KDEInfo]:
        k_model, k_prev, k_orig, k_sub = jax.random.split(key, 4)
        data = state.data
        kde = fit(data.x[:, :d], data.w, spec.bandwidth)
        if spec.ops.on_points:
            model_points, model_w = operators.point_samples(
                k_model, lambda k, n: sample(k, kde, n, extra=data.x[:, d:]), B, spec.ops, d
            )
        else:
            model_points, model_w = sample(k_model, kde, B, extra=data.x[:, d:]), None

        def draw_original(k, n):
            if points is None:
                first = m0 + (gen.generation - 1) * B
                ids = (first + jnp.arange(n)).astype(dtype)[:, None]
                return jnp.concatenate([dataset.sample(k, n, dtype), ids], 1)
            return state.original[jax.random.randint(k, (n,), 0, m0)]

        batch, batch_w = new_batch(
            k_prev, k_orig, model_points, draw_original, data, gen.size, policy, model_w
        )
        nll = jax.lax.cond(
            gen.record,
            lambda: -jnp.mean(log_density(kde, state.heldout)),
            lambda: jnp.full((), jnp.nan, dtype),
        )
        info = measure_batch(batch, batch_w, state.heldout, nll, kde.bandwidth)
        data = next_buffer(k_sub, data, batch, batch_w, gen.size, policy)
        return state._replace(data=data), info

    return Family(init, step)
