"""Closed forms of the Gaussian fit-and-resample recursion (Theorem 3.1 of Shumailov et al. 2024).

Every function returns values for generations n = 0..G (index n), given the sample sizes
``sizes[i] = M_i`` (M_i points fit generation i + 1). The derivations are in ``theory/gaussian.md``.

Notation: k_i = M_i − 1 degrees of freedom, D_i the estimator's divisor (M_i − 1 for the unbiased
estimator, M_i for the maximum-likelihood one), so that for a Gaussian model of variance σ_i²,
σ_{i+1}² = σ_i² χ²_{k_i} / D_i.
"""

from __future__ import annotations

import numpy as np
from scipy.special import digamma, gammaln, polygamma

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
    # every generation's split at once (elementwise: the same counts as one call per size; the
    # calls one by one took this function to 0.09 s at 5,000 generations, 0.014 s now)
    split = split_batch(m, policy)
    models, originals = split.model.tolist(), split.original.tolist()
    for i, size in enumerate(m):
        if i == 0:
            n_m, n_o = 0.0, float(size)
        else:
            n_m, n_o = float(models[i]), float(originals[i])
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


def accumulate_moments(sizes, trace0: float, estimator: str = "unbiased"):
    """Exact E‖μ_n − μ_0‖² and E tr Σ_n, n = 0..G, under ``accumulate`` with no fresh data.

    Generation n + 1 is fitted to the pool of N_{n+1} = M_0 + … + M_n points (the M_0 points of
    D0 and every model sample since), so μ_{i+1} = μ_i + (M_i / N_{i+1}) e_i with e_i the
    batch mean's error, E[‖e_i‖² | past] = tr Σ_i / M_i (``theory/gaussian.md``, "Accumulate:
    closed forms"). Hence

        E‖μ_n − μ_0‖² = Σ_{i<n} (M_i / N_{i+1}²) E tr Σ_i,
        E tr Σ_n = tr Σ_0 Π_{i<n} f_i,   f_0 = (M_0 − 1)/D(M_0),   f_i = 1 − M_i / (N_{i+1} D(N_{i+1})),

    with D(N) = N − 1 (unbiased) or N (MLE). Exact for any D0 with finite second moments and
    any schedule; with constant M the weights are 1/(M (i+1)²) and, if Σ were known
    (E tr Σ_i = tr Σ_0), E‖μ_n − μ_0‖² = (tr Σ_0 / M) Σ_{i=1}^n 1/i² → (π²/6) tr Σ_0 / M.

    Returns:
        (mse, trace): two arrays of shape (G + 1,).
    """
    m = np.asarray(sizes, dtype=np.float64)
    pool = np.cumsum(m)  # N_{i+1}, i = 0..G−1
    f = 1.0 - m / (pool * divisor(pool, estimator))
    f[0] = (m[0] - 1.0) / float(divisor(m[0], estimator))
    trace = trace0 * np.concatenate([[1.0], np.cumprod(f)])
    mse = np.concatenate([[0.0], np.cumsum(m * trace[:-1] / pool**2)])
    return mse, trace


def accumulate_mean_known_cov(sizes, trace0: float = 1.0) -> np.ndarray:
    """E‖μ_n − μ_0‖² under accumulate if every model kept Σ_0 (only the mean refitted):
    tr Σ_0 Σ_{i<n} M_i / N_{i+1}², i.e. (tr Σ_0 / M) Σ_{i=1}^n 1/i² for constant M (Dey &
    Donoho's π²/6 pathway); an upper bound on the refitted process, whose E tr Σ_i <= tr Σ_0."""
    m = np.asarray(sizes, dtype=np.float64)
    return trace0 * np.concatenate([[0.0], np.cumsum(m / np.cumsum(m) ** 2)])


def _accumulate_roots(m: int, estimator: str) -> tuple[float, np.ndarray, np.ndarray]:
    """Constant M: the factors f_{j−1} (j >= 2) of :func:`accumulate_moments` as ratios of
    quadratics in j. Returns (c_1, num, den) with
    E tr Σ_n / tr Σ_0 = c_1 Π_{j=2}^n Π_k (j − num_k) / Π_k (j − den_k)."""
    if estimator == "unbiased":  # 1 − 1/(j(jM − 1)) = (j − a)(j − b) / (j (j − 1/M))
        root = np.sqrt(1.0 + 4.0 * m)
        return 1.0, np.array([(1 + root) / (2 * m), (1 - root) / (2 * m)]), np.array([0, 1 / m])
    r = 1.0 / np.sqrt(m)  # MLE: 1 − 1/(M j²) = (j − r)(j + r) / j²
    return (m - 1.0) / m, np.array([r, -r]), np.zeros(2)


