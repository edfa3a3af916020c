"""A synthetic language from a known source: a hidden Markov model with Zipfian emissions.

Text from a known source lets the language-model regime measure what no real corpus allows:
the *true* log-likelihood of generated text and the *true* probability mass of the tails a
generation has lost.

The source has S hidden states and V word tokens. The hidden chain starts in its stationary
distribution mu (mu A = mu) and moves with the transition matrix A; state s emits token v with
probability B[s, v]. Emissions are a Zipf law pi0(v) ∝ (v + 1)^(-a) perturbed per state by a
log-normal factor, so the language has a head of frequent words and a long tail of rare ones,
and context (the hidden state) matters: with the default parameters the entropy rate is about
2.2 nats per word against 3.3 nats for the unigram distribution alone, and the rarest 96 of 128
words hold 10% of the mass. Because the chain is stationary, the marginal of every
position is the same:

    P(x_t = v) = sum_s mu_s B[s, v]                                   (unigram marginal)
    P(x_t = u, x_{t+1} = v) = sum_{s,s'} mu_s B[s, u] A[s, s'] B[s', v]   (bigram marginal)

and the exact log-likelihood of any token sequence is the forward algorithm (Rabiner 1989,
eq. 19-21) in log space:

    alpha_1(s) = log mu_s + log B[s, x_1]
    alpha_t(s') = logsumexp_s(alpha_{t-1}(s) + log A[s, s']) + log B[s', x_t]
    log p(x_1..x_T) = logsumexp_s alpha_T(s).

The *lost tail mass* of a data set is the true probability of the unigrams (or bigrams) that
never occur in it: sum over unseen v of P(x_t = v). It is exact given the data.

Token ids 0..V-1 are the words ``w0 .. w{V-1}``; ids V, V+1, V+2 are ``<pad>``, ``</s>``
(bos/eos) and ``<unk>`` so that a standard causal LM and a Hugging Face tokenizer
(:func:`make_tokenizer`, a word-level ``tokenizers`` model, no pretrained files) can be used.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from collapse_jax.core.errors import ConfigError, check_float, check_int
from collapse_jax.numerics.random import jax_uniform

N_SPECIAL = 3  # <pad>, </s>, <unk> after the V words


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Parameters of the hidden-Markov source (all fixed by ``seed``)."""

    vocab_size: int = 128  # number of word tokens V
    n_states: int = 16  # hidden states S
    zipf_exponent: float = 1.1  # a in pi0(v) ∝ (v + 1)^(-a)
    emission_noise: float = 4.0  # sigma of the per-state log-normal perturbation of pi0
    stickiness: float = 0.0  # weight of staying in the same hidden state
    concentration: float = 0.05  # Dirichlet concentration of the rest of each transition row
    seed: int = 0  # seed of the source's parameters (not of the samples)

    def __post_init__(self):
        check_int("synthetic vocab_size", self.vocab_size, 2, 100_000)
        check_int("synthetic n_states", self.n_states, 1, 4096)
        check_float("synthetic zipf_exponent", self.zipf_exponent, 0.0)
        check_float("synthetic emission_noise", self.emission_noise, 0.0)
        check_float("synthetic stickiness", self.stickiness, 0.0, 1.0)
        check_float("synthetic concentration", self.concentration, 0.0, open_min=True)
        check_int("synthetic seed", self.seed, 0)


class HMMSource(NamedTuple):
    """Log-parameters of the source; ``log_init`` is the stationary distribution."""

    log_init: Float[Array, " state"]
    log_trans: Float[Array, "state state"]
    log_emit: Float[Array, "state token"]


def make_source(config: SourceConfig = SourceConfig()) -> HMMSource:
    """Build the source's parameters deterministically from ``config.seed`` (float64 on host).

    The parameters are drawn once with NumPy's generator (a few hundred numbers); sampling and
    likelihoods run in JAX.
    """
    rng = np.random.default_rng(config.seed)
    v, s = config.vocab_size, config.n_states
    base = -config.zipf_exponent * np.log(np.arange(1, v + 1, dtype=np.float64))
    logits = base[None, :] + rng.standard_normal((s, v)) * config.emission_noise
    log_emit = logits - _logsumexp_np(logits, axis=1)[:, None]
    dirichlet = rng.dirichlet(np.full(s, config.concentration), size=s)
    trans = config.stickiness * np.eye(s) + (1.0 - config.stickiness) * dirichlet
    trans = np.clip(trans, 1e-12, None)
    trans /= trans.sum(1, keepdims=True)
    mu = _stationary_np(trans)
    return HMMSource(
        jnp.asarray(np.log(mu), jnp.float32),
        jnp.asarray(np.log(trans), jnp.float32),
        jnp.asarray(log_emit, jnp.float32),
    )


