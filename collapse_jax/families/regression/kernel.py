"""Linear regression refitted on its own labels: one chain's generational kernels
(:class:`collapse_jax.core.loop.Family`).

Features x ∈ R^d have rows N(0, Σ) with Σ = diag(i^−a) (a = 0: isotropic); labels are
y = xᵀw + ε, ε ~ N(0, σ²). Generation 1 is fitted (OLS, or ridge: minimise
Σ (y − xᵀw)² + λ‖w‖², scikit-learn's ``Ridge(fit_intercept=False)``) to M_0 rows labelled by the
true w*; generation n + 1 to rows labelled by model n plus fresh noise, composed by the shared
data policies. With a *fixed* design one X of M rows per chain is drawn once and every
generation relabels it; with a *fresh* design every generation draws new rows.

Two exact paths:

* ``samples``: the rows themselves, as (x, y) points in the shared
  :class:`~collapse_jax.core.policies.PointBuffer` (every policy, schedule and fresh fraction);
* ``sufficient``: the training set only through its sufficient statistics
  (Gram G = Σ x xᵀ, r = Σ x y, Σ y², row count), drawn directly from their law. A batch of T
  rows with Gram W = F Fᵀ labelled by w has Xᵀε ~ N(0, σ² W), so
  r = W w + σ F z and Σ y² = wᵀW w + 2σ wᵀF z + σ²(‖z‖² + χ²_{T−d}) (the residual of ε off the
  column space is independent of Xᵀε); a fixed design keeps XᵀX's eigendecomposition (every
  solve and draw is then O(d²)), a fresh one draws W ~ Wishart(T, Σ) by Bartlett's
  decomposition (O(d³)). The cost per generation does not depend on T. It applies to replace
  and accumulate without fresh data, rows T > d, and a constant size for the fixed design
  (tested equal in distribution to ``samples``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from collapse_jax.core.loop import Family, GenInput
from collapse_jax.core.policies import (
    PointBuffer,
    Policy,
    initial_buffer,
    new_batch,
    next_buffer,
    split_batch,
)
from collapse_jax.numerics import linalg
from collapse_jax.numerics.random import jax_normal, log_gamma
from collapse_jax.numerics.wishart import bartlett

DESIGNS = ("fixed", "fresh")
SAMPLERS = ("auto", "sufficient", "samples")


@dataclasses.dataclass(frozen=True)
class RegressionSpec:
    """Everything one chain's kernels need (static numbers and the true model)."""

    dim: int  # d
    noise: float  # σ, the label-noise standard deviation
    ridge: float  # λ (0: OLS)
    design: str  # fixed | fresh
    scale: np.ndarray  # (d,) √diag Σ
    w_star: np.ndarray  # (d,) the true weights
    wrong_fraction: float  # p₂: fraction of every real batch labelled by the wrong model
    w_wrong: np.ndarray  # (d,) w₂, the wrong model of strong model collapse
    policy: Policy
    max_size: int  # rows of the largest batch
    pool_capacity: int  # accumulating policies: rows ever drawn


class RegressionInfo(NamedTuple):
    """What generation n reports (generation 0: the true model w*)."""

    excess_risk: Float[Array, ""]  # ‖ŵ_n − w*‖²_Σ = E_x[(xᵀŵ_n − xᵀw*)²]
    param_error: Float[Array, ""]  # ‖ŵ_n − w*‖²
    train_loss: Float[Array, ""]  # mean squared residual of ŵ_n on its own training set


class SampleState(NamedTuple):
    """Path ``samples``: the training rows [x | y] and the fixed design (empty when fresh)."""

    data: PointBuffer
    design: Float[Array, "T d"]


class StatState(NamedTuple):
    """Path ``sufficient``, fresh design: the training set's sufficient statistics."""

    gram: Float[Array, "d d"]  # Σ x xᵀ over the training rows
    xy: Float[Array, " d"]  # Σ x y
    yy: Float[Array, ""]  # Σ y²
    rows: Float[Array, ""]  # number of training rows


class FixedStatState(NamedTuple):
    """Path ``sufficient``, fixed design: the statistics of the training set (k copies of the
    design, so its Gram is k·XᵀX) and the eigendecomposition XᵀX = U diag(s) Uᵀ, which turns
    every solve and draw into O(d²) products."""

    xy: Float[Array, " d"]  # Σ x y
    yy: Float[Array, ""]  # Σ y²
    rows: Float[Array, ""]  # number of training rows (k = rows / M copies of the design)
    basis: Float[Array, "d d"]  # U
    spectrum: Float[Array, " d"]  # s


def sufficient_applies(
    spec_policy: Policy, design: str, sizes: np.ndarray, dim: int, wrong_fraction: float
) -> str:
    """Why the sufficient-statistic path cannot run this setting ('' when it can)."""
    if wrong_fraction > 0:
        return "a wrong-model fraction (real labels from two models)"
    if spec_policy.mode not in ("replace", "accumulate") or spec_policy.gamma > 0:
        return f"policy {spec_policy.describe()} (needs replace or accumulate without fresh data)"
    if int(np.min(sizes)) <= dim:
        return f"a size of {int(np.min(sizes))} rows (needs more rows than d = {dim})"
    if design == "fixed" and np.any(sizes != sizes[0]):
        return "a varying schedule with a fixed design (needs a constant size)"
    return ""