def accumulate_trace_constant(m: int, n, trace0: float = 1.0, estimator: str = "unbiased"):
    """E tr Σ_n under accumulate with constant M, in Gamma functions (n >= 1):

    unbiased: Γ(n+1−a)Γ(n+1−b)Γ(2)Γ(2−1/M) / (Γ(2−a)Γ(2−b)Γ(n+1)Γ(n+1−1/M)),
    a, b = (1 ± √(1+4M)) / (2M);  MLE: (M−1)/M · Γ(n+1−r)Γ(n+1+r) / (Γ(2−r)Γ(2+r)Γ(n+1)²),
    r = 1/√M (times tr Σ_0). Equals :func:`accumulate_moments` (a second derivation)."""
    n = np.asarray(n, dtype=np.float64)
    c1, num, den = _accumulate_roots(m, estimator)
    log = sum(gammaln(n + 1 - c) - gammaln(2 - c) for c in num)
    log = log - sum(gammaln(n + 1 - c) - gammaln(2 - c) for c in den)
    return trace0 * c1 * np.exp(log)


def accumulate_trace_limit(m: int, trace0: float = 1.0, estimator: str = "unbiased") -> float:
    """lim_n E tr Σ_n under accumulate with constant M (the variance never collapses):
    unbiased Γ(2 − 1/M) / (Γ(2 − a) Γ(2 − b)) tr Σ_0 ≈ (1 − (π²/6 − 1)/M) tr Σ_0;
    MLE sin(π/√M) / (π/√M) · tr Σ_0 (Euler's product for the sine)."""
    c1, num, den = _accumulate_roots(m, estimator)
    return float(
        trace0 * c1 * np.exp(sum(gammaln(2 - c) for c in den) - sum(gammaln(2 - c) for c in num))
    )


def accumulate_mean_limit_exact(
    m: int, trace0: float = 1.0, estimator: str = "unbiased", terms: int = 100_000
) -> float:
    """lim_n E‖μ_n − μ_0‖² under accumulate with constant M and Σ refitted:
    (1/M) Σ_{i>=0} E tr Σ_i / (i+1)², between (π²/6) lim E tr Σ_i / M and (π²/6) tr Σ_0 / M.
    Summed exactly to ``terms`` terms; the tail uses the limit of E tr Σ_i and
    Σ_{i>=K} 1/(i+1)² = ψ'(K+1) (error O(1/K²))."""
    sizes = np.full(terms, m)
    mse = accumulate_moments(sizes, trace0, estimator)[0]
    tail = accumulate_trace_limit(m, trace0, estimator) * float(polygamma(1, terms + 1)) / m
    return float(mse[-1] + tail)


def accumulate_mean_limit(m: int, trace0: float = 1.0) -> float:
    """Dey & Donoho's bound (arXiv:2410.22812): with accumulation of M points per generation,
    E‖μ_n − μ_0‖² <= (tr Σ_0 / M) Σ_{i=1}^n 1/i² < (π²/6) tr Σ_0 / M, with equality in the limit
    when Σ is known (:func:`accumulate_mean_known_cov`); the refitted process stays below it
    (:func:`accumulate_mean_limit_exact`). Returns (π²/6) tr Σ_0 / M."""
    return np.pi**2 / 6 * trace0 / m


def real_weight_mse(sizes, trace0: float, w: float, k: float, m0: int | None = None) -> np.ndarray:
    """E‖μ_n − μ_0‖², n = 0..G, under weighted real data (theory/operators.md, "Weighted real
    data"): generation 1 is fitted to M_0 real points; generation n + 1 to n_i = M_i fresh real
    points with weight w and m_i = round(n_i/k) model points with weight 1 − w (unbiased
    estimator, so E tr Σ_n = tr Σ_0):
    V_{n+1} = (1 − w)² V_n + tr Σ_0 (w²/n_i + (1 − w)²/m_i)."""
    sizes = np.asarray(sizes, np.float64)
    out = np.zeros(len(sizes) + 1)
    out[1] = trace0 / (sizes[0] if m0 is None else m0)
    for i in range(1, len(sizes)):
        n = sizes[i]
        m = max(np.round(n / k), 1.0)
        out[i + 1] = (1 - w) ** 2 * out[i] + trace0 * (w**2 / n + (1 - w) ** 2 / m)
    return out


def real_weight_stationary(trace0: float, n: float, w: float, k: float) -> float:
    """The stationary E‖μ − μ_0‖² = (tr Σ_0/n)·[w² + k(1 − w)²] / [w(2 − w)] (m = n/k)."""
    return trace0 / n * (w**2 + k * (1 - w) ** 2) / (w * (2 - w))


def real_weight_optimum(k: float) -> float:
    """The w minimising :func:`real_weight_stationary`: w* = (√(k² + 4k) − k)/2."""
    return (np.sqrt(k * k + 4 * k) - k) / 2
