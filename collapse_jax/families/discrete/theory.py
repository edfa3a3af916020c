"""Closed forms for the discrete resampling process (neutral Wright–Fisher with population M).

Derivations: ``theory/discrete.md``. Generation numbering: p_0 = p0; p_{n+1} is fitted to the
M_n-point training set drawn at generation n (so M_0 samples of p0 fit generation 1).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from collapse_jax.core.policies import Policy, split_batch


def expected_sum_squares(p0, sizes, policy: Policy | None = None) -> np.ndarray:
    """E[Σ_i p_n(i)²] for n = 0..G under ``replace`` or ``mix`` (α, β, γ) policies.

    Exact second-moment recursion (theory/discrete.md, eq. (H-mix)). With F_n = E Σ p_n², a
    batch of size M = M_n made of a = αM model draws X ~ Mult(a, p_n), b = βM points Z drawn
    without replacement from the previous training set (whose empirical law IS p_n, size M_{n-1})
    and g = γM fresh draws Y ~ Mult(g, p0):
      M² F_{n+1} = a(1 − F_n) + a² F_n + b(M' − b)/(M' − 1)(1 − F_n) + b² F_n
                 + 2ab F_n + 2(a + b) g F_0 + g(1 − F_0) + g² F_0.
    Under ``replace`` this is F_{n+1} = F_n + (1 − F_n)/M_n, i.e. E[Het_n] = Het_0 Π_{i<n} (1 − 1/M_i).
    """
    policy = policy or Policy()
    if policy.accumulates:
        raise ValueError("the closed form covers replace and mix policies only")
    p0 = np.asarray(p0, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    f0 = float((p0**2).sum())
    out = [f0]
    f = f0
    # Generation 1 is fitted to M_0 pure samples of p0 (the original data).
    m = float(sizes[0])
    f = (m * (1 - f) + m * m * f) / (m * m)
    out.append(f)
    for n in range(1, len(sizes)):
        m = float(sizes[n])
        a, b, g = (float(v) for v in split_batch(int(sizes[n]), policy))
        m_prev = float(sizes[n - 1])
        fpc = b * (m_prev - b) / (m_prev - 1) if m_prev > 1 else 0.0
        num = (
            a * (1 - f)
            + a * a * f
            + fpc * (1 - f)
            + b * b * f
            + 2 * a * b * f
            + 2 * (a + b) * g * f0
            + g * (1 - f0)
            + g * g * f0
        )
        f = num / (m * m)
        out.append(f)
    return np.asarray(out)


def expected_heterozygosity(p0, sizes, policy: Policy | None = None) -> np.ndarray:
    """E[Het_n] = 1 − E[Σ p_n²] (heterozygosity) for n = 0..G; under ``replace``,
    Het_0 Π_{i<n}(1 − 1/M_i)."""
    return 1.0 - expected_sum_squares(p0, sizes, policy)


def diffusion_absorption_time(p0, m: int) -> float:
    """Mean generations until one state is left, diffusion approximation (Littler 1975):
    T ≈ −2M Σ_i (1 − p_i) ln(1 − p_i); two states: −2M [p ln p + (1 − p) ln(1 − p)]."""
    p = np.asarray(p0, dtype=np.float64)
    p = p[(p > 0) & (p < 1)]
    return float(-2.0 * m * np.sum((1 - p) * np.log1p(-p)))


def _binomial_transition(m_from: int, m_to: int) -> np.ndarray:
    """T[c, c'] = P(Bin(m_to, c / m_from) = c'), shape (m_from + 1, m_to + 1)."""
    c = np.arange(m_from + 1)[:, None] / m_from
    return stats.binom.pmf(np.arange(m_to + 1)[None, :], m_to, c)


def exact_two_state_absorption_time(p: float, m: int) -> float:
    """Exact mean absorption time for K = 2 under replace with constant M.

    The count of state 1 is a Markov chain on {0..M}; T = E[absorption generation] solves
    (I − Q) t = 1 on the transient states, with generation 1 the first fitted model.
    """
    trans = _binomial_transition(m, m)
    q = trans[1:m, 1:m]
    t = np.linalg.solve(np.eye(m - 1) - q, np.ones(m - 1))  # steps from count c to absorption
    start = stats.binom.pmf(np.arange(m + 1), m, p)  # T_0 counts: generation 1's model
    t_full = np.concatenate([[0.0], t, [0.0]])
    return float(1.0 + start @ t_full)


def exact_two_state_absorption_cdf(p: float, m: int, generations: int) -> np.ndarray:
    """P(T <= n), n = 0..G, for K = 2 under replace with constant M: model n is a point mass
    when the counts of T_{n−1} (Bin(M, p) for T_0, then the binomial chain) are 0 or M. The
    restricted mean E[min(T, G)] of a censored run is Σ_{n<G} (1 − P(T <= n))."""
    trans = _binomial_transition(m, m)
    dist = stats.binom.pmf(np.arange(m + 1), m, p)  # counts of T_0
    cdf = [0.0]
    for _ in range(generations):
        cdf.append(float(dist[0] + dist[-1]))
        dist = dist @ trans
    return np.asarray(cdf)


def survival_probabilities(p0, sizes, policy: Policy | None = None) -> np.ndarray:
    """P(state i alive in generation n), shape (G + 1, K), exactly.

    Each state's count is itself a one-dimensional Markov chain (the marginal of a multinomial
    is binomial), so its law is propagated exactly through the (M_{n-1}+1) × (M_n+1)
    transition matrices. Covers ``replace`` and ``mix`` policies with β = 0 (fresh fraction γ):
    the new count is Bin(a, c/M') + Bin(g, p0_i), a convolution.
    """
    policy = policy or Policy()
    if policy.accumulates or policy.beta > 0:
        raise ValueError("exact survival covers replace and fresh-fraction policies only")
    p0 = np.asarray(p0, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    uniq, inverse = np.unique(p0, return_inverse=True)
    out = np.empty((len(sizes) + 1, len(uniq)))
    out[0] = (uniq > 0).astype(np.float64)
    # law[j, c] = P(count of state j in the current training set = c); all states at once.
    law = stats.binom.pmf(np.arange(sizes[0] + 1)[None, :], sizes[0], uniq[:, None])
    out[1] = 1.0 - law[:, 0]
    cache: dict[tuple[int, int], np.ndarray] = {}
    for n in range(1, len(sizes)):
        m_prev, m = int(sizes[n - 1]), int(sizes[n])
        a, _, g = (int(v) for v in split_batch(m, policy))
        if (m_prev, a) not in cache:
            cache[(m_prev, a)] = _binomial_transition(m_prev, a)
        law = law @ cache[(m_prev, a)]
        if g > 0:
            fresh = stats.binom.pmf(np.arange(g + 1)[None, :], g, uniq[:, None])
            law = np.stack([np.convolve(row, f) for row, f in zip(law, fresh, strict=True)])
        out[n + 1] = 1.0 - law[:, 0]
    return out[:, inverse]


def expected_support(p0, sizes, policy: Policy | None = None) -> np.ndarray:
    """E[support_n] = Σ_i P(state i alive at n), n = 0..G (exact, via the marginal chains)."""
    return survival_probabilities(p0, sizes, policy).sum(axis=1)


def feller_survival_approximation(p0, m: int, generations) -> np.ndarray:
    """Diffusion approximation P(alive at n) ≈ 1 − exp(−2 M p_i / n), shape (len(gens), K).

    A rare state's count behaves like Feller's branching diffusion, whose extinction probability
    by time n is exp(−2c/n) for initial count c = M p_i: the time to forget a state grows linearly
    with its count, the form of the bounds of Suresh et al. (arXiv 2412.17646).
    """
    p0 = np.asarray(p0, dtype=np.float64)
    n = np.maximum(np.asarray(generations, dtype=np.float64), 1e-12)[:, None]
    out = 1.0 - np.exp(-2.0 * m * p0[None, :] / n)
    out[np.asarray(generations) == 0] = (p0 > 0).astype(np.float64)
    return out


def heterozygosity_survival_bound(p0, m: int, generations) -> np.ndarray:
    """Rigorous upper bound on P(state i alive at n) under replace with constant M.

    With c_n the count of state i, E[c_n (M − c_n)] = c (M − c)(1 − 1/M)^n exactly, and
    c_n(M − c_n) ≥ M − 1 whenever 0 < c_n < M, so by Markov's inequality
    P(alive at n) ≤ P(fixed) + P(0 < c_n < M) ≤ p_i + M² p_i (1 − p_i)(1 − 1/M)^n / (M − 1).
    """
    p0 = np.asarray(p0, dtype=np.float64)
    n = np.asarray(generations, dtype=np.float64)[:, None]
    bound = p0[None, :] + m * m * p0 * (1 - p0) * (1 - 1 / m) ** n / (m - 1)
    return np.minimum(bound, 1.0)
