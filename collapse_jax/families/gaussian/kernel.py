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

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from collapse_jax.core.errors import ConfigError, check_choice, check_float, check_int
from collapse_jax.core.loop import chain_stats, record_flags
from collapse_jax.core.policies import Policy, split_batch
from collapse_jax.families.gaussian.metrics import (
    GaussianMetrics,
    MetricSpec,
    gaussian_metrics,
    kappa_empirical,
    kappa_symmetric,
    metric_spec,
    zero_metrics,
)
from collapse_jax.families.gaussian.theory import ESTIMATORS
from collapse_jax.numerics import linalg

D0_FAMILIES = ("normal", "student-t", "mixture", "uniform")
SAMPLERS = ("samples", "sufficient")
#: trace thresholds (relative to tr Σ_0) whose chain fractions are recorded; 1e-6 is "collapsed"
THRESHOLDS = (1e-3, 1e-6, 1e-12)
#: mixture D0: each coordinate is ½ N(−a s, (b s)²) + ½ N(a s, (b s)²) with a² + b² = 1
MIXTURE_OFFSET, MIXTURE_SD = 0.8, 0.6
# exp(ℓ_i − ℓ_j) is clipped at exp(60): reached only if a later Cholesky column were e^60 times
# larger than an earlier one, which the Bartlett drift (earlier columns grow faster) rules out.
_MAX_LOG_RATIO = 60.0


# --------------------------------------------------------------------------------------------
# The original distribution D0


@dataclasses.dataclass(frozen=True, eq=False)
class D0:
    """The original distribution: a family with exact moments, or the empirical law of data.

    Non-Gaussian families are products of identical 1-D laws with mean 0 and standard
    deviation ``scale`` per coordinate, shifted by ``mean``: ``student-t`` (``df`` > 2 degrees
    of freedom, rescaled to unit variance), ``mixture`` (½N(−0.8s, 0.36s²) + ½N(0.8s, 0.36s²)),
    ``uniform`` (on ±√3 s). ``normal`` has any mean and covariance. Data D0 is the empirical
    distribution of the rows of ``data`` (fresh samples are drawn with replacement).
    """

    family: str  # normal | student-t | mixture | uniform | data
    mean: np.ndarray  # (d,) exact mean of D0
    cov: np.ndarray  # (d, d) exact covariance of D0
    scale: float = 1.0  # per-coordinate standard deviation of the product families
    df: float = 5.0  # Student-t degrees of freedom
    data: np.ndarray | None = None  # (n, d) rows of a data D0
    source: str = ""  # description (file path for data)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def gaussian(self) -> bool:
        return self.family == "normal"

    @property
    def trace(self) -> float:
        return float(np.trace(self.cov))

    def describe(self) -> str:
        if self.family == "data":
            return f"data {self.source} ({self.data.shape[0]} points)"
        if self.family == "student-t":
            return f"student-t (df {self.df:g}, sd {self.scale:g})"
        return f"{self.family} (sd {self.scale:g})" if self.family != "normal" else "normal"

    def sample(self, key: jax.Array, n: int) -> Float[Array, "n d"]:
        """``n`` independent samples of D0 (static ``n``)."""
        d = self.dim
        dtype = jnp.zeros(()).dtype  # float64 under jax_enable_x64
        mean = jnp.asarray(self.mean, dtype)
        if self.family == "normal":
            chol = jnp.asarray(np.linalg.cholesky(self.cov), dtype)
            z = jax.random.normal(key, (n, d), dtype)
            return mean[None, :] + z @ chol.T
        if self.family == "student-t":
            t = jax.random.t(key, self.df, (n, d), dtype)
            return mean[None, :] + self.scale * np.sqrt((self.df - 2) / self.df) * t
        if self.family == "mixture":
            k1, k2 = jax.random.split(key)
            sign = jnp.where(jax.random.bernoulli(k1, 0.5, (n, d)), 1.0, -1.0).astype(dtype)
            z = jax.random.normal(k2, (n, d), dtype)
            return mean[None, :] + self.scale * (MIXTURE_OFFSET * sign + MIXTURE_SD * z)
        if self.family == "uniform":
            u = jax.random.uniform(key, (n, d), dtype, -1.0, 1.0)
            return mean[None, :] + self.scale * np.sqrt(3.0) * u
        data = jnp.asarray(self.data, dtype)
        idx = jax.random.randint(key, (n,), 0, data.shape[0])
        return data[idx]

    def quantile_kappa(self) -> float:
        """κ_0 = ∫_0^1 Φ⁻¹(u) Q_0(u) du for a 1-D D0 (per coordinate for the product families).

        Then W₂²(N(μ, σ²), D0) = (μ − m_0)² + σ² + v_0 − 2σ κ_0 exactly (the quantile formula
        W₂² = ∫ (μ + σΦ⁻¹(u) − Q_0(u))² du, expanded), so the 1-D distance to any D0 costs one
        constant computed once here: closed forms where they exist, quadrature otherwise.
        """
        from scipy import stats

        s = self.scale
        if self.family == "normal":
            return float(np.sqrt(self.cov[0, 0]))
        if self.family == "uniform":  # Q(u) = √3 s (2u − 1); ∫ u Φ⁻¹(u) du = 1/(2√π)
            return float(np.sqrt(3.0) * s / np.sqrt(np.pi))
        if self.family == "data":
            return kappa_empirical(self.data[:, 0])
        if self.family == "student-t":
            law = stats.t(self.df, scale=s * np.sqrt((self.df - 2) / self.df))
            return kappa_symmetric(law.pdf, law.sf)
        a, b = MIXTURE_OFFSET * s, MIXTURE_SD * s
        return kappa_symmetric(
            lambda x: 0.5 * (stats.norm.pdf(x, -a, b) + stats.norm.pdf(x, a, b)),
            lambda x: 0.5 * (stats.norm.sf(x, -a, b) + stats.norm.sf(x, a, b)),
        )


