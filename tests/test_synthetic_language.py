"""The hidden-Markov source: exact likelihood, marginals, sampling, lost tail mass, tokenizer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax.core.errors import ConfigError
from collapse_jax.families.lm import synthetic_language as sl

TINY = sl.SourceConfig(vocab_size=3, n_states=2, seed=3)


def _brute_prob(source, seq):
    """p(seq) by summing over every hidden path (no forward recursion)."""
    mu = np.exp(np.asarray(source.log_init, np.float64))
    a = np.exp(np.asarray(source.log_trans, np.float64))
    b = np.exp(np.asarray(source.log_emit, np.float64))
    total = 0.0
    for path in itertools.product(range(len(mu)), repeat=len(seq)):
        p = mu[path[0]] * b[path[0], seq[0]]
        for t in range(1, len(seq)):
            p *= a[path[t - 1], path[t]] * b[path[t], seq[t]]
        total += p
    return total


def test_forward_algorithm_equals_sum_over_hidden_paths_and_normalises():
    source = sl.make_source(TINY)
    seqs = np.array(list(itertools.product(range(3), repeat=4)), np.int32)
    ll = np.asarray(sl.log_likelihood(source, jnp.asarray(seqs)), np.float64)
    brute = np.array([_brute_prob(source, s) for s in seqs])
    np.testing.assert_allclose(np.exp(ll), brute, rtol=2e-5)
    assert np.exp(ll).sum() == pytest.approx(1.0, abs=1e-5)


def test_conditional_likelihood_and_special_tokens():
    source = sl.make_source(TINY)
    x = jnp.asarray([[0, 2, 1, 1, 0]], jnp.int32)
    cond = sl.conditional_log_likelihood(source, x[:, :2], x[:, 2:])
    joint = sl.log_likelihood(source, x)
    np.testing.assert_allclose(cond, joint - sl.log_likelihood(source, x[:, :2]), rtol=1e-6)
    bad = sl.log_likelihood(source, jnp.asarray([[0, 3, 1]], jnp.int32))  # 3 = <pad>
    assert np.isneginf(np.asarray(bad)[0])


def test_marginals_are_exact_sums_over_sequences():
    source = sl.make_source(TINY)
    seqs = np.array(list(itertools.product(range(3), repeat=3)), np.int32)
    p = np.exp(np.asarray(sl.log_likelihood(source, jnp.asarray(seqs)), np.float64))
    uni = np.asarray(sl.unigram_marginal(source))
    bi = np.asarray(sl.bigram_marginal(source))
    for t in range(3):  # stationary: every position has the same marginal
        np.testing.assert_allclose([p[seqs[:, t] == v].sum() for v in range(3)], uni, atol=1e-6)
    for t in range(2):
        got = np.array(
            [
                [p[(seqs[:, t] == u) & (seqs[:, t + 1] == v)].sum() for v in range(3)]
                for u in range(3)
            ]
        )
        np.testing.assert_allclose(got, bi, atol=1e-6)


def test_sampler_frequencies_agree_with_marginal_within_mc_error():
    config = sl.SourceConfig(vocab_size=8, n_states=3, seed=1)
    source = sl.make_source(config)
    tokens = np.asarray(sl.sample(jax.random.key(0), source, 2000, 16))
    uni = np.asarray(sl.unigram_marginal(source), np.float64)
    # Indicator means per sequence are i.i.d. over sequences: stderr from the sample itself.
    per_seq = np.stack([(tokens == v).mean(1) for v in range(8)], 1)
    mean = per_seq.mean(0)
    stderr = per_seq.std(0, ddof=1) / np.sqrt(per_seq.shape[0])
    assert np.all(np.abs(mean - uni) < 4 * stderr + 1e-12)
    # The mean exact NLL of samples is finite and sensible (no special ids sampled).
    ll = np.asarray(sl.log_likelihood(source, jnp.asarray(tokens[:50])))
    assert np.all(np.isfinite(ll))


def test_source_is_zipfian_with_a_tail():
    source = sl.make_source(sl.SourceConfig(vocab_size=128, n_states=8))
    uni = np.asarray(sl.unigram_marginal(source), np.float64)
    assert uni.sum() == pytest.approx(1.0, abs=1e-5)
    tail = sl.tail_set(uni, 0.1)
    assert uni[tail].sum() <= 0.1 + 1e-9 and tail.sum() > 30  # many rare words hold 10% mass
    assert uni.max() > 20 * np.median(uni)


def test_lost_mass_and_tail_stats_are_exact():
    source = sl.make_source(TINY)
    uni = np.asarray(sl.unigram_marginal(source), np.float64)
    bi = np.asarray(sl.bigram_marginal(source), np.float64)
    data = np.array([[0, 0, 1], [1, 0, 0]])
    stats = sl.tail_stats(source, data, tail_mass=0.0)
    assert stats.unigram_lost_mass == pytest.approx(uni[2])
    seen = {(0, 0), (0, 1), (1, 0)}
    lost = sum(bi[u, v] for u in range(3) for v in range(3) if (u, v) not in seen)
    assert stats.bigram_lost_mass == pytest.approx(lost)
    want = -np.asarray(sl.log_likelihood(source, jnp.asarray(data, jnp.int32))) / 3
    np.testing.assert_allclose(stats.true_nll, want, rtol=1e-6)
    assert stats.invalid_fraction == 0.0 and stats.tail_frequency == 0.0
    with pytest.raises(ConfigError, match="do not match"):
        sl.lost_mass(np.zeros(4), uni)


def test_tokenizer_round_trip_and_config_errors(tmp_path):
    tok = sl.make_tokenizer(10)
    assert len(tok) == 10 + sl.N_SPECIAL
    ids = tok("w3 w9 w0", add_special_tokens=False)["input_ids"]
    assert ids == [3, 9, 0] and sl.decode(ids) == "w3 w9 w0"
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (10, 11, 12)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again("w3 w9 w0", add_special_tokens=False)["input_ids"] == ids
    with pytest.raises(ConfigError, match="stickiness"):
        sl.SourceConfig(stickiness=1.5)
    with pytest.raises(ConfigError, match="vocab_size"):
        sl.SourceConfig(vocab_size=1)


def test_make_corpus_is_deterministic():
    config = sl.SourceConfig(vocab_size=16)
    a = sl.make_corpus(jax.random.key(5), config, 8, 4, 2, 3)
    b = sl.make_corpus(jax.random.key(5), config, 8, 4, 2, 3)
    np.testing.assert_array_equal(a.train, b.train)
    assert a.train.shape == (4, 8) and a.validation.shape == (2, 8) and a.test.shape == (3, 8)
    assert not np.array_equal(a.train[:2], a.validation)
