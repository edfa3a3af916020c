"""Closed forms of the KDE recursion under ``replace`` with a fixed bandwidth h (derived in
``theory/kde.md``): the centres follow a Wright–Fisher genealogy, each lineage gathering
N(0, h² I) noise per generation.

Conventions: ``sizes[n]`` = M_n, the number of points of the batch B_n drawn at generation n
(B_0 = T_0, the D0 sample); under replace, model n + 1 is fitted to B_n. Generation n's points
pick their centres uniformly among the M_{n−1} points of B_{n−1}.
"""

from __future__ import annotations

import numpy as np

from collapse_jax.core.binomial import binomial_transition


def _survival(sizes: np.ndarray, n: int) -> np.ndarray:
    """S_k, k = 0..n: the probability that two distinct points of B_n have not coalesced within
    k generations back, S_k = Π_{m = n−k+1}^{n} (1 − 1/M_{m−1})."""
    sizes = np.asarray(sizes, np.float64)
    steps = 1.0 - 1.0 / sizes[:n][::-1]  # generation n, n−1, ..., 1: parents among M_{m−1}
    return np.concatenate([[1.0], np.cumprod(steps)])


def pairwise_sq_distance(
    generations, sizes, bandwidth: float, dim: int, pair0: float
) -> np.ndarray:
    """E‖X_i − X_j‖² for distinct points i ≠ j of B_n, for each n in ``generations``:

        E D_n = 2 d h² Σ_{k=0}^{n−1} S_k + S_n · P_0,

    with S_k from :func:`_survival` and P_0 = E‖X_a − X_b‖² of two distinct D0 points
    (``pair0``). For constant M this is 2 d h² M (1 − q^n) + q^n P_0, q = 1 − 1/M
    (theory/kde.md, eq. (3))."""
    out = []
    for n in np.asarray(generations, np.int64):
        s = _survival(sizes, int(n))
        out.append(2.0 * dim * bandwidth**2 * s[:-1].sum() + s[-1] * pair0)
    return np.asarray(out, np.float64)


def survival_probability(generations, sizes) -> np.ndarray:
    """P(a given D0 point of B_0 still has a descendant in B_n), exactly, by the Markov chain of
    its number of descendants c_n | c_{n−1} ~ Binomial(M_n, c_{n−1} / M_{n−1}), c_0 = 1
    (theory/kde.md, eq. (5)). Cost O(Σ M_n M_{n−1}); meant for M up to a few thousand."""
    sizes = np.asarray(sizes, np.int64)
    gens = np.asarray(generations, np.int64)
    last = int(gens.max()) if gens.size else 0
    p = np.zeros(int(sizes[0]) + 1)
    p[1] = 1.0
    alive = {0: 1.0}
    matrix, key = None, None
    for n in range(1, last + 1):
        shape = (int(sizes[n]), int(sizes[n - 1]))
        if shape != key:
            matrix, key = binomial_transition(shape[1], shape[0]), shape
        p = p @ matrix
        alive[n] = 1.0 - p[0]
    return np.asarray([alive[int(n)] for n in gens], np.float64)


def ancestors(generations, sizes) -> np.ndarray:
    """E[number of distinct D0 points of B_0 with a descendant in B_n] = M_0 · P(survival)."""
    return float(sizes[0]) * survival_probability(generations, sizes)