def make_d0(
    spec: str,
    dim: int = 1,
    scale: float = 1.0,
    *,
    mean=None,
    cov=None,
    df: float = 5.0,
) -> D0:
    """Build D0 from a family name or a ``.npy`` path (rows = points; 1-D arrays are one column).

    Raises ConfigError for an unknown family, a non-positive-definite covariance, a dimension
    mismatch between the data and ``dim``, or NaN/inf in loaded data.
    """
    dim = check_int("dim", dim, 1)
    scale = check_float("d0 scale", scale, 0.0, open_min=True)
    spec = str(spec).strip()
    if spec.endswith(".npy"):
        path = Path(spec)
        if not path.exists():
            raise ConfigError(f"D0 data file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ConfigError(f"cannot read D0 data {path}: {e}") from None
        data = np.asarray(data, dtype=np.float64)
        if data.ndim == 1:
            data = data[:, None]
        if data.ndim != 2:
            raise ConfigError(f"D0 data {path} must be 1-D or 2-D (points × dim), got {data.shape}")
        if data.shape[1] != dim:
            raise ConfigError(f"D0 data {path} has dimension {data.shape[1]} but --dim is {dim}")
        if not np.all(np.isfinite(data)):
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(data))[0])
            raise ConfigError(f"D0 data {path} has a non-finite value {data[idx]} at index {idx}")
        if data.shape[0] < 2:
            raise ConfigError(f"D0 data {path} needs at least 2 points, got {data.shape[0]}")
        mu = data.mean(0)
        c = np.atleast_2d(np.cov(data, rowvar=False, ddof=0))
        _check_pd("covariance of the D0 data", c)
        return D0("data", mu, c, scale, df, data, str(path))
    check_choice("d0", spec, (*D0_FAMILIES, "PATH.npy"))
    mu = np.zeros(dim) if mean is None or len(mean) == 0 else np.asarray(mean, np.float64)
    if mu.shape != (dim,):
        raise ConfigError(f"d0 mean has shape {mu.shape}, expected ({dim},) for dim {dim}")
    if not np.all(np.isfinite(mu)):
        raise ConfigError(f"d0 mean must be finite, got {mu.tolist()}")
    if spec == "normal":
        if cov is None or len(cov) == 0:
            c = scale**2 * np.eye(dim)
        else:
            c = np.asarray(cov, np.float64)
            if c.ndim == 0 or c.size == 1:
                c = c.reshape(1, 1)
            if c.shape != (dim, dim):
                raise ConfigError(f"d0 covariance has shape {c.shape}, expected ({dim}, {dim})")
        _check_pd("d0 covariance", c)
        return D0("normal", mu, c, scale, df)
    if cov is not None and len(cov) > 0:
        raise ConfigError(f"d0 {spec!r} has covariance scale² I; a covariance applies to normal")
    if spec == "student-t":
        df = check_float("student-t degrees of freedom", df, 2.0, open_min=True)
    return D0(spec, mu, scale**2 * np.eye(dim), scale, df)


