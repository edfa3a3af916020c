"""Text metrics: repetition, distinct-n, per-sequence NLL, histogram helpers."""

import numpy as np
import pytest

from collapse_jax.core.errors import ConfigError
from collapse_jax.families.lm import text_metrics as text


def _brute_repeated(seq, n):
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return 1 - len(set(grams)) / len(grams)


def test_repeated_ngram_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, size=(7, 20))
    tokens[0] = 3  # a loop: one distinct n-gram
    for n in (1, 2, 3):
        got = text.repeated_ngram_fraction(tokens, n)
        want = [_brute_repeated(list(s), n) for s in tokens]
        np.testing.assert_allclose(got, want)
    assert text.repeated_ngram_fraction(np.arange(10)[None], 2)[0] == 0.0
    assert text.repeated_ngram_fraction(tokens, 2)[0] == pytest.approx(1 - 1 / 19)


def test_distinct_n_matches_brute_force():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 5, size=(6, 12))
    for n in (1, 2, 4):
        grams = [tuple(s[i : i + n]) for s in tokens for i in range(12 - n + 1)]
        assert text.distinct_n(tokens, n) == pytest.approx(len(set(grams)) / len(grams))


def test_ngram_order_errors():
    with pytest.raises(ConfigError, match="exceeds the sequence length"):
        text.distinct_n(np.zeros((2, 3), int), 4)
    with pytest.raises(ConfigError, match="2-D"):
        text.distinct_n(np.zeros(3, int), 1)


def test_sequence_nll_and_perplexity():
    nll = np.array([[1.0, 3.0, 5.0], [2.0, 2.0, 9.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    np.testing.assert_allclose(text.sequence_nll(nll, mask), [3.0, 2.0])
    np.testing.assert_allclose(text.perplexity(text.sequence_nll(nll)), np.exp([3.0, 13 / 3]))
    with pytest.raises(ConfigError, match="no counted token"):
        text.sequence_nll(nll, np.zeros_like(mask))


def test_histograms_share_log_bins_and_integrate_to_one():
    rng = np.random.default_rng(2)
    rows = [np.exp(rng.normal(m, 0.5, 500)) for m in (2.0, 3.0)]
    edges = text.log_bins(rows, 30, quantiles=(0.0, 1.0))
    assert edges.shape == (31,) and edges[0] == pytest.approx(min(r.min() for r in rows))
    h = text.histograms(rows, edges)
    np.testing.assert_allclose((h * np.diff(np.log(edges))).sum(1), 1.0)
    counts = text.histogram(np.array([1e-9, 1e9, np.inf]), edges, density=False)
    assert counts[0] == 1 and counts[-1] == 1 and counts.sum() == 2
