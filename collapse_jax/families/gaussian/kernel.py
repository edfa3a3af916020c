"""The Gaussian fit-and-resample process (Theorem 3.1 of Shumailov et al. 2024) for ONE chain.

Generation 0 is the original distribution D0 (any of :data:`D0_FAMILIES` or an array of data);
generation 1 is the Gaussian fitted to M_0 real samples of D0; generation n + 1 is fitted to a
batch of M_n points made by the data policy from generation n's samples, the previous training
data and fresh D0 samples. The shared runner :func:`collapse_jax.core.loop.run_generations`
vmaps these kernels over chains and scans over generations.

Representation. The covariance is carried as a Cholesky factor *in log space*:
Σ = L Lᵀ with L = N diag(exp ℓ), N lower triangular with unit-norm columns and ℓ the log column
scales. Under the replace policy Σ shrinks like exp(−n/(M−1)) and its eigenvalues spread
apart at different exponential rates (one per Bartlett diagonal entry), so neither Σ nor L can
be stored directly for thousands of generations; N and ℓ stay representable forever, and
tr Σ = Σ_j exp(2ℓ_j), log det Σ = 2 Σ_j (ℓ_j + log N_jj) are computed in log space.

Samplers (exact, equal in distribution):

* ``samples`` — draw the M points (as standard normals z_j, x_j = μ + L z_j) and fit them. The
  sample mean and scatter are computed in the whitened coordinates z (algebraically identical
  to fitting the x_j, and immune to underflow): x̄ = μ + L z̄, S_x = L S_z Lᵀ, chol S_x = L chol S_z.
* ``sufficient`` — draw the fitted statistics directly: x̄ ~ N(μ, Σ/M) and the scatter
  (M−1)·S ~ Wishart(M−1, Σ) through the Bartlett decomposition S = L A Aᵀ Lᵀ, A lower
  triangular with A_jj² ~ χ²_{M−1−j} and standard normal entries below the diagonal. The cost
  does not depend on M.

Policies. ``replace``, fresh data (gamma) and ``accumulate`` combine the statistics of the parts
of a batch exactly (pooled mean and scatter, the parallel-variance formula), so the
``sufficient`` sampler stays exact; fresh D0 parts are real D0 samples (D0 need not be
Gaussian). Reusing previous training data (``mix`` with beta > 0) and ``accumulate-subsample``
need the actual points and therefore the ``samples`` sampler, which keeps the training set
(or the whole pool) as a buffer; the ``sufficient`` sampler rejects them with a ConfigError.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from collapse_jax.core import operators
from collapse_jax.core.errors import ConfigError, check_choice
from collapse_jax.core.loop import Family, GenInput
from collapse_jax.core.operators import Operators
from collapse_jax.core.policies import (
    PointBuffer,
    Policy,
    initial_buffer,
    new_batch,
    next_buffer,
    split_batch,
)
from collapse_jax.core.statistics import chain_stats
from collapse_jax.families.gaussian.d0 import D0
from collapse_jax.families.gaussian.metrics import (
    GaussianMetrics,
    MetricSpec,
    gaussian_metrics,
    metric_spec,
    zero_metrics,
)
from collapse_jax.families.gaussian.theory import ESTIMATORS
from collapse_jax.numerics import linalg
from collapse_jax.numerics.random import jax_normal
from collapse_jax.numerics.wishart import sufficient_draws

SAMPLERS = ("samples", "sufficient")
#: The data operators the Gaussian family takes: curation with a linear or quadratic reward
#: (K → ∞: the tilted Gaussian, any sampler; finite K: the samples sampler), verification with a
#: region (samples sampler) and weighted fresh real data.
OPERATORS = ("curate", "verify", "real_weight")
#: trace thresholds (relative to tr Σ_0) whose chain fractions are recorded; 1e-6 is "collapsed"
THRESHOLDS = (1e-3, 1e-6, 1e-12)
# exp(ℓ_i − ℓ_j) is clipped at exp(60): reached only if a later Cholesky column were e^60 times
# larger than an earlier one, which the Bartlett drift (earlier columns grow faster) rules out.
_MAX_LOG_RATIO = 60.0


# --------------------------------------------------------------------------------------------
# State and info


class PooledStats(NamedTuple):
    """Count, mean and scatter Σ (x − x̄)(x − x̄)ᵀ of a set of points (absolute coordinates)."""

    count: Float[Array, ""]
    mean: Float[Array, " d"]
    scatter: Float[Array, "d d"]


class GaussianState(NamedTuple):
    """One chain after generation n: the fitted N(μ_n, Σ_n), Σ_n = N diag(e^{2ℓ}) Nᵀ, and what
    generation n + 1 is fitted to. That data is held lazily: ``size`` = M_n samples of model n
    (plus the policy's fresh and reused points) are drawn by the next ``step`` with its own key,
    so the pure-replace recursion never materialises them (see :mod:`collapse_jax.core.loop`)."""

    mean: Float[Array, " d"]  # μ_n
    chol: Float[Array, "d d"]  # N: lower triangular, unit-norm columns
    log_scale: Float[Array, " d"]  # ℓ: log column scales of the Cholesky factor of Σ_n
    collapsed: Bool[Array, ""]  # a fit failed numerically (non-finite or singular); state frozen
    pool: PooledStats | None  # accumulate: statistics of everything ever generated
    data: PointBuffer | None  # samples sampler with beta > 0 / accumulate-subsample: the points
    first: PooledStats  # statistics of the M_0 real D0 samples that generation 1 is fitted to
    size: Int[Array, ""]  # M_n: the size of the batch that fits generation n + 1


GaussianInfo = GaussianMetrics  # what one generation reports (zeros when not recorded)


class GaussianModel(NamedTuple):
    """A fitted Gaussian in the log-space Cholesky representation."""

    mean: Float[Array, " d"]
    chol: Float[Array, "d d"]
    log_scale: Float[Array, " d"]


# --------------------------------------------------------------------------------------------
# Log-space Cholesky algebra


def model_from_chol(mean, chol) -> tuple[GaussianModel, Bool[Array, ""]]:
    """Normalise a Cholesky factor L into (N, ℓ); flags a non-finite or singular factor."""
    norms = jnp.sqrt(jnp.sum(chol * chol, axis=0))
    ok = jnp.all(jnp.isfinite(chol)) & jnp.all(norms > 0) & jnp.all(jnp.isfinite(mean))
    safe = jnp.where(norms > 0, norms, 1.0)
    return GaussianModel(mean, chol / safe[None, :], jnp.log(safe)), ~ok


def absolute_chol(model: GaussianModel) -> Float[Array, "d d"]:
    """L = N diag(exp ℓ) (underflows to zero columns for a collapsed model, never NaN)."""
    return model.chol * jnp.exp(model.log_scale)[None, :]


def update_chol(model: GaussianModel, lower, log_diag, log_div) -> tuple[Any, Any]:
    """(N, ℓ) of L·A / √D for the Bartlett-type factor A = lower + diag(exp log_diag).

    L A = N diag(e^ℓ) A = (N B) diag(e^ℓ) with B_ij = e^{ℓ_i − ℓ_j} A_ij (i >= j), whose
    entries stay O(1) because earlier columns dominate; the new column norms go into ℓ.
    """
    d = model.log_scale.shape[0]
    if d == 1:
        return model.chol, model.log_scale + log_diag - 0.5 * log_div
    ell = model.log_scale
    rel = jnp.minimum(ell[:, None] - ell[None, :], _MAX_LOG_RATIO)
    b = jnp.exp(rel) * lower + jnp.diag(jnp.exp(log_diag))
    nb = model.chol @ b
    norms = jnp.sqrt(jnp.sum(nb * nb, axis=0))
    safe = jnp.where(norms > 0, norms, 1.0)
    new_ell = ell + jnp.log(norms) - 0.5 * log_div
    return nb / safe[None, :], new_ell


def _lower_stats_from_scatter(scatter):
    """Cholesky of a scatter matrix as (strict lower, log diagonal)."""
    k = linalg.cholesky(scatter)
    return jnp.tril(k, -1), jnp.log(jnp.diagonal(k))


def divisor(n, estimator: str):
    return n - 1.0 if estimator == "unbiased" else n * 1.0


def merge(a: PooledStats, b: PooledStats) -> PooledStats:
    """Pool two sets' statistics exactly (parallel-variance formula); empty sets are fine."""
    n = a.count + b.count
    safe = jnp.where(n > 0, n, 1.0)
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / safe)
    scatter = a.scatter + b.scatter + jnp.outer(delta, delta) * (a.count * b.count / safe)
    return PooledStats(n, mean, scatter)