def _check_pd(name: str, c: np.ndarray) -> None:
    if not np.all(np.isfinite(c)):
        raise ConfigError(f"{name} has non-finite entries")
    if not np.allclose(c, c.T, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(c).max())):
        raise ConfigError(f"{name} is not symmetric: {c.tolist()}")
    eig = np.linalg.eigvalsh(c)
    if eig.min() <= 1e-12 * max(eig.max(), 0.0) or eig.max() <= 0:
        raise ConfigError(
            f"{name} is not positive definite (smallest eigenvalue {eig.min():.3g}): {c.tolist()}"
        )


# --------------------------------------------------------------------------------------------
# State and info


class PooledStats(NamedTuple):
    """Count, mean and scatter Σ (x − x̄)(x − x̄)ᵀ of a set of points (absolute coordinates)."""

    count: Float[Array, ""]
    mean: Float[Array, " d"]
    scatter: Float[Array, "d d"]


class GaussianState(NamedTuple):
    """One chain after generation n: the fitted N(μ_n, Σ_n), Σ_n = N diag(e^{2ℓ}) Nᵀ."""

    mean: Float[Array, " d"]  # μ_n
    chol: Float[Array, "d d"]  # N: lower triangular, unit-norm columns
    log_scale: Float[Array, " d"]  # ℓ: log column scales of the Cholesky factor of Σ_n
    collapsed: Bool[Array, ""]  # a fit failed numerically (non-finite or singular); state frozen
    pool: PooledStats | None  # accumulate: statistics of everything ever generated
    points: Float[Array, "P d"] | None  # samples sampler with beta > 0 / accumulate-subsample
    n_points: Int[Array, ""] | None  # valid rows of ``points``
    first: PooledStats  # statistics of the M_0 real D0 samples that generation 1 is fitted to
    generation: Int[Array, ""]  # n


GaussianInfo = GaussianMetrics  # what one generation reports (zeros when not recorded)


class GaussianModel(NamedTuple):
    """A fitted Gaussian in the log-space Cholesky representation."""

    mean: Float[Array, " d"]
    chol: Float[Array, "d d"]
    log_scale: Float[Array, " d"]


# --------------------------------------------------------------------------------------------
# Exact random draws


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, r: int):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k0, k1, x0, x1):
    """The Threefry-2x32 block function (20 rounds; Salmon et al. 2011), unrolled.

    The same function as ``jax.random``'s ``threefry2x32_p``, written out so that XLA fuses it
    with the arithmetic that consumes the words: JAX lowers Threefry on CPU as a rolled loop
    (one small kernel per iteration), which dominates the cost of a cheap generation.
    """
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def random_words(key: jax.Array, n: int, stream=0) -> Int[Array, " n"]:
    """``n`` random uint32 words: Threefry-2x32 keyed by ``key`` at counters (j, stream).

    Different ``stream`` values give independent words (distinct counter blocks under the same
    key); the step uses stream 0 for its draws and stream i + 1 for the i-th rejection round.
    """
    kd = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    k0, k1 = kd[0], kd[1]
    for j in range(2, kd.shape[0]):  # other key implementations: fold extra words in
        k0, k1 = (k1, k0 ^ kd[j]) if j % 2 else (k0 ^ kd[j], k1)
    blocks = (n + 1) // 2
    x0 = jnp.arange(blocks, dtype=jnp.uint32)
    x1 = jnp.full((blocks,), stream, jnp.uint32)
    y0, y1 = threefry2x32(k0, k1, x0, x1)
    return jnp.concatenate([y0, y1])[:n]


