"""The Gaussian family's original distribution D0: a family with exact moments (normal,
Student-t, two-point mixture, uniform) or the empirical law of a data array."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from collapse_jax.core.errors import ConfigError, check_choice, check_float, check_int, load_array
from collapse_jax.families.gaussian.metrics import kappa_empirical, kappa_symmetric
from collapse_jax.numerics.random import jax_bernoulli, jax_normal, jax_uniform

D0_FAMILIES = ("normal", "student-t", "mixture", "uniform")
#: mixture D0: each coordinate is ½ N(−a s, (b s)²) + ½ N(a s, (b s)²) with a² + b² = 1
MIXTURE_OFFSET, MIXTURE_SD = 0.8, 0.6


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
            z = jax_normal(key, (n, d), dtype)
            return mean[None, :] + z @ chol.T
        if self.family == "student-t":
            t = jax.random.t(key, self.df, (n, d), dtype)
            return mean[None, :] + self.scale * np.sqrt((self.df - 2) / self.df) * t
        if self.family == "mixture":
            k1, k2 = jax.random.split(key)
            sign = jnp.where(jax_bernoulli(k1, 0.5, (n, d)), 1.0, -1.0).astype(dtype)
            z = jax_normal(k2, (n, d), dtype)
            return mean[None, :] + self.scale * (MIXTURE_OFFSET * sign + MIXTURE_SD * z)
        if self.family == "uniform":
            u = jax_uniform(key, (n, d), dtype, -1.0, 1.0)
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
        s = self.scale
        if self.family == "normal":
            return float(np.sqrt(self.cov[0, 0]))
        if self.family == "uniform":  # Q(u) = √3 s (2u − 1); ∫ u Φ⁻¹(u) du = 1/(2√π)
            return float(np.sqrt(3.0) * s / np.sqrt(np.pi))
        if self.family == "data":
            return kappa_empirical(self.data[:, 0])
        from scipy import stats  # only here: its import is a tenth of a short run

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
        data = load_array("D0 data", path)
        if data.ndim == 1:
            data = data[:, None]
        if data.shape[1] != dim:
            raise ConfigError(f"D0 data {path} has dimension {data.shape[1]} but --dim is {dim}")
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
