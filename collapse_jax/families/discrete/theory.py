"""Closed forms for the discrete resampling process (neutral Wright–Fisher with population M).

Derivations: ``theory/discrete.md``. Generation numbering: p_0 = p0; p_{n+1} is fitted to the
M_n-point training set drawn at generation n (so M_0 samples of p0 fit generation 1).
"""

from __future__ import annotations

import numpy as np

from collapse_jax.core.binomial import binom_pmf, binomial_transition
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


def exact_two_state_absorption_time(p: float, m: int) -> float:
    """Exact mean absorption time for K = 2 under replace with constant M.

    The count of state 1 is a Markov chain on {0..M}; T = E[absorption generation] solves
    (I − Q) t = 1 on the transient states, with generation 1 the first fitted model.
    """
    trans = binomial_transition(m, m)
    q = trans[1:m, 1:m]
    t = np.linalg.solve(np.eye(m - 1) - q, np.ones(m - 1))  # steps from count c to absorption
    start = binom_pmf(np.arange(m + 1), m, p)  # T_0 counts: generation 1's model
    t_full = np.concatenate([[0.0], t, [0.0]])
    return float(1.0 + start @ t_full)


def exact_two_state_absorption_cdf(p: float, m: int, generations: int) -> np.ndarray:
    """P(T <= n), n = 0..G, for K = 2 under replace with constant M: model n is a point mass
    when the counts of T_{n−1} (Bin(M, p) for T_0, then the binomial chain) are 0 or M. The
    restricted mean E[min(T, G)] of a censored run is Σ_{n<G} (1 − P(T <= n))."""
    trans = binomial_transition(m, m)
    dist = binom_pmf(np.arange(m + 1), m, p)  # counts of T_0
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
    law = binom_pmf(np.arange(sizes[0] + 1)[None, :], sizes[0], uniq[:, None])
    out[1] = 1.0 - law[:, 0]
    cache: dict[tuple[int, int], np.ndarray] = {}
    for n in range(1, len(sizes)):
        m_prev, m = int(sizes[n - 1]), int(sizes[n])
        a, _, g = (int(v) for v in split_batch(m, policy))
        if (m_prev, a) not in cache:
            cache[(m_prev, a)] = binomial_transition(m_prev, a)
        law = law @ cache[(m_prev, a)]
        if g > 0:
            fresh = binom_pmf(np.arange(g + 1)[None, :], g, uniq[:, None])
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


# ---------------------------------------------------------------------------------------------
# Data operators whose law lumps into two classes (theory/operators.md, "Two classes")


def two_classes(p0, reward=None, good=None) -> np.ndarray | None:
    """The states of class A (bool, shape K) when curation and verification see only two
    classes among the states with p0 > 0 — states that share their reward and their verdict —
    else None. A is the correct class under verification, else the higher-reward class."""
    p0 = np.asarray(p0, dtype=np.float64)
    r = np.zeros(len(p0)) if reward is None else np.asarray(reward, dtype=np.float64)
    g = np.zeros(len(p0), bool) if good is None else np.asarray(good, bool)
    live = p0 > 0
    pairs = sorted({(bool(a), float(b)) for a, b in zip(g[live], r[live], strict=True)})
    if len(pairs) != 2:
        return None
    top = pairs[1]  # correct before incorrect, then the higher reward
    return (g == top[0]) & (r == top[1])