def uniforms(key: jax.Array, n: int, dtype, stream=0) -> Float[Array, " n"]:
    """``n`` uniforms on the open interval (0, 1) from :func:`random_words`.

    Uniforms take the top mantissa bits of each word (23 for float32 from one 32-bit word, 52
    for float64 from two) plus half a unit in the last place, so 0 and 1 never occur.
    """
    if jnp.dtype(dtype) == jnp.float64 and jax.config.jax_enable_x64:
        w = random_words(key, 2 * n, stream).astype(jnp.uint64)
        bits = (w[:n] << np.uint64(32)) | w[n:]
        mant = (bits >> np.uint64(12)) | np.uint64(0x3FF0000000000000)
        return jax.lax.bitcast_convert_type(mant, jnp.float64) - (1.0 - 2.0**-53)
    w = random_words(key, n, stream)
    mant = (w >> np.uint32(9)) | np.uint32(0x3F800000)
    u = jax.lax.bitcast_convert_type(mant, jnp.float32) - (1.0 - 2.0**-24)
    return u.astype(dtype)


def normal_from_uniform(u: Float[Array, "..."]) -> Float[Array, "..."]:
    """Φ⁻¹(u) = √2 erf⁻¹(2u − 1) (inverse-CDF transform, as ``jax.random.normal`` does)."""
    return jnp.sqrt(jnp.asarray(2.0, u.dtype)) * jax.lax.erf_inv(2.0 * u - 1.0)


def _mt_propose(u_norm, u_acc, d, c):
    """One Marsaglia–Tsang proposal: (accepted?, log v)."""
    x = normal_from_uniform(u_norm)
    v = 1.0 + c * x
    v = v * v * v
    pos = v > 0
    lv = jnp.log(jnp.where(pos, v, 1.0))
    x2 = x * x
    ok = pos & ((u_acc < 1.0 - 0.0331 * x2 * x2) | (jnp.log(u_acc) < 0.5 * x2 + d * (1.0 - v + lv)))
    return ok, lv


def log_gamma_from_uniforms(
    u: Float[Array, "k n"], key: jax.Array, a: Float[Array, " n"], *, boost: bool = True
) -> Float[Array, " n"]:
    """log of Gamma(a, 1) draws (a > 0), exact, given the first proposal's uniforms.

    Marsaglia & Tsang (2000) rejection sampling: with d = a − 1/3, c = 1/√(9d), x ~ N(0, 1),
    v = (1 + c x)³ and u ~ U(0, 1), accept d·v when v > 0 and log u < x²/2 + d − d v + d log v
    (the squeeze u < 1 − 0.0331 x⁴ skips the logarithms). ``u[0]``, ``u[1]`` drive the first
    proposal (drawn from ``uniforms(key, ·)``, stream 0); rejected lanes (rate ≈ 6e-5 at a = 500,
    ≈ 5% at a = 1) draw again in a loop from streams 1, 2, ... of the same key. Shapes a < 1 use Gamma(a) = Gamma(a + 1) · U^{1/a} with ``u[2]`` (``boost``, static;
    leave it on unless every a >= 1); the result is a logarithm so tiny shapes do not underflow.

    Written here rather than calling ``jax.random.gamma``/``loggamma``, which split keys inside
    their rejection loop: drawing the first proposal together with the generation's other
    words is several times faster under vmap, and the distribution is exactly the same.
    """
    a = jnp.asarray(a)
    dtype = a.dtype
    aa = jnp.where(a < 1, a + 1, a) if boost else a
    d = aa - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    ok, lv = _mt_propose(u[0], u[1], d, c)

    def cond(carry):
        return ~jnp.all(carry[0])

    def body(carry):
        ok, lv, i = carry
        w = uniforms(key, 2 * a.shape[0], dtype, stream=(i + 1).astype(jnp.uint32))
        ok2, lv2 = _mt_propose(w[: a.shape[0]], w[a.shape[0] :], d, c)
        return ok | ok2, jnp.where(ok, lv, lv2), i + 1

    ok, lv, _ = jax.lax.while_loop(cond, body, (ok, lv, jnp.asarray(0, jnp.int32)))
    out = jnp.log(d) + lv
    if boost:
        out = out + jnp.where(a < 1, jnp.log(u[2]) / jnp.where(a < 1, a, 1.0), 0.0)
    return out


