"""Closed forms of the regression recursion (derivations: ``theory/regression.md``).

Generation n is the n-th fitted model; ``sizes[i]`` = M_i rows fit generation i + 1. Rows are
N(0, Σ), so XᵀX = Σ^{1/2} W Σ^{1/2} with W ~ Wishart(M, I_d) and
E tr(Σ (XᵀX)⁻¹) = E tr W⁻¹ = d / (M − d − 1) whatever Σ is.
"""

from __future__ import annotations

import numpy as np


def inverse_wishart_trace(d: int, m) -> np.ndarray:
    """E tr W⁻¹ for W ~ Wishart(m, I_d): d / (m − d − 1) (infinite for m <= d + 1)."""
    m = np.asarray(m, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(m > d + 1, d / np.maximum(m - d - 1, 1e-300), np.inf)


def ols_replace(generations, sizes, d: int, noise: float) -> np.ndarray:
    """E‖ŵ_n − w*‖²_Σ under replace (OLS, fixed or fresh design, any schedule):
    σ² Σ_{i<n} d / (M_i − d − 1). With M_i = T₀ for i < n − 1 and M_{n−1} = T this is
    Dohmatob et al.'s test error of a model fitted to T samples after n − 1 generations of T₀."""
    per_gen = noise**2 * inverse_wishart_trace(d, np.asarray(sizes, np.float64))
    cum = np.concatenate([[0.0], np.cumsum(per_gen)])
    return cum[np.asarray(generations)]


def ols_replace_train_loss(generations, sizes, d: int, noise: float) -> np.ndarray:
    """E[training loss] of generation n >= 1 under OLS replace: the residual of the fit to
    M_{n−1} rows is (I − P)ε, so E = σ²(M_{n−1} − d)/M_{n−1} (generation 0: σ², w*'s residual)."""
    m = np.asarray(sizes, np.float64)
    per_gen = np.concatenate([[noise**2], noise**2 * (m - d) / m])
    return per_gen[np.asarray(generations)]


def ols_accumulate(generations, m: int, d: int, noise: float) -> np.ndarray:
    """E‖ŵ_n − w*‖²_Σ under accumulate with a fixed design of M rows relabelled every
    generation (OLS): σ² d/(M − d − 1) · Σ_{i≤n} 1/i², bounded by π²/6 times the first
    generation's error."""
    g = np.asarray(generations)
    inv_sq = np.concatenate([[0.0], 1.0 / np.arange(1, int(g.max()) + 1, dtype=np.float64) ** 2])
    return noise**2 * float(inverse_wishart_trace(d, m)) * np.cumsum(inv_sq)[g]


def replace_given_design(
    generations,
    gram,
    model_gram,
    w_star,
    scale,
    ridge: float,
    noise: float,
    shift=None,
    wrong_gram_first=None,
    wrong_gram=None,
):
    """E[‖ŵ_n − w*‖²_Σ | X] under replace or a fresh fraction γ of real labels, fixed design:
    the rows of Gram S_m are relabelled by the model, the others by w* (γ = 0: S_m = 0 at
    generation 1, S afterwards), except the rows of Gram S₂ (S₂⁽¹⁾ at generation 1), labelled
    by the wrong model w₂ = w* + Δ (``shift``; strong model collapse).

    e_n = ŵ_n − w* follows e_{n+1} = A e_n + c_n + B ε with A = (S + λI)⁻¹S_m,
    c_n = (S + λI)⁻¹(S₂ Δ − λ w*), B Bᵀ = (S + λI)⁻¹S(S + λI)⁻¹ and e_0 = 0, so its mean m and
    covariance V obey m_{n+1} = A m_n + c_n, V_{n+1} = A V_n Aᵀ + σ² B Bᵀ and
    E[‖e_n‖²_Σ | X] = m_nᵀ Σ m_n + tr(Σ V_n). Returns (chains, generations).
    """
    gram = np.asarray(gram, np.float64)
    chains, d, _ = gram.shape
    inv = np.linalg.inv(gram + ridge * np.eye(d))
    a = inv @ np.asarray(model_gram, np.float64)
    c = -ridge * inv @ np.asarray(w_star, np.float64)
    c_first = c
    if shift is not None:
        delta = np.asarray(shift, np.float64)
        c_first = c + np.einsum("cjk,ckl,l->cj", inv, np.asarray(wrong_gram_first), delta)
        c = c + np.einsum("cjk,ckl,l->cj", inv, np.asarray(wrong_gram), delta)
    bbt = inv @ gram @ inv
    sig = np.asarray(scale, np.float64) ** 2
    g = np.asarray(generations)
    out = np.zeros((chains, len(g)))
    m = np.zeros((chains, d))
    v = np.zeros((chains, d, d))
    want = {int(n): i for i, n in enumerate(g)}
    for n in range(int(g.max()) + 1):
        if n in want:
            out[:, want[n]] = np.einsum("cj,j,cj->c", m, sig, m) + np.einsum("j,cjj->c", sig, v)
        m = np.einsum("cjk,ck->cj", a, m) + (c_first if n == 0 else c)
        v = a @ v @ np.swapaxes(a, 1, 2) + noise**2 * bbt
    return out


def strong_collapse_floor(fraction: float, shift, scale) -> float:
    """The T → ∞ limit of the first fit's excess risk when a fraction p₂ of its labels come from
    w₂ = w* + Δ (Dohmatob et al., strong model collapse): ŵ → (1 − p₂) w* + p₂ w₂, so
    ‖ŵ − w*‖²_Σ → p₂² ‖Δ‖²_Σ."""
    return float(fraction**2 * np.sum((np.asarray(scale) * np.asarray(shift)) ** 2))