def _solve(gram, xy, ridge):
    """argmin_w Σ (y − xᵀw)² + λ‖w‖² from the Gram matrix and Xᵀy."""
    d = gram.shape[0]
    a = gram + ridge * jnp.eye(d, dtype=gram.dtype)
    return linalg.cho_solve(linalg.cholesky(a), xy[..., None])[..., 0]


def _info(spec: RegressionSpec, w_hat, gram, xy, yy, rows) -> RegressionInfo:
    diff = w_hat - jnp.asarray(spec.w_star, w_hat.dtype)
    scale = jnp.asarray(spec.scale, w_hat.dtype)
    rss = yy - 2.0 * w_hat @ xy + w_hat @ gram @ w_hat
    return RegressionInfo(
        excess_risk=jnp.sum((scale * diff) ** 2),
        param_error=jnp.sum(diff**2),
        train_loss=rss / rows,
    )


def make_family(spec: RegressionSpec, sampler: str) -> Family:
    """The loop's :class:`Family` of the regression recursion on path ``sampler``
    (``samples`` or ``sufficient``)."""
    if sampler == "sufficient":
        return _sufficient_family(spec)
    return _sample_family(spec)


def _rows(key, spec: RegressionSpec, n: int, dtype):
    return jax_normal(key, (n, spec.dim), dtype) * jnp.asarray(spec.scale, dtype)[None, :]


def n_wrong(real_rows, spec: RegressionSpec):
    """Rows of a batch of ``real_rows`` real labels that the wrong model w₂ labels (the last
    ones, so that with a fixed design they are the same rows every generation)."""
    return jnp.round(real_rows * spec.wrong_fraction).astype(jnp.int32)


def _sample_family(spec: RegressionSpec) -> Family:
    d, rows, policy = spec.dim, spec.max_size, spec.policy
    fixed = spec.design == "fixed"

    def labelled(key, x, w, wrong_from=None):
        """[x | xᵀw + σε]; rows from index ``wrong_from`` on are labelled by w₂ instead."""
        eps = jax.random.normal(key, (x.shape[0],), x.dtype)
        mean = x @ w
        if wrong_from is not None and spec.wrong_fraction > 0:
            wrong = x @ jnp.asarray(spec.w_wrong, x.dtype)
            mean = jnp.where(jnp.arange(x.shape[0]) >= wrong_from, wrong, mean)
        return jnp.concatenate([x, (mean + spec.noise * eps)[:, None]], axis=1)

    def stats(buffer: PointBuffer):
        x, y, wt = buffer.x[:, :d], buffer.x[:, d], buffer.w.astype(buffer.x.dtype)
        xw = x * wt[:, None]
        return xw.T @ x, xw.T @ y, jnp.sum(wt * y * y), jnp.sum(wt)

    def init(key, params, gen: GenInput):
        k_x, k_e = jax.random.split(key)
        dtype = jnp.zeros(()).dtype
        x = _rows(k_x, spec, rows, dtype)
        w_star = jnp.asarray(spec.w_star, dtype)
        weights = (jnp.arange(rows) < gen.size).astype(dtype)
        first_wrong = gen.size - n_wrong(gen.size, spec)
        points = labelled(k_e, x, w_star, first_wrong)
        data = initial_buffer(points, weights, policy, rows, spec.pool_capacity)
        design = x if fixed else jnp.zeros((0, d), dtype)
        return SampleState(data, design), _info(spec, w_star, *stats(data))

    def step(key, state: SampleState, params, gen: GenInput):
        k_x, k_e, k_prev, k_orig, k_sub = jax.random.split(key, 5)
        gram, xy, yy, n = stats(state.data)
        w_hat = _solve(gram, xy, spec.ridge)
        info = _info(spec, w_hat, gram, xy, yy, n)
        dtype = w_hat.dtype
        w_star = jnp.asarray(spec.w_star, dtype)
        n_model, n_prev, n_orig = split_batch(gen.size, policy)
        if fixed:
            x = state.design
            first_wrong = gen.size - n_wrong(n_orig, spec)

            def draw_original(k, m):
                # Real labels on the design's own rows: row j of the batch is row j of X.
                real = labelled(k, x, w_star, first_wrong)
                return jnp.roll(real, -(n_model + n_prev), axis=0)[:m]
        else:
            x = _rows(k_x, spec, rows, dtype)
            first_wrong = n_orig - n_wrong(n_orig, spec)

            def draw_original(k, m):
                k1, k2 = jax.random.split(k)
                return labelled(k2, _rows(k1, spec, m, dtype), w_star, first_wrong)

        points = labelled(k_e, x, w_hat)
        batch, bw = new_batch(k_prev, k_orig, points, draw_original, state.data, gen.size, policy)
        data = next_buffer(k_sub, state.data, batch, bw, gen.size, policy)
        return state._replace(data=data), info

    return Family(init, step)


