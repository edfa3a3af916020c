"""Closed forms of the Gaussian fit-and-resample recursion (Theorem 3.1 of Shumailov et al. 2024).

Every function returns values for generations n = 0..G (index n), given the sample sizes
``sizes[i] = M_i`` (M_i points fit generation i + 1). The derivations are in ``theory/gaussian.md``.

Notation: k_i = M_i − 1 degrees of freedom, D_i the estimator's divisor (M_i − 1 for the unbiased
estimator, M_i for the maximum-likelihood one), so that for a Gaussian model of variance σ_i²,
σ_{i+1}² = σ_i² χ²_{k_i} / D_i.
"""

from __future__ import annotations

import numpy as np
from scipy.special import digamma, gammaln

from collapse_jax.core.errors import ConfigError
from collapse_jax.core.policies import Policy, split_batch

ESTIMATORS = ("unbiased", "mle")


def divisor(m, estimator: str):
    """D(M): M − 1 for the unbiased estimator, M for maximum likelihood."""
    m = np.asarray(m, dtype=np.float64)
    if estimator == "unbiased":
        return m - 1.0
    if estimator == "mle":
        return m
    raise ConfigError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def sigma_moment(sizes, r: float, estimator: str = "unbiased", sigma0: float = 1.0) -> np.ndarray:
    """E[σ_n^r] for a Gaussian D0 in 1-D under the replace policy (Theorem 3.1, eq. for E σ_n^r).

    E[σ_n^r] = σ_0^r Π_{i<n} Γ(k_i/2 + r/2) / Γ(k_i/2) · (2 / D_i)^{r/2}; with the unbiased
    estimator (D_i = k_i) this is the issue's Γ((M_i−1)/2 + r/2) / (Γ((M_i−1)/2) ((M_i−1)/2)^{r/2}).
    """
    m = np.asarray(sizes, dtype=np.float64)
    k = m - 1.0
    logf = gammaln(k / 2 + r / 2) - gammaln(k / 2) + (r / 2) * np.log(2.0 / divisor(m, estimator))
    return sigma0**r * np.exp(np.concatenate([[0.0], np.cumsum(logf)]))


def alpha(sizes) -> np.ndarray:
    """α_i = E[σ_{i+1}] / σ_i = Γ(M_i/2) / (Γ((M_i−1)/2) √((M_i−1)/2)) < 1 (unbiased estimator)."""
    k = np.asarray(sizes, dtype=np.float64) - 1.0
    return np.exp(gammaln(k / 2 + 0.5) - gammaln(k / 2) - 0.5 * np.log(k / 2))


def log_det_drift(sizes, dim: int = 1, estimator: str = "unbiased") -> np.ndarray:
    """E[log det Σ_n] − log det Σ_0 for a Gaussian D0 under the replace policy.

    By the Bartlett decomposition log det(W / D) − log det Σ = Σ_{j=0}^{d−1} log χ²_{k−j} − d log D,
    and E log χ²_ν = ψ(ν/2) + log 2, so each generation adds
    Σ_j [ψ((k_i − j)/2) + log 2] − d log D_i (in 1-D: ψ((M_i−1)/2) − log((M_i−1)/2) < 0 for the
    unbiased estimator, the engine of Σ_n → 0 almost surely).
    """
    m = np.asarray(sizes, dtype=np.float64)
    k = m - 1.0
    j = np.arange(dim, dtype=np.float64)
    if np.any(k < dim):
        raise ConfigError(f"log det needs M_i − 1 >= dim = {dim}, got M = {int(m.min())}")
    per = (digamma((k[:, None] - j[None, :]) / 2) + np.log(2.0)).sum(1) - dim * np.log(
        divisor(m, estimator)
    )
    return np.concatenate([[0.0], np.cumsum(per)])


