"""Recursive Gaussian-mixture fitting: the original data D0 and one chain's generational kernels
(:class:`collapse_jax.core.loop.Family`) around the EM of :mod:`collapse_jax.families.gmm.em`.

Everything is written for ONE chain with static shapes; points carry weights (0 for padding),
so variable sample sizes M_i live in a fixed buffer (the shared
:class:`~collapse_jax.core.policies.PointBuffer`). The shared runner vmaps the kernels over
independent recursions and scans generations.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from collapse_jax.core import operators
from collapse_jax.core.errors import ConfigError, check_choice, check_int, load_array
from collapse_jax.core.loop import Family, GenInput
from collapse_jax.core.operators import Operators
from collapse_jax.core.policies import (
    PointBuffer,
    Policy,
    initial_buffer,
    new_batch,
    next_buffer,
    subsample,
)
from collapse_jax.families.gmm.em import (
    COVARIANCE_TYPES,
    INITS,
    EMConfig,
    fit,
    fit_em,
    initialize,
    kmeans_plusplus,
    safe_cholesky,
    sample,
)
from collapse_jax.families.gmm.metrics import (
    GMM,
    component_std,
    component_stds,
    l2_distance_squared,
    log_prob,
    mean_log_likelihood,
    weight_entropy,
)

__all__ = [
    "COVARIANCE_TYPES",
    "INITS",
    "EMConfig",
    "GMMChainState",
    "GMMInfo",
    "OriginalData",
    "RecursionSpec",
    "fit",
    "fit_em",
    "initialize",
    "kmeans_plusplus",
    "make_family",
    "mixture_from_lists",
    "original_data",
    "safe_cholesky",
    "sample",
]


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
    first_fit: GMM  # model 1, fitted to the original data (the reference until generation 1)
    heldout: Float[Array, "H d"]  # held-out original points


class GMMInfo(NamedTuple):
    """What generation n reports for one recursion (generation 0: the reference mixture)."""

    l2_distance: Float[Array, ""]  # ‖p_0 - p_n‖²₂ (closed form)
    component_std: Float[Array, ""]  # Σ_k π_k √(tr Σ_k / d)
    component_std_min: Float[Array, ""]  # smallest component's √(tr Σ_k / K) (authors' form)
    component_std_max: Float[Array, ""]  # largest component's √(tr Σ_k / K) (authors' form)
    l2_to_first_fit: Float[Array, ""]  # ‖p_1 − p_n‖²₂ to the generation-1 fit (NaN at n = 0)
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
    ops: Operators = operators.NONE  # data operators on the model samples (curate, verify)

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
    # Converted on the host and put on the device: jnp.asarray runs a small program per array.
    mixture = (
        GMM(*(jax.device_put(np.asarray(a, dtype)) for a in d0.mixture))
        if d0.mixture is not None
        else None
    )
    points = jax.device_put(np.asarray(d0.points, dtype)) if d0.points is not None else None
    heldout = d0.heldout
    fixed_heldout = jax.device_put(np.asarray(heldout, dtype)) if heldout is not None else None
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

    def measure(key, gmm, ref, first, heldout, train_ll, em_iter, em_conv, gen, batch, batch_w):
        stds = component_stds(gmm)
        l2_first = l2_distance_squared(first, gmm)
        return GMMInfo(
            l2_distance=l2_distance_squared(ref, gmm),
            component_std=component_std(gmm),
            component_std_min=jnp.min(stds),
            component_std_max=jnp.max(stds),
            l2_to_first_fit=jnp.where(gen >= 1, l2_first, jnp.nan).astype(l2_first.dtype),
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
        # first_fit holds a K-component placeholder until generation 1 replaces it.
        return GMMChainState(data, start, ref, start, heldout), info

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
        first = jax.tree.map(lambda a, b: jnp.where(gen == 1, a, b), gmm, state.first_fit)
        # The model the next batch is drawn from: model n after temperature / top-k / top-p.
        weights, covs = operators.temper_mixture(gmm.weights, gmm.covs, spec.ops)
        source = GMM(weights, gmm.means, covs)
        if spec.ops.on_points:
            model_points, model_w = operators.point_samples(
                k_model, lambda k, n: sample(k, source, n), B, spec.ops
            )
        else:
            model_points, model_w = sample(k_model, source, B), None
        batch, batch_w = new_batch(
            k_prev, k_orig, model_points, draw_original, data, size, policy, model_w
        )
        info = measure(
            k_w2,
            gmm,
            state.reference,
            first,
            state.heldout,
            em.loglik,
            em.n_iter,
            em.converged,
            gen,
            batch,
            batch_w,
        )
        data = next_buffer(k_sub, data, batch, batch_w, size, policy)
        return state._replace(data=data, gmm=gmm, first_fit=first), info

    return Family(init, step)


def weighted_log_likelihood(gmm: GMM, x: Float[Array, "N d"], w: Float[Array, " N"]):
    """Weighted mean log-likelihood Σ_n w_n log p(x_n) / Σ_n w_n."""
    lp = log_prob(gmm, x)
    return jnp.sum(jnp.where(w > 0, w * lp, 0.0)) / jnp.sum(w)