def _chi2(key, dof, dtype):
    """χ²_dof (dof > 0) through the project's one Gamma sampler."""
    return 2.0 * jnp.exp(log_gamma(key, jnp.asarray(dof, dtype)[None] / 2)[0])


def _sufficient_family(spec: RegressionSpec) -> Family:
    if spec.design == "fixed":
        return _fixed_sufficient_family(spec)
    d = spec.dim
    accumulate = spec.policy.mode == "accumulate"

    def batch_stats(key, w, factor, size):
        """(Gram, Xᵀy, Σy²) of ``size`` rows with Gram F Fᵀ labelled by ``w`` plus noise."""
        k_z, k_c = jax.random.split(key)
        z = jax.random.normal(k_z, (d,), w.dtype)
        gram = factor @ factor.T
        fz = spec.noise * (factor @ z)
        xy = gram @ w + fz
        resid = _chi2(k_c, size - d, w.dtype)
        yy = w @ gram @ w + 2.0 * w @ fz + spec.noise**2 * (z @ z + resid)
        return gram, xy, yy

    def draw_factor(key, size, dtype):
        """F = Σ^{1/2} A with A the Bartlett factor: F Fᵀ ~ Wishart(size, Σ)."""
        lower, log_diag = bartlett(key, size, d)
        a = lower.astype(dtype) + jnp.diag(jnp.exp(log_diag).astype(dtype))
        return jnp.asarray(spec.scale, dtype)[:, None] * a

    def init(key, params, gen: GenInput):
        k_x, k_b = jax.random.split(key)
        dtype = jnp.zeros(()).dtype
        w_star = jnp.asarray(spec.w_star, dtype)
        gram, xy, yy = batch_stats(k_b, w_star, draw_factor(k_x, gen.size, dtype), gen.size)
        rows = gen.size.astype(dtype)
        return StatState(gram, xy, yy, rows), _info(spec, w_star, gram, xy, yy, rows)

    def step(key, state: StatState, params, gen: GenInput):
        k_x, k_b = jax.random.split(key)
        w_hat = _solve(state.gram, state.xy, spec.ridge)
        info = _info(spec, w_hat, *state)
        factor = draw_factor(k_x, gen.size, w_hat.dtype)
        new = StatState(*batch_stats(k_b, w_hat, factor, gen.size), gen.size.astype(w_hat.dtype))
        if accumulate:
            new = jax.tree.map(jnp.add, state, new)
        return new, info

    return Family(init, step)


def _fixed_sufficient_family(spec: RegressionSpec) -> Family:
    """Fixed design in its eigenbasis: with v = Uᵀw, S w = U(s ⊙ v), a draw of Xᵀε is
    σ U(√s ⊙ z) (law N(0, σ²S)) and its projection ‖P ε‖² = σ²‖z‖²."""
    d, m = spec.dim, spec.max_size
    accumulate = spec.policy.mode == "accumulate"

    def batch_stats(key, w, basis, spectrum, size):
        k_z, k_c = jax.random.split(key)
        z = jax.random.normal(k_z, (d,), w.dtype)
        v = basis.T @ w
        root = jnp.sqrt(spectrum)
        xy = basis @ (spectrum * v + spec.noise * root * z)
        resid = _chi2(k_c, size - d, w.dtype)
        yy = spectrum @ (v * v) + 2.0 * spec.noise * (root * v) @ z
        return xy, yy + spec.noise**2 * (z @ z + resid)

    def stats_info(w_hat, state: FixedStatState):
        k = state.rows / m  # copies of the design in the training set
        v = state.basis.T @ w_hat
        diff = w_hat - jnp.asarray(spec.w_star, w_hat.dtype)
        scale = jnp.asarray(spec.scale, w_hat.dtype)
        rss = state.yy - 2.0 * w_hat @ state.xy + k * state.spectrum @ (v * v)
        return RegressionInfo(
            excess_risk=jnp.sum((scale * diff) ** 2),
            param_error=jnp.sum(diff**2),
            train_loss=rss / state.rows,
        )

    def init(key, params, gen: GenInput):
        k_x, k_b = jax.random.split(key)
        dtype = jnp.zeros(()).dtype
        w_star = jnp.asarray(spec.w_star, dtype)
        x = _rows(k_x, spec, m, dtype)
        spectrum, basis = linalg.gram_eigh(x)
        spectrum = jnp.maximum(spectrum, 0.0)
        xy, yy = batch_stats(k_b, w_star, basis, spectrum, gen.size)
        state = FixedStatState(xy, yy, gen.size.astype(dtype), basis, spectrum)
        return state, stats_info(w_star, state)

    def step(key, state: FixedStatState, params, gen: GenInput):
        k = state.rows / m
        w_hat = state.basis @ ((state.basis.T @ state.xy) / (k * state.spectrum + spec.ridge))
        info = stats_info(w_hat, state)
        xy, yy = batch_stats(key, w_hat, state.basis, state.spectrum, gen.size)
        rows = gen.size.astype(w_hat.dtype)
        if accumulate:
            xy, yy, rows = state.xy + xy, state.yy + yy, state.rows + rows
        return state._replace(xy=xy, yy=yy, rows=rows), info

    return Family(init, step)