def _logsumexp_np(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _stationary_np(trans: np.ndarray) -> np.ndarray:
    s = trans.shape[0]
    m = trans.T - np.eye(s)
    m[-1] = 1.0
    b = np.zeros(s)
    b[-1] = 1.0
    mu = np.clip(np.linalg.solve(m, b), 1e-300, None)
    return mu / mu.sum()


# --------------------------------------------------------------------------------------------
# Sampling and exact likelihood


def _inverse_cdf(cdf: Float[Array, "n k"], u: Float[Array, " n"]) -> Int[Array, " n"]:
    """Index drawn by inversion: #{k : cdf[k] <= u}, clipped to the last index."""
    idx = (cdf <= u[:, None]).sum(axis=1)
    return jnp.minimum(idx, cdf.shape[1] - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample(key: jax.Array, source: HMMSource, n: int, length: int) -> Int[Array, "n length"]:
    cdf_emit = jnp.cumsum(jnp.exp(source.log_emit), axis=1)
    cdf_trans = jnp.cumsum(jnp.exp(source.log_trans), axis=1)
    cdf_init = jnp.cumsum(jnp.exp(source.log_init))
    k0, k_steps = jax.random.split(key)
    u0 = jax.random.uniform(k0, (n,))
    s0 = _inverse_cdf(jnp.broadcast_to(cdf_init, (n, cdf_init.shape[0])), u0)

    def step(states, k):
        u = jax_uniform(k, (2, n))
        tokens = _inverse_cdf(cdf_emit[states], u[0])
        return _inverse_cdf(cdf_trans[states], u[1]), tokens

    _, tokens = jax.lax.scan(step, s0, jax.random.split(k_steps, length))
    return tokens.T


def sample(key: jax.Array, source: HMMSource, n: int, length: int) -> Int[Array, "n length"]:
    """``n`` independent token sequences of ``length`` from the stationary source.

    Hidden state s_1 ~ mu, then x_t ~ B[s_t], s_{t+1} ~ A[s_t], each by inversion of the CDF with
    one uniform per draw, for all sequences at once in one ``lax.scan`` over time.
    """
    n = check_int("number of sequences", n, 1)
    length = check_int("sequence length", length, 1)
    return _sample(key, source, n, length)


def _forward_one(source: HMMSource, tokens: Int[Array, " length"]) -> Float[Array, ""]:
    """log p(tokens) for one sequence by the forward algorithm (module docstring).

    Ids outside ``[0, V)`` (special tokens) have probability zero, so their log-likelihood is -inf.
    """
    v = source.log_emit.shape[1]
    valid = (tokens >= 0) & (tokens < v)
    safe = jnp.clip(tokens, 0, v - 1)
    emit = jnp.where(valid[:, None], source.log_emit[:, safe].T, -jnp.inf)  # (T, S)
    alpha0 = source.log_init + emit[0]

    def step(alpha, e):
        alpha = jax.nn.logsumexp(alpha[:, None] + source.log_trans, axis=0) + e
        return alpha, None

    alpha, _ = jax.lax.scan(step, alpha0, emit[1:])
    return jax.nn.logsumexp(alpha)


@jax.jit
def log_likelihood(source: HMMSource, tokens: Int[Array, "n length"]) -> Float[Array, " n"]:
    """Exact log-probability of each sequence under the source (forward algorithm)."""
    return jax.vmap(_forward_one, (None, 0))(source, tokens)


def conditional_log_likelihood(
    source: HMMSource, prefix: Int[Array, "n p"], continuation: Int[Array, "n c"]
) -> Float[Array, " n"]:
    """log p(continuation | prefix) = log p(prefix ⊕ continuation) - log p(prefix), exactly."""
    prefix, continuation = jnp.asarray(prefix), jnp.asarray(continuation)
    joint = log_likelihood(source, jnp.concatenate([prefix, continuation], axis=1))
    return joint - log_likelihood(source, prefix)


# --------------------------------------------------------------------------------------------
# Marginals and tails


def unigram_marginal(source: HMMSource) -> Float[Array, " token"]:
    """P(x_t = v) = sum_s mu_s B[s, v], the same at every position (stationary start)."""
    return jnp.exp(source.log_init) @ jnp.exp(source.log_emit)


def bigram_marginal(source: HMMSource) -> Float[Array, "token token"]:
    """P(x_t = u, x_{t+1} = v) = sum_{s,s'} mu_s B[s,u] A[s,s'] B[s',v] (module docstring)."""
    mu, a, b = jnp.exp(source.log_init), jnp.exp(source.log_trans), jnp.exp(source.log_emit)
    return (b * mu[:, None]).T @ a @ b


def tail_set(marginal: Float[Array, " token"], mass: float = 0.1) -> Bool[np.ndarray, " token"]:
    """The rarest tokens whose total probability is at most ``mass`` (the source's tail)."""
    mass = check_float("tail mass", mass, 0.0, 1.0)
    p = np.asarray(marginal, np.float64)
    order = np.argsort(p, kind="stable")
    cum = np.cumsum(p[order])
    out = np.zeros(p.shape, bool)
    out[order[cum <= mass + 1e-12]] = True
    return out


def token_counts(tokens, vocab_size: int) -> np.ndarray:
    """Counts of each word id in a token array (special ids are ignored)."""
    t = np.asarray(tokens).ravel()
    t = t[(t >= 0) & (t < vocab_size)]
    return np.bincount(t, minlength=vocab_size)


def bigram_counts(tokens, vocab_size: int) -> np.ndarray:
    """Counts of adjacent pairs (u, v) within each row of a (n, length) token array."""
    t = np.asarray(tokens)
    if t.ndim == 1:
        t = t[None]
    u, w = t[:, :-1].ravel(), t[:, 1:].ravel()
    ok = (u >= 0) & (u < vocab_size) & (w >= 0) & (w < vocab_size)
    flat = u[ok].astype(np.int64) * vocab_size + w[ok]
    return np.bincount(flat, minlength=vocab_size * vocab_size).reshape(vocab_size, vocab_size)


def lost_mass(counts: np.ndarray, marginal) -> float:
    """True probability mass of the outcomes never seen: sum over counts == 0 of the marginal."""
    p = np.asarray(marginal, np.float64)
    if p.shape != counts.shape:
        raise ConfigError(f"counts of shape {counts.shape} do not match marginal {p.shape}")
    return float(p[counts == 0].sum())


class TailStats(NamedTuple):
    """Exact source-side statistics of one data set of token sequences."""

    true_nll: np.ndarray  # per-sequence mean NLL per token under the source (nats), shape (n,)
    unigram_lost_mass: float  # true mass of word tokens absent from the data
    bigram_lost_mass: float  # true mass of adjacent pairs absent from the data
    tail_frequency: float  # fraction of the data's tokens that lie in the source's tail set
    invalid_fraction: float  # fraction of sequences holding a non-word id (probability 0)


def tail_stats(source: HMMSource, tokens, tail_mass: float = 0.1) -> TailStats:
    """Exact true NLL and lost tail mass of a data set (n, length) under the source."""
    tokens = np.asarray(tokens)
    v = source.log_emit.shape[1]
    ll = np.asarray(log_likelihood(source, jnp.asarray(tokens, jnp.int32)), np.float64)
    nll = -ll / tokens.shape[1]
    p1 = np.asarray(unigram_marginal(source), np.float64)
    p2 = np.asarray(bigram_marginal(source), np.float64)
    tail = tail_set(p1, tail_mass)
    words = tokens[(tokens >= 0) & (tokens < v)]
    return TailStats(
        true_nll=nll,
        unigram_lost_mass=lost_mass(token_counts(tokens, v), p1),
        bigram_lost_mass=lost_mass(bigram_counts(tokens, v), p2),
        tail_frequency=float(tail[words].mean()) if words.size else float("nan"),
        invalid_fraction=float(np.mean(~np.isfinite(nll))),
    )


# --------------------------------------------------------------------------------------------
# Tokenizer and corpus


def word(i: int) -> str:
    return f"w{i}"


def make_tokenizer(vocab_size: int) -> Any:
    """A Hugging Face fast tokenizer for the synthetic words (no pretrained files needed).

    Ids 0..V-1 are ``w0..w{V-1}``, then ``<pad>``, ``</s>`` (bos and eos), ``<unk>``; text is
    words separated by spaces. ``save_pretrained`` makes it loadable with ``AutoTokenizer``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    v = check_int("synthetic vocab_size", vocab_size, 2)
    vocab = {word(i): i for i in range(v)}
    vocab.update({"<pad>": v, "</s>": v + 1, "<unk>": v + 2})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=False,
    )


def decode(tokens) -> str:
    """Text of a token sequence: words separated by spaces, specials in angle brackets."""
    names = []
    for t in np.asarray(tokens).ravel().tolist():
        names.append(word(t) if t >= 0 else f"<{t}>")
    return " ".join(names)


class SyntheticCorpus(NamedTuple):
    """Train / validation / test blocks sampled from a source, plus the source itself."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    source: HMMSource
    config: SourceConfig


def make_corpus(
    key: jax.Array,
    config: SourceConfig,
    block_size: int,
    n_train: int,
    n_validation: int,
    n_test: int,
) -> SyntheticCorpus:
    """Sample independent stationary blocks of ``block_size`` tokens for the three splits."""
    for name, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        check_int(f"synthetic {name} blocks", n, 1)
    source = make_source(config)
    tokens = np.asarray(sample(key, source, n_train + n_validation + n_test, block_size), np.int32)
    split = np.split(tokens, [n_train, n_train + n_validation])
    return SyntheticCorpus(*split, source, config)