def lumped_law(mass, k: float, rewards=(0.0, 0.0), accept=(1.0, 1.0)) -> np.ndarray:
    """The class-A mass of one sample after the operators, for each class-A mass ``mass`` of the
    fitted law: best-of-``k`` curation (0: off; inf: the tilted limit) with class rewards
    ``rewards`` = (r_A, r_B), then a verifier accepting class A, B with ``accept`` = (a_A, a_B).

    Two-class curation needs no quadrature: among the K − 1 rivals, J ~ Bin(K − 1, g) are of
    class A, so H_K(A) = Σ_j Bin(j) K e^{r_A} / ((1 + j) e^{r_A} + (K − 1 − j) e^{r_B})."""
    g = np.asarray(mass, dtype=np.float64)
    ra, rb = (float(v) - max(rewards) for v in rewards)
    if k == np.inf:
        g = g * np.exp(ra) / (g * np.exp(ra) + (1 - g) * np.exp(rb))
    elif k > 1:
        k = int(k)
        j = np.arange(k)
        share = k * np.exp(ra) / ((1 + j) * np.exp(ra) + (k - 1 - j) * np.exp(rb))
        g = g * (binom_pmf(j[None, :], k - 1, g[:, None]) @ share)
    num, other = g * accept[0], (1 - g) * accept[1]
    z = num + other
    return np.where(z > 0, num / np.where(z > 0, z, 1.0), g)


def lumped_mass_moments(g0: float, m: int, generations: int, law) -> tuple[np.ndarray, ...]:
    """E[g_n] and Var[g_n], n = 0..G, for the class-A mass g_n of p_n under ``replace`` with
    constant M: g_1 = Bin(M, g0)/M (generation 1 fits plain samples of p0) and
    g_{n+1} = Bin(M, law(g_n))/M, a Markov chain on {0, 1/M, …, 1} propagated exactly through its
    (M + 1)² transition matrix. The variance gives the exact standard error of a mean over chains
    (the empirical one is 0 when every chain has been absorbed, however small 1 − E[g_n] is)."""
    grid = np.arange(m + 1) / m
    trans = binom_pmf(np.arange(m + 1)[None, :], m, law(grid)[:, None])
    dist = binom_pmf(np.arange(m + 1), m, g0)
    mean, var = [g0], [0.0]
    for _ in range(generations):
        mu = float(dist @ grid)
        mean.append(mu)
        var.append(max(float(dist @ grid**2) - mu * mu, 0.0))
        dist = dist @ trans
    return np.asarray(mean), np.asarray(var)


#: Largest M of the exact lumped chain ((M + 1)² transition matrix).
LUMPED_MAX_SAMPLES = 2000


def lumped_operator_means(p0, ops, m: int, generations: int) -> dict[str, np.ndarray]:
    """E[reward_n], E[exp_reward_n] and E[good_mass_n], n = 0..G, and their standard deviations
    over chains (keys ``NAME_sd``), when the active operators are curation and / or verification
    only and see two classes (:func:`two_classes`); {} otherwise. Each metric is linear in the
    class-A mass: v_B + (v_A − v_B) g_n."""
    active = set(ops.active())
    if not active or not active <= {"curate", "verify"} or m > LUMPED_MAX_SAMPLES:
        return {}
    p0 = np.asarray(p0, dtype=np.float64)
    reward = None if ops.curate is None else np.asarray(ops.curate.reward, dtype=np.float64)
    good = None if ops.verify is None else np.asarray(ops.verify.good, bool)
    a = two_classes(p0, reward, good)
    if a is None:
        return {}
    b = ~a & (p0 > 0)
    r = np.zeros(len(p0)) if reward is None else reward
    rewards = (float(r[a][0]), float(r[b][0]))
    accept = (1.0, 1.0)
    if good is not None:
        accept = tuple(ops.verify.tpr if good[c][0] else ops.verify.fpr for c in (a, b))
    k = 0 if ops.curate is None else ops.curate.k
    mean, var = lumped_mass_moments(
        float(p0[a].sum()), m, generations, lambda g: lumped_law(g, k, rewards, accept)
    )
    values = {}
    if reward is not None:
        values["reward"] = r
        values["exp_reward"] = np.exp(r - r.max())
    if good is not None:
        values["good_mass"] = good.astype(np.float64)
    out = {}
    for name, v in values.items():
        out[name] = v[b][0] + (v[a][0] - v[b][0]) * mean
        out[f"{name}_sd"] = abs(v[a][0] - v[b][0]) * np.sqrt(var)  # per chain
    return out