def log_gamma(key: jax.Array, a: Float[Array, " n"], *, boost: bool = True) -> Float[Array, " n"]:
    """log of Gamma(a, 1) draws for a vector of shapes a > 0 (see :func:`log_gamma_from_uniforms`)."""
    a = jnp.atleast_1d(jnp.asarray(a))
    n = a.shape[0]
    u = uniforms(key, 3 * n, a.dtype)
    return log_gamma_from_uniforms(u.reshape(3, n), key, a, boost=boost)


def sufficient_draws(
    key: jax.Array, dof, d: int, dtype, *, boost: bool = True
) -> tuple[Float[Array, " d"], Float[Array, "d d"], Float[Array, " d"]]:
    """Everything one sufficient-statistic generation needs, from ONE random-bits call.

    Returns (z, lower, log_diag): z ~ N(0, I_d) for the mean, and the Bartlett factor A of
    W = A Aᵀ ~ Wishart(dof, I_d) (also for singular dof < d) as its strictly lower part and
    log diagonal: A_jj² ~ χ²_{dof−j}, A_ij ~ N(0, 1) for i > j, in columns j < dof; columns
    j >= dof are zero (log diagonal −inf).
    """
    n_low = d * (d - 1) // 2
    n_gam = 3 * d if boost else 2 * d
    u = uniforms(key, d + n_low + n_gam, dtype)
    z = normal_from_uniform(u[:d])
    j = jnp.arange(d)
    dof = jnp.asarray(dof, dtype)
    col_ok = j < dof
    shape = jnp.where(col_ok, dof - j, 1.0) / 2
    u_gam = jnp.concatenate([u[d + n_low :], jnp.ones(3 * d - n_gam, dtype)]).reshape(3, d)
    lg = jnp.log(jnp.asarray(2.0, dtype)) + log_gamma_from_uniforms(u_gam, key, shape, boost=boost)
    log_diag = jnp.where(col_ok, 0.5 * lg, -jnp.inf)
    if d == 1:
        return z, jnp.zeros((1, 1), dtype), log_diag
    rows, cols = np.tril_indices(d, -1)
    lower = jnp.zeros((d, d), dtype).at[rows, cols].set(normal_from_uniform(u[d : d + n_low]))
    return z, lower * col_ok[None, :], log_diag


def bartlett(
    key: jax.Array, dof, d: int, *, boost: bool = True
) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
    """The Bartlett factor of Wishart(dof, I_d) as (strict lower part, log diagonal)."""
    _, lower, log_diag = sufficient_draws(key, dof, d, jnp.zeros(()).dtype, boost=boost)
    return lower, log_diag


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


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianProcess:
    """Kernels and inputs for :func:`collapse_jax.core.loop.run_generations`."""

    init: Callable
    step: Callable
    inputs: dict
    spec: MetricSpec


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