def moments(
    sizes,
    trace0: float,
    policy: Policy | None = None,
    estimator: str = "unbiased",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact E‖μ_n − μ_0‖² and E tr Σ_n, n = 0..G, for any D0 with finite second moments.

    Valid for ``replace``, ``mix`` without reuse (beta = 0, fresh fraction gamma of D0) and
    ``accumulate`` (with or without fresh data); generation 1 is fitted to M_0 points of D0.
    The batch of generation n+1 has n_m model points and n_o fresh D0 points; the pooled
    statistics are linear in the second moments, so (mse, v) follow an exact linear recursion
    (``theory/gaussian.md``, "Exact moment recursion"). With replace and gamma = 0 this gives
    E‖μ_n − μ_0‖² = tr Σ_0 Σ_{i<n} 1/M_i (unbiased) and E tr Σ_n = tr Σ_0 Π_{i<n} k_i/D_i.
    """
    policy = policy or Policy()
    if policy.beta > 0 or policy.mode == "accumulate-subsample":
        raise ConfigError(f"no closed form for policy {policy.describe()!r}")
    m = np.asarray(sizes, dtype=np.int64)
    mse = [0.0]
    v = [float(trace0)]
    # pool (accumulate): count, E‖pool mean − μ0‖², E tr(pool scatter)
    n_pool, mse_pool, w_pool = 0.0, 0.0, 0.0
    for i, size in enumerate(m):
        if i == 0:
            n_m, n_o = 0.0, float(size)
        else:
            split = split_batch(int(size), policy)
            n_m, n_o = float(split.model), float(split.original)
        n = n_m + n_o
        cur_mse, cur_v = (mse[-1], v[-1]) if i > 0 else (0.0, 0.0)
        # batch mean b − μ0 = (n_m/n)(μ − μ0) + (n_m/n) e_m + (n_o/n) e_o
        b_mse = ((n_m / n) ** 2 * cur_mse) + (n_m * cur_v + n_o * trace0) / n**2
        w_b = (n_m - 1) * cur_v * (n_m >= 1) + (n_o - 1) * trace0 * (n_o >= 1)
        if n_m >= 1 and n_o >= 1:
            w_b += n_m * n_o / n * (cur_mse + cur_v / n_m + trace0 / n_o)
        if policy.accumulates and i > 0:
            # pooled mean m' − μ0 = ((N + n_m)(m − μ0) + n_m e_m + n_o e_o) / (N + n); μ = m
            diff = (n_o / n) ** 2 * mse_pool + (n_m * cur_v + n_o * trace0) / n**2  # E‖b − m‖²
            new_n = n_pool + n
            mse_pool = ((n_pool + n_m) ** 2 * mse_pool + n_m * cur_v + n_o * trace0) / new_n**2
            w_pool = w_pool + w_b + n_pool * n / new_n * diff
            n_pool = new_n
            mse.append(mse_pool)
            v.append(w_pool / float(divisor(n_pool, estimator)))
        else:
            n_pool, mse_pool, w_pool = n, b_mse, w_b
            mse.append(b_mse)
            v.append(w_b / float(divisor(n, estimator)))
    return np.asarray(mse), np.asarray(v)


def w2_sq_1d(sizes, sigma0: float = 1.0, estimator: str = "unbiased") -> np.ndarray:
    """Exact E[W₂²(N(μ_n, σ_n²), N(μ_0, σ_0²))] in 1-D under the replace policy.

    W₂² = (μ_n − μ_0)² + (σ_n − σ_0)², so E W₂² = E(μ_n−μ_0)² + E σ_n² + σ_0² − 2 σ_0 E σ_n; with
    the unbiased estimator this is σ_0² (Σ_{i<n} 1/M_i + 2 − 2 Π_{i<n} α_i).
    """
    mse, v = moments(sizes, sigma0**2, Policy(), estimator)
    return mse + v + sigma0**2 - 2 * sigma0 * sigma_moment(sizes, 1.0, estimator, sigma0)


def w2_sq_first_order(sizes, sigma0: float = 1.0) -> np.ndarray:
    """The paper's first-order form E W₂² ≈ (3/2) σ_0² Σ_{i<n} 1/M_i (unbiased, replace)."""
    return 1.5 * sigma0**2 * np.concatenate([[0.0], np.cumsum(1.0 / np.asarray(sizes, float))])


def accumulate_mean_limit(m: int, trace0: float = 1.0) -> float:
    """Dey & Donoho's bounded error: with accumulation of M points per generation,
    E‖μ_n − μ_0‖² → tr Σ_0 Σ_{i≥0} c_i / (M (i+1)²) ≤ (π²/6) tr Σ_0 / M, where c_i = E tr Σ_i / tr Σ_0
    ≤ 1 (exact values from :func:`moments`). Returns the bound (π²/6) tr Σ_0 / M."""
    return np.pi**2 / 6 * trace0 / m