def masked_stats(x: Float[Array, "n d"], mask: Bool[Array, " n"]) -> PooledStats:
    """Statistics of the rows of ``x`` where ``mask`` holds."""
    w = mask.astype(x.dtype)
    n = w.sum()
    mean = (w[:, None] * x).sum(0) / jnp.maximum(n, 1.0)
    c = (x - mean[None, :]) * w[:, None]
    return PooledStats(n, mean, c.T @ c)


def d0_metric_spec(d0: D0) -> MetricSpec:
    """The metric constants of D0 (κ_0 only in 1-D)."""
    return metric_spec(d0.mean, d0.cov, d0.quantile_kappa() if d0.dim == 1 else 0.0)


# --------------------------------------------------------------------------------------------
# Kernels


def validate_sizes(sizes, dim: int, estimator: str, policy: Policy) -> np.ndarray:
    """Check the schedule against the estimator and dimension; raise naming the bad size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if estimator == "unbiased" and sizes.min() < 2:
        i = int(np.argmin(sizes))
        raise ConfigError(
            f"sample size M_{i} = {sizes[i]} < 2: the unbiased estimator divides by M − 1"
        )
    need = sizes[:1] if policy.accumulates else sizes
    if need.min() < dim + 1:
        i = int(np.argmin(need))
        raise ConfigError(
            f"sample size M_{i} = {need[i]} < dim + 1 = {dim + 1}: the fitted covariance "
            "would be singular"
        )
    return sizes


def make_family(
    d0: D0,
    sizes,
    *,
    sampler: str = "sufficient",
    estimator: str = "unbiased",
    policy: Policy | None = None,
    ops: Operators = operators.NONE,
) -> Family:
    """The Gaussian family for one chain (:class:`collapse_jax.core.loop.Family`, no params).

    ``sizes`` (M_0 .. M_{G-1}, or M_0 .. M_G) fixes the buffer shapes and is checked against the
    estimator; the runner supplies the same sizes per generation. Generation 1 is fitted to M_0
    real D0 samples drawn in ``init``; metrics are computed on recorded generations only
    (under a ``lax.cond`` on ``gen.record``).

    ``ops`` (:mod:`collapse_jax.core.operators`) act on the model part of every batch: curation
    K → ∞ replaces model n by its reward-tilted Gaussian (:func:`operators.tilt_gaussian`),
    finite-K curation and verification go through the shared point operator (samples sampler),
    and ``real_weight`` w fits generation n + 1 to n = M_n fresh D0 points with weight w and
    m = round(n/k) model points with weight 1 − w: μ = w x̄_real + (1 − w) x̄_model and
    Σ = w S_real + (1 − w) S_model (each part's own estimator). With every operator off the
    kernels are exactly the plain ones.
    """
    policy = policy or Policy()
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("estimator", estimator, ESTIMATORS)
    operators.check_supported("gaussian", ops, OPERATORS)
    d = d0.dim
    if ops.on_points and sampler == "sufficient":
        what = "verify" if ops.verify is not None else f"curate {ops.curate.k:g}"
        raise ConfigError(
            f"the gaussian sufficient sampler cannot take the {what} operator (it needs the "
            "points): use --sampler samples (curate inf works with either sampler)"
        )
    weighted = ops.real_weight > 0
    if weighted and (policy.mode != "replace" or policy.gamma > 0):
        raise ConfigError(
            f"real_weight {ops.real_weight:g} brings its own fresh real data: use policy replace "
            f"without a fresh fraction, not {policy.describe()}"
        )
    synthetic = (
        np.maximum(np.round(np.asarray(sizes) / ops.real_ratio), 1).astype(np.int64)
        if weighted
        else None
    )
    if weighted and estimator == "unbiased" and synthetic.min() < 2:
        raise ConfigError(
            f"real_ratio {ops.real_ratio:g} leaves m = {int(synthetic.min())} < 2 synthetic "
            "points for the unbiased estimator"
        )
    sizes = validate_sizes(sizes, d, estimator, policy)
    n_gen = sizes.shape[0]
    if sampler == "sufficient" and policy.beta > 0:
        raise ConfigError(
            f"policy {policy.describe()} reuses previous training points (beta > 0); the "
            "sufficient sampler keeps only statistics: use --sampler samples"
        )
    if sampler == "sufficient" and policy.mode == "accumulate-subsample":
        raise ConfigError(
            "policy accumulate-subsample subsamples the pooled points; the sufficient sampler "
            "keeps only statistics: use --sampler samples (or --policy accumulate)"
        )
    splits = split_batch(sizes, policy)
    m_first = int(sizes[0])
    max_model = int(np.max(splits.model[1:])) if n_gen > 1 else 0
    if weighted:
        max_model = int(synthetic.max())
    max_orig = int(np.max(splits.original[1:])) if n_gen > 1 else 0
    keep_points = sampler == "samples" and (
        policy.beta > 0 or policy.mode == "accumulate-subsample"
    )
    batch_rows = int(sizes.max())
    pool_capacity = int(sizes.sum()) + batch_rows if policy.accumulates else 0
    spec = d0_metric_spec(d0)
    boost = int(sizes.min()) - d < 2  # some χ² has < 2 degrees of freedom (Gamma shape < 1)
    simple = (
        not policy.accumulates and policy.beta == 0 and max_orig == 0 and not ops.active()
    )  # the pure replace recursion: stays in the log-space representation
    tilted = ops.curate is not None and not ops.on_points and ops.curate.k == np.inf

    def dtype():
        return jnp.zeros(()).dtype

    def fit(stats: PooledStats, state: GaussianState) -> GaussianState:
        """Fit N(mean, scatter / D(count)); a failed factorisation freezes the chain."""
        return fit_cov(stats.mean, stats.scatter / divisor(stats.count, estimator), state)

    def fit_cov(mean, cov, state: GaussianState) -> GaussianState:
        """Take N(mean, cov) as the new model; a failed factorisation freezes the chain."""
        chol = linalg.cholesky(cov) if d > 1 else jnp.sqrt(cov)
        model, bad = model_from_chol(mean, chol)
        bad = bad | state.collapsed
        keep = lambda new, old: jnp.where(bad, old, new)  # noqa: E731
        return state._replace(
            mean=keep(model.mean, state.mean),
            chol=keep(model.chol, state.chol),
            log_scale=keep(model.log_scale, state.log_scale),
            collapsed=bad,
        )

    def init(key, params, gen: GenInput):
        """Generation 0 (= D0) and the M_0 real D0 samples that generation 1 will be fitted to
        (drawn with the key of generation 0)."""
        dt = dtype()
        chol0 = np.linalg.cholesky(d0.cov)
        model, _ = model_from_chol(jnp.asarray(d0.mean, dt), jnp.asarray(chol0, dt))
        pts = d0.sample(key, m_first)
        first = masked_stats(pts, jnp.ones(m_first, bool))
        pool = first if policy.mode == "accumulate" else None
        data = None
        if keep_points:
            x0 = jnp.zeros((batch_rows, d), dt).at[:m_first].set(pts)
            w0 = (jnp.arange(batch_rows) < m_first).astype(dt)
            data = initial_buffer(x0, w0, policy, batch_rows, pool_capacity)
        state = GaussianState(
            model.mean,
            model.chol,
            model.log_scale,
            jnp.zeros((), bool),
            pool,
            data,
            first,
            jnp.asarray(gen.size, jnp.int32),
        )
        mse = jnp.zeros((), dt)
        tr = jnp.asarray(spec.trace, dt)
        info = GaussianInfo(
            mse,
            mse,
            tr,
            jnp.log(tr),
            jnp.asarray(np.linalg.slogdet(d0.cov)[1], dt),
            jnp.sqrt(tr),
            jnp.zeros((), bool),
        )
        return state, info

    def sampled_model(state: GaussianState):
        """(μ, L) of the law the model part is drawn from: model n, or its reward tilt."""
        lchol = absolute_chol(GaussianModel(state.mean, state.chol, state.log_scale))
        if tilted:
            return operators.tilt_gaussian(state.mean, lchol, ops.curate.reward)
        return state.mean, lchol

    def model_points(key, mean, lchol, rows):
        """``rows`` samples of N(mean, L Lᵀ) and their weights (the point operators' drops)."""
        dt = mean.dtype

        def draw(k, m):
            return mean[None, :] + jax_normal(k, (m, d), dt) @ lchol.T

        if ops.on_points:
            return operators.point_samples(key, draw, rows, ops)
        return draw(key, rows), None

    def model_part(key, state: GaussianState, n_model) -> PooledStats:
        """Statistics of n_model samples of the current model (after the operators)."""
        mu, lchol = sampled_model(state)
        dt = state.mean.dtype
        n = n_model.astype(dt)
        if sampler == "sufficient":
            z, lower, log_diag = sufficient_draws(key, n - 1, d, dt, boost=True)
            mean = mu + lchol @ z / jnp.sqrt(jnp.maximum(n, 1.0))
            a = lower + jnp.diag(jnp.exp(log_diag))
            la = lchol @ a
            return PooledStats(n, mean, la @ la.T)
        pts, w = model_points(key, mu, lchol, max_model)
        mask = jnp.arange(max_model) < n_model
        return masked_stats(pts, mask if w is None else mask & (w > 0))

    def replace_step(key, state: GaussianState) -> GaussianState:
        """Pure replace: fit M model samples, all in the log-space representation."""
        dt = state.mean.dtype
        model = GaussianModel(state.mean, state.chol, state.log_scale)
        m = state.size.astype(dt)
        if sampler == "sufficient":
            z, lower, log_diag = sufficient_draws(key, m - 1, d, dt, boost=boost)
            if d == 1:  # scalar fast path: μ += σ z / √M, log σ += ½ log(χ²_{M−1} / D)
                bad = ~jnp.isfinite(log_diag[0]) | state.collapsed
                ell = state.log_scale + log_diag - 0.5 * jnp.log(divisor(m, estimator))
                return state._replace(
                    mean=state.mean + jnp.exp(state.log_scale) * z / jnp.sqrt(m),
                    log_scale=jnp.where(bad, state.log_scale, ell),
                    collapsed=bad,
                )
            shift = absolute_chol(model) @ z / jnp.sqrt(m)
        else:
            zs = jax_normal(key, (max_model, d), dt)
            mask = jnp.arange(max_model) < state.size
            st = masked_stats(zs, mask)  # whitened coordinates
            shift = absolute_chol(model) @ st.mean
            lower, log_diag = _lower_stats_from_scatter(st.scatter)
        chol, ell = update_chol(model, lower, log_diag, jnp.log(divisor(m, estimator)))
        bad = ~(jnp.all(jnp.isfinite(ell)) & jnp.all(jnp.isfinite(chol))) | state.collapsed
        keep = lambda new, old: jnp.where(bad, old, new)  # noqa: E731
        return state._replace(
            mean=keep(state.mean + shift, state.mean),
            chol=keep(chol, state.chol),
            log_scale=keep(ell, state.log_scale),
            collapsed=bad,
        )

    def general_step(key, state: GaussianState) -> GaussianState:
        """Mixed batches (fresh D0 points, reused points) and accumulation, in absolute scale."""
        k_model, k_orig, k_prev, k_sub = jax.random.split(key, 4)
        if weighted:
            return weighted_step(k_model, k_orig, state)
        if keep_points:  # the shared point-buffer policies (reused points need the points)
            mu, lchol = sampled_model(state)
            model_pts, model_w = model_points(k_model, mu, lchol, batch_rows)
            batch, bw = new_batch(
                k_prev, k_orig, model_pts, d0.sample, state.data, state.size, policy, model_w
            )
            data = next_buffer(k_sub, state.data, batch, bw, state.size, policy)
            return fit(masked_stats(data.x, data.w > 0), state._replace(data=data))
        n_model, _, n_orig = split_batch(state.size, policy)
        stats = model_part(k_model, state, n_model)
        if max_orig > 0:
            o_pts = d0.sample(k_orig, max_orig)
            stats = merge(stats, masked_stats(o_pts, jnp.arange(max_orig) < n_orig))
        if policy.mode == "accumulate":
            pool = merge(state.pool, stats)
            return fit(pool, state._replace(pool=pool))
        return fit(stats, state)

    def weighted_step(k_model, k_real, state: GaussianState) -> GaussianState:
        """Weighted real data: n = M_n fresh D0 points with weight w, m = round(n/k) model
        points with weight 1 − w (He, Xu & Cheng's weighted estimator)."""
        n = state.size
        m = jnp.maximum(jnp.round(n / ops.real_ratio), 1).astype(n.dtype)
        synth = model_part(k_model, state, m)
        real = masked_stats(d0.sample(k_real, batch_rows), jnp.arange(batch_rows) < n)
        w = ops.real_weight
        mean = w * real.mean + (1 - w) * synth.mean
        cov = w * real.scatter / divisor(real.count, estimator) + (1 - w) * synth.scatter / (
            divisor(synth.count, estimator)
        )
        return fit_cov(mean, cov, state)

    later_step = replace_step if simple else general_step

    def step(
        key, state: GaussianState, params, gen: GenInput
    ) -> tuple[GaussianState, GaussianInfo]:
        # Generation 1 is fitted to the D0 samples drawn in init. In 1-D a select (not a cond)
        # between that cheap fit and the ordinary step keeps the scan body one fused
        # computation; for d > 1 the fit factors a d × d matrix, so it runs under a cond on the
        # (unbatched) generation input and costs nothing in later generations.
        first = gen.generation == 1
        if d == 1:
            later = later_step(key, state)
            new = jax.tree.map(lambda a, b: jnp.where(first, a, b), fit(state.first, state), later)
        else:
            new = jax.lax.cond(
                first, lambda: fit(state.first, state), lambda: later_step(key, state)
            )
        new = new._replace(size=jnp.asarray(gen.size, jnp.int32))
        model = GaussianModel(new.mean, new.chol, new.log_scale)

        def metrics():
            return gaussian_metrics(model.mean, model.chol, model.log_scale, spec, new.collapsed)

        # Only on recorded generations (for d > 1 an SVD for the Bures cross term; in 1-D a few
        # flops, but skipping them on the other generations made the 10,000 × 5,000 run about
        # 0.3 s faster, five alternating pairs, with identical records).
        info = jax.lax.cond(gen.record, metrics, lambda: zero_metrics(new.mean.dtype))
        return new, info

    return Family(init, step)


def reduce_info(info: GaussianInfo, log_trace0: float, thresholds=THRESHOLDS) -> dict:
    """Mean/stderr over chains of each metric, plus chain fractions below trace thresholds."""
    out = {}
    for name in ("w2_sq", "mean_sq_error", "trace_cov", "log_trace_cov", "log_det_cov", "std"):
        s = chain_stats(getattr(info, name))
        out[name] = {
            "mean": s.mean,
            "stderr": s.stderr,
            "finite": s.finite_fraction,
            "quantiles": s.quantiles,
        }
    thr = jnp.log(jnp.asarray(thresholds, info.log_trace_cov.dtype)) + log_trace0
    below = info.log_trace_cov[:, None] < thr[None, :]
    out["below_fraction"] = below.mean(0)
    out["numerically_collapsed"] = info.collapsed.mean()
    return out