def make_process(
    d0: D0,
    sizes,
    *,
    sampler: str = "sufficient",
    estimator: str = "unbiased",
    policy: Policy | None = None,
    record_every: int = 1,
) -> GaussianProcess:
    """Build ``init``/``step`` for one chain and the per-generation ``inputs``.

    ``inputs[i]`` (fitting generation i + 1) holds the size M_i, whether i = 0 (fit to D0) and
    whether generation i + 1 is recorded (metrics are computed on recorded generations only).
    """
    policy = policy or Policy()
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("estimator", estimator, ESTIMATORS)
    d = d0.dim
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
    max_prev = int(np.max(splits.previous[1:])) if n_gen > 1 else 0
    max_orig = int(np.max(splits.original[1:])) if n_gen > 1 else 0
    keep_points = sampler == "samples" and (
        policy.beta > 0 or policy.mode == "accumulate-subsample"
    )
    if policy.mode == "accumulate-subsample":
        buf = int(sizes.sum()) + max_model + max_orig
    elif keep_points:
        buf = int(sizes.max())
    else:
        buf = 0
    spec = d0_metric_spec(d0)
    boost = int(sizes.min()) - d < 2  # some χ² has < 2 degrees of freedom (Gamma shape < 1)
    gens = np.arange(1, n_gen + 1)
    record = record_flags(n_gen, record_every)
    inputs = {
        "size": sizes.astype(np.int32),
        "first": gens == 1,
        "record": record,
        "n_model": np.asarray(splits.model, np.int32),
        "n_prev": np.asarray(splits.previous, np.int32),
        "n_orig": np.asarray(splits.original, np.int32),
    }
    simple = (
        not policy.accumulates and policy.beta == 0 and max_orig == 0
    )  # the pure replace recursion: stays in the log-space representation

    def dtype():
        return jnp.zeros(()).dtype

    def fit(stats: PooledStats, state: GaussianState) -> GaussianState:
        """Fit N(mean, scatter / D(count)); a failed factorisation freezes the chain."""
        cov = stats.scatter / divisor(stats.count, estimator)
        chol = linalg.cholesky(cov) if d > 1 else jnp.sqrt(cov)
        model, bad = model_from_chol(stats.mean, chol)
        bad = bad | state.collapsed
        keep = lambda new, old: jnp.where(bad, old, new)  # noqa: E731
        return state._replace(
            mean=keep(model.mean, state.mean),
            chol=keep(model.chol, state.chol),
            log_scale=keep(model.log_scale, state.log_scale),
            collapsed=bad,
        )

    def init(key):
        """Generation 0 (= D0) and the M_0 real D0 samples that generation 1 will be fitted to.

        The samples are drawn from ``fold_in(key, 0)``: the runner's generation keys are
        ``fold_in(key, n)`` with n >= 1, so the streams never overlap.
        """
        dt = dtype()
        chol0 = np.linalg.cholesky(d0.cov)
        model, _ = model_from_chol(jnp.asarray(d0.mean, dt), jnp.asarray(chol0, dt))
        pts = d0.sample(jax.random.fold_in(key, 0), m_first)
        first = masked_stats(pts, jnp.ones(m_first, bool))
        pool = first if policy.mode == "accumulate" else None
        points = jnp.zeros((buf, d), dt).at[:m_first].set(pts) if keep_points else None
        n_points = jnp.asarray(m_first, jnp.int32) if keep_points else None
        state = GaussianState(
            model.mean,
            model.chol,
            model.log_scale,
            jnp.zeros((), bool),
            pool,
            points,
            n_points,
            first,
            jnp.zeros((), jnp.int32),
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

    def model_part(key, state: GaussianState, n_model) -> tuple[PooledStats, Any]:
        """Statistics (and, for the samples sampler, the points) of n_model model samples."""
        model = GaussianModel(state.mean, state.chol, state.log_scale)
        lchol = absolute_chol(model)
        dt = state.mean.dtype
        n = n_model.astype(dt)
        if sampler == "sufficient":
            z, lower, log_diag = sufficient_draws(key, n - 1, d, dt, boost=True)
            mean = state.mean + lchol @ z / jnp.sqrt(jnp.maximum(n, 1.0))
            a = lower + jnp.diag(jnp.exp(log_diag))
            la = lchol @ a
            return PooledStats(n, mean, la @ la.T), None
        z = jax.random.normal(key, (max_model, d), dt)
        pts = state.mean[None, :] + z @ lchol.T
        mask = jnp.arange(max_model) < n_model
        return masked_stats(pts, mask), pts

    def replace_step(key, state: GaussianState, x) -> GaussianState:
        """Pure replace: fit M model samples, all in the log-space representation."""
        dt = state.mean.dtype
        model = GaussianModel(state.mean, state.chol, state.log_scale)
        m = x["size"].astype(dt)
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
            zs = jax.random.normal(key, (max_model, d), dt)
            mask = jnp.arange(max_model) < x["size"]
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

    def general_step(key, state: GaussianState, x) -> GaussianState:
        """Mixed batches (fresh D0 points, reused points) and accumulation, in absolute scale."""
        k_model, k_orig, k_prev, k_sub = jax.random.split(key, 4)
        dt = state.mean.dtype
        stats, model_pts = model_part(k_model, state, x["n_model"])
        parts = [(model_pts, jnp.arange(max_model) < x["n_model"])] if keep_points else []
        if max_orig > 0:
            o_pts = d0.sample(k_orig, max_orig)
            o_mask = jnp.arange(max_orig) < x["n_orig"]
            stats = merge(stats, masked_stats(o_pts, o_mask))
            parts.append((o_pts, o_mask))
        if max_prev > 0:  # subsample n_prev of the previous training set without replacement
            u = jax.random.uniform(k_prev, (buf,), dt)
            u = jnp.where(jnp.arange(buf) < state.n_points, u, jnp.inf)
            idx = jnp.argsort(u)[:max_prev]
            p_pts = state.points[idx]
            p_mask = jnp.arange(max_prev) < x["n_prev"]
            stats = merge(stats, masked_stats(p_pts, p_mask))
            parts.append((p_pts, p_mask))
        if policy.mode == "accumulate":
            pool = merge(state.pool, stats)
            return fit(pool, state._replace(pool=pool))
        if keep_points:
            pts = jnp.concatenate([p for p, _ in parts], 0)
            mask = jnp.concatenate([m for _, m in parts], 0)
            order = jnp.argsort(~mask, stable=True)  # valid rows first
            pts, n_new = pts[order], mask.sum().astype(jnp.int32)
            if policy.mode == "accumulate-subsample":
                pool = jax.lax.dynamic_update_slice(state.points, pts, (state.n_points, 0))
                n_pool = state.n_points + n_new
                u = jax.random.uniform(k_sub, (buf,), dt)
                u = jnp.where(jnp.arange(buf) < n_pool, u, jnp.inf)
                m_max = int(sizes.max())
                chosen = pool[jnp.argsort(u)[:m_max]]
                stats = masked_stats(chosen, jnp.arange(m_max) < x["size"])
                return fit(stats, state._replace(points=pool, n_points=n_pool))
            width = pts.shape[0]
            new_buf = jnp.zeros((buf, d), dt).at[: min(width, buf)].set(pts[:buf])
            return fit(stats, state._replace(points=new_buf, n_points=n_new))
        return fit(stats, state)

    later_step = replace_step if simple else general_step

    def step(key, state: GaussianState, x) -> tuple[GaussianState, GaussianInfo]:
        # Generation 1 is fitted to the D0 samples drawn in init. In 1-D a select (not a cond)
        # between that cheap fit and the ordinary step keeps the scan body one fused
        # computation; for d > 1 the fit factors a d × d matrix, so it runs under a cond on the
        # (unbatched) generation input and costs nothing in later generations.
        if d == 1:
            later = later_step(key, state, x)
            first = fit(state.first, state)
            new = jax.tree.map(lambda a, b: jnp.where(x["first"], a, b), first, later)
        else:
            new = jax.lax.cond(
                x["first"], lambda: fit(state.first, state), lambda: later_step(key, state, x)
            )
        # Steps past the horizon (padding of the runner's last record) leave the chain as it is,
        # so the last recorded metrics describe generation G itself.
        past = state.generation >= n_gen
        new = new._replace(generation=state.generation + 1)
        new = jax.tree.map(lambda a, b: jnp.where(past, a, b), state, new)
        model = GaussianModel(new.mean, new.chol, new.log_scale)

        def metrics():
            return gaussian_metrics(model.mean, model.chol, model.log_scale, spec, new.collapsed)

        if d == 1:  # a few flops: cheaper than a conditional
            info = metrics()
        else:  # SVD for the Bures cross term: only on recorded generations
            info = jax.lax.cond(x["record"], metrics, lambda: zero_metrics(new.mean.dtype))
        return new, info

    return GaussianProcess(init, step, inputs, spec)


def reduce_info(info: GaussianInfo, log_trace0: float) -> dict:
    """Mean/stderr over chains of each metric, plus chain fractions below trace thresholds."""
    out = {}
    for name in ("w2_sq", "mean_sq_error", "trace_cov", "log_trace_cov", "log_det_cov", "std"):
        s = chain_stats(getattr(info, name))
        out[name] = {"mean": s.mean, "stderr": s.stderr, "finite": s.finite_fraction}
    thr = jnp.log(jnp.asarray(THRESHOLDS, info.log_trace_cov.dtype)) + log_trace0
    below = info.log_trace_cov[:, None] < thr[None, :]
    out["below_fraction"] = below.mean(0)
    out["numerically_collapsed"] = info.collapsed.mean()
    return out
