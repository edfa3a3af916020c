"""The binomial law and the Wright–Fisher transition matrix of the closed forms (NumPy, exact):
a count c of m items becomes Binomial(m', c / m) of the next m' items. Shared by the discrete
study (a state's count) and the KDE study (a D0 point's descendants)."""

from __future__ import annotations

import math

import numpy as np


def _log_factorial(x: np.ndarray) -> np.ndarray:
    """log(x!) of integer-valued x >= 0, from a table of ``math.lgamma`` (the same values as
    ``scipy.special.gammaln(x + 1)``, without importing SciPy); entries < 0 read log(0!)."""
    top = int(np.max(x, initial=0))
    table = np.array([math.lgamma(i + 1.0) for i in range(top + 1)])
    return table[np.clip(x, 0, top).astype(np.int64)]


def binom_pmf(k, n, p) -> np.ndarray:
    """P(Bin(n, p) = k), broadcast over the arguments (k = 0..n integers; p in [0, 1]).

    Written out from log-factorials rather than ``scipy.stats.binom.pmf``: importing
    ``scipy.stats`` takes about 0.6 s, a tenth of a warm discrete run, whose closed forms use
    this every time, and ``scipy.special`` 0.1 s. Relative error about 1e-12 for n <= 2000,
    growing with the log-factorial terms (1.3e4 there); tested against SciPy's.
    """
    k, n, p = np.asarray(k, np.float64), np.asarray(n, np.float64), np.asarray(p, np.float64)
    if not (np.all(k == np.round(k)) and np.all(n == np.round(n))):
        raise ValueError("binom_pmf needs integer k and n")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pmf = (
            _log_factorial(n)
            - _log_factorial(k)
            - _log_factorial(n - k)
            + np.where(k == 0, 0.0, k * np.log(p))  # xlogy(k, p)
            + np.where(n - k == 0, 0.0, (n - k) * np.log1p(-p))  # xlog1py(n - k, -p)
        )
    return np.where((k >= 0) & (k <= n), np.exp(log_pmf), 0.0)


def binomial_transition(m_from: int, m_to: int) -> np.ndarray:
    """T[c, c'] = P(Bin(m_to, c / m_from) = c'), shape (m_from + 1, m_to + 1): the Wright–Fisher
    step from c of m_from items to c' of m_to (a state's count, a lineage's descendants)."""
    c = np.arange(m_from + 1)[:, None] / m_from
    return binom_pmf(np.arange(m_to + 1)[None, :], m_to, c)
