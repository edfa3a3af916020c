"""Text metrics of generated token data: per-sequence perplexity, repetition, diversity, and
histogram helpers for the per-sequence perplexity panels.

All functions take NumPy token arrays of shape (sequences, length) and run on the host: they
are integer counting (``np.unique`` over n-gram rows), which NumPy does well and which has no
fixed output shape to jit.

Definitions (n-grams are contiguous windows inside one sequence; a sequence of length L has
L - n + 1 of them):

* repeated n-gram fraction of a sequence = 1 - (#distinct n-grams) / (#n-grams), the fraction
  of its n-gram occurrences that repeat an earlier one (0 for no repetition; close to 1 for a
  loop such as "the the the ...");
* distinct-n of a set of sequences = (#distinct n-grams over the set) / (#n-grams over the set)
  (Li et al. 2016, "A diversity-promoting objective function for neural conversation models");
* per-sequence perplexity = exp(mean NLL per predicted token) of that sequence.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int

from collapse_jax.core.errors import ConfigError, check_int


def perplexity(nll: Float[np.ndarray, "..."]) -> Float[np.ndarray, "..."]:
    """exp of a mean NLL per token (nats); float64 so that large values do not overflow early."""
    return np.exp(np.asarray(nll, np.float64))


def sequence_nll(
    token_nll: Float[np.ndarray, "n length"], mask: Float[np.ndarray, "n length"] | None = None
) -> Float[np.ndarray, " n"]:
    """Mean NLL per counted token of each sequence: sum(nll * mask) / sum(mask)."""
    token_nll = np.asarray(token_nll, np.float64)
    if mask is None:
        return token_nll.mean(axis=1)
    mask = np.asarray(mask, np.float64)
    if mask.shape != token_nll.shape:
        raise ConfigError(f"mask shape {mask.shape} differs from token NLL shape {token_nll.shape}")
    count = mask.sum(axis=1)
    if np.any(count == 0):
        raise ConfigError(f"sequence {int(np.argmax(count == 0))} has no counted token")
    return (token_nll * mask).sum(axis=1) / count


def _windows(tokens: np.ndarray, n: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ConfigError(f"token array must be 2-D (sequences, length), got shape {tokens.shape}")
    n = check_int("n-gram order", n, 1)
    if n > tokens.shape[1]:
        raise ConfigError(f"n-gram order {n} exceeds the sequence length {tokens.shape[1]}")
    return np.lib.stride_tricks.sliding_window_view(tokens, n, axis=1)  # (seqs, L-n+1, n)


def _ngram_ids(tokens: np.ndarray, n: int) -> np.ndarray:
    """An integer id per n-gram occurrence, equal ids = equal n-grams; shape (seqs, L-n+1)."""
    w = _windows(tokens, n)
    flat = w.reshape(-1, n)
    _, ids = np.unique(flat, axis=0, return_inverse=True)
    return ids.reshape(w.shape[:2])


def repeated_ngram_fraction(
    tokens: Int[np.ndarray, "n length"], n: int = 4
) -> Float[np.ndarray, " n"]:
    """Per sequence, 1 - distinct n-grams / n-grams (module docstring)."""
    ids = _ngram_ids(tokens, n)
    seqs, per = ids.shape
    key = np.arange(seqs, dtype=np.int64)[:, None] * (int(ids.max()) + 1) + ids
    uniq = np.unique(key.ravel())
    distinct = np.bincount(uniq // (int(ids.max()) + 1), minlength=seqs)
    return 1.0 - distinct / per


def distinct_n(tokens: Int[np.ndarray, "n length"], n: int = 2) -> float:
    """Distinct n-grams over the whole set divided by the number of n-gram occurrences."""
    ids = _ngram_ids(tokens, n)
    return float(np.unique(ids).size / ids.size)


# --------------------------------------------------------------------------------------------
# Histograms for the per-sequence perplexity panels


def log_bins(values, n_bins: int = 40, quantiles: tuple = (0.0, 0.995)) -> np.ndarray:
    """Log-spaced bin edges shared by one array or a list of arrays of positive values.

    The range covers the given quantiles of all finite values pooled, so that a few extreme
    sequences do not squash the panel; values outside fall in the first/last bin.
    """
    n_bins = check_int("histogram bins", n_bins, 1)
    rows = values if isinstance(values, list | tuple) else [values]
    pooled = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in rows])
    pooled = pooled[np.isfinite(pooled) & (pooled > 0)]
    if pooled.size == 0:
        raise ConfigError("no finite positive values to histogram")
    lo, hi = np.quantile(pooled, quantiles)
    if hi <= lo:
        lo, hi = lo * 0.9, lo * 1.1 + 1e-12
    return np.geomspace(lo, hi, n_bins + 1)


def histogram(values: np.ndarray, edges: np.ndarray, density: bool = True) -> np.ndarray:
    """Counts (or a density over log-width bins) of ``values`` in ``edges``, clipped into range.

    With ``density`` the result integrates to 1 over log(x): counts / (total * dlog x).
    """
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    v = np.clip(v, edges[0], edges[-1])
    counts, _ = np.histogram(v, edges)
    if not density:
        return counts.astype(np.float64)
    widths = np.diff(np.log(edges))
    return counts / max(v.size, 1) / widths


def histograms(rows: list[np.ndarray], edges: np.ndarray, density: bool = True) -> np.ndarray:
    """Stack :func:`histogram` of several arrays: shape (len(rows), bins)."""
    return np.stack([histogram(r, edges, density) for r in rows])
