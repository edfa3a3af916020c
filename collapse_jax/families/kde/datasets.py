"""The original data D0 of the KDE study: the Collapse-or-Thrive point sets (blobs, circles, moons,
swiss roll) drawn in JAX with scikit-learn's parameters, or the points of a ``.npy`` file.

The synthetic sets follow ``sklearn.datasets.make_blobs`` / ``make_circles`` / ``make_moons`` /
``make_swiss_roll`` in distribution (not bit for bit, and without scikit-learn at run time):

* ``blobs``: ``make_blobs(n_features=2)`` defaults: 3 centres drawn uniformly from the box
  [-10, 10]², isotropic cluster standard deviation 1; a point picks a centre uniformly.
  scikit-learn draws the centres from its random state; here they come from the run's seed
  (NumPy ``default_rng(seed)``), the same for every chain.
* ``circles``: ``make_circles(noise, factor=0.8)``: a point lies on the outer (radius 1) or the
  inner (radius ``factor``) circle with probability ½ each, at an angle uniform on [0, 2π), plus
  N(0, noise² I). scikit-learn places the angles on an even grid and splits n exactly in half;
  the limit of that grid is this uniform law.
* ``moons``: ``make_moons(noise)``: with probability ½ the outer moon (cos t, sin t), else the
  inner moon (1 − cos t, ½ − sin t), t uniform on [0, π], plus N(0, noise² I) (same remark on
  the grid).
* ``swiss-roll``: ``make_swiss_roll(noise)`` in its plane of the roll: t = 1.5π(1 + 2u),
  u ~ U(0, 1), the point (t cos t, t sin t) (scikit-learn's x and z columns) plus N(0, noise² I).

scikit-learn's circles and moons are stratified (an even grid of angles, exactly half the points
per component), ours i.i.d.: the same law, but the held-out NLL of a KDE depends on the design
(BENCHMARKS.md: moons, M = 100, h = 0.1, generation 1, scikit-learn's own KDE: 0.897 ± 0.003 with
Collapse-or-Thrive's 50/50 split of ``make_moons(2M)`` against 0.814 ± 0.004 with i.i.d. draws),
so NLL levels differ somewhat from their figures.

Collapse-or-Thrive's KDE sweeps (``sweeps/fit_kdes_bandwidth/*.yaml`` of
KoyejoLab/Collapse-or-Thrive, read in the RylanSchaeffer/KoyejoLab-Collapse-or-Thrive copy) use
noise 0.05 for circles, moons and the swiss roll and ``n_features = 2`` for blobs, which are the
defaults here. Their loop (``src/fit_kdes/fit_kdes.py``) fits generation 1 to a random half of
``make_*(2M)`` (blobs: of ``make_blobs(M)``, so M/2 points) and scores the other half; their
dataset notebook draws the swiss roll in 3-D, while this study (as issue 12 asks) uses its 2-D
x–z plane.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from collapse_jax.core.errors import ConfigError, load_array
from collapse_jax.numerics.random import jax_normal

#: The synthetic point sets (any other value must be a path to a ``.npy`` file).
SYNTHETIC = ("blobs", "circles", "moons", "swiss-roll")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """D0: a synthetic law (sampled exactly, ``points`` is None) or a fixed point set."""

    name: str  # blobs | circles | moons | swiss-roll | the file's name
    label: str  # human-readable description for reports
    dim: int  # d
    trace_cov: float  # tr Cov(D0) (synthetic sets, exact); for a file: of its points
    pair_second_moment: float  # E‖X_a − X_b‖² for two distinct points of a generation-0 sample
    noise: float = 0.0  # circles / moons / swiss roll: Gaussian noise standard deviation
    factor: float = 0.8  # circles: inner radius
    centers: np.ndarray | None = None  # blobs: (K, d) centres
    cluster_std: float = 1.0  # blobs: standard deviation of each blob
    points: np.ndarray | None = None  # (N, d) points of a .npy file

    @property
    def is_file(self) -> bool:
        return self.points is not None

    def sample(self, key: jax.Array, n: int, dtype=jnp.float32) -> Float[Array, "n d"]:
        """``n`` independent points of a synthetic D0 (pure JAX)."""
        if self.points is not None:
            raise ValueError("a point-set D0 is resampled by the kernel, not sampled here")
        k_pick, k_pos, k_noise = jax.random.split(key, 3)
        noise = jax_normal(k_noise, (n, self.dim), dtype)
        if self.name == "blobs":
            centers = jnp.asarray(self.centers, dtype)
            pick = jax.random.randint(k_pick, (n,), 0, centers.shape[0])
            return centers[pick] + self.cluster_std * noise
        u = jax.random.uniform(k_pos, (n,), dtype)
        side = jax.random.bernoulli(k_pick, 0.5, (n,))  # True: outer circle / outer moon
        if self.name == "circles":
            t = 2 * math.pi * u
            r = jnp.where(side, 1.0, self.factor)
            base = jnp.stack([r * jnp.cos(t), r * jnp.sin(t)], 1)
        elif self.name == "moons":
            t = math.pi * u
            outer = jnp.stack([jnp.cos(t), jnp.sin(t)], 1)
            inner = jnp.stack([1.0 - jnp.cos(t), 0.5 - jnp.sin(t)], 1)
            base = jnp.where(side[:, None], outer, inner)
        else:  # swiss-roll
            t = 1.5 * math.pi * (1.0 + 2.0 * u)
            base = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], 1)
        return base + self.noise * noise


def _swiss_roll_trace(noise: float) -> float:
    """tr Cov of (t cos t, t sin t) + N(0, noise² I), t ~ U(a, b), a = 1.5π, b = 4.5π:
    E t² − (E t cos t)² − (E t sin t)² + 2 noise², with ∫ t cos t = t sin t + cos t and
    ∫ t sin t = sin t − t cos t."""
    a, b = 1.5 * math.pi, 4.5 * math.pi
    width = b - a
    et2 = (b**3 - a**3) / (3 * width)
    etc = ((b * math.sin(b) + math.cos(b)) - (a * math.sin(a) + math.cos(a))) / width
    ets = ((math.sin(b) - b * math.cos(b)) - (math.sin(a) - a * math.cos(a))) / width
    return et2 - etc**2 - ets**2 + 2 * noise**2


def _moons_trace(noise: float) -> float:
    """tr Cov of the moons law: each moon has tr Cov = Var cos t + Var sin t = 1 − 4/π²
    (t ~ U(0, π)); the moon means (0, 2/π) and (1, ½ − 2/π) add ‖μ_out − μ_in‖²/4."""
    within = 1.0 - 4.0 / math.pi**2
    between = (1.0 + (0.5 - 4.0 / math.pi) ** 2) / 4.0
    return within + between + 2 * noise**2


def pair_second_moment_of_points(points: np.ndarray) -> float:
    """Mean of ‖x_a − x_b‖² over the distinct pairs a ≠ b of ``points``:
    (2N Σ‖x‖² − 2‖Σx‖²) / (N(N − 1))."""
    x = np.asarray(points, np.float64)
    n = x.shape[0]
    s = x.sum(0)
    return float((2 * n * np.sum(x * x) - 2 * s @ s) / (n * (n - 1)))


def make_dataset(
    spec: str,
    *,
    noise: float = 0.05,
    factor: float = 0.8,
    blob_centers: int = 3,
    blob_std: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """D0 from ``spec``: one of :data:`SYNTHETIC` or a path to an (N, d) ``.npy`` of points.

    For i.i.d. draws the pair term is E‖X_a − X_b‖² = 2 tr Cov(D0); for a file whose generation-0
    sample is a uniform subset drawn without replacement it is the mean over the file's distinct
    pairs (:func:`pair_second_moment_of_points`).
    """
    spec = str(spec).strip()
    if spec == "blobs":
        centers = np.random.default_rng(seed).uniform(-10.0, 10.0, (blob_centers, 2))
        between = float(np.sum((centers - centers.mean(0, keepdims=True)) ** 2) / blob_centers)
        tr = 2 * blob_std**2 + between
        label = f"blobs: {blob_centers} centres in [-10, 10]² (seed {seed}), std {blob_std:g}"
        return Dataset("blobs", label, 2, tr, 2 * tr, centers=centers, cluster_std=blob_std)
    if spec == "circles":
        tr = (1 + factor**2) / 2 + 2 * noise**2
        label = f"circles: radii 1 and {factor:g}, noise {noise:g}"
        return Dataset("circles", label, 2, tr, 2 * tr, noise=noise, factor=factor)
    if spec == "moons":
        tr = _moons_trace(noise)
        return Dataset("moons", f"moons: noise {noise:g}", 2, tr, 2 * tr, noise=noise)
    if spec == "swiss-roll":
        tr = _swiss_roll_trace(noise)
        label = f"swiss roll (x, z plane): noise {noise:g}"
        return Dataset("swiss-roll", label, 2, tr, 2 * tr, noise=noise)
    if spec.endswith(".npy"):
        pts = load_array("dataset", spec, ndim=(2,))
        if pts.shape[0] < 2:
            raise ConfigError(
                f"dataset file {spec} must hold at least 2 points, got {pts.shape[0]}"
            )
        tr = float(np.trace(np.atleast_2d(np.cov(pts, rowvar=False, bias=True))))
        label = f"{pts.shape[0]} points in d = {pts.shape[1]} from {Path(spec).name}"
        return Dataset(
            Path(spec).name, label, pts.shape[1], tr, pair_second_moment_of_points(pts), points=pts
        )
    raise ConfigError(
        f"unknown dataset {spec!r}; use {', '.join(SYNTHETIC)} or a path to an (N, d) .npy file"
    )
