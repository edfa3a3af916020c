"""The decoding loops behind :mod:`collapse_jax.families.lm.decoding`: the :class:`Decoder`
interface, Hugging Face's logits processors, the cached prefill/feed steps, and the greedy /
sampling and beam searches (see that module for the semantics reproduced)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# Hugging Face's "very large negative" score for impossible beams (a float, not -inf, so that sums
# stay comparable); reproduced exactly because it decides which slots are ever selected.
_NEG = -1.0e9


# --------------------------------------------------------------------------------------------
# The decoder interface


class Decoder(Protocol):
    """What decoding needs from a causal LM with a KV cache.

    ``vocab_size`` is the number of logits per position.
    ``step(params, input_ids[N,S], attention_mask[N,L], position_ids[N,S], cache)`` feeds ``S``
    new tokens per row into the cache (whose ``L`` slots hold the whole prompt + generation) and
    returns ``(logits[N,S,V], cache)``; ``attention_mask`` marks the cache slots that may be
    attended (1) — padding and slots not yet written are 0. ``init_cache(batch, max_length)``
    returns an empty cache. ``reorder_cache(cache, index[N'], start)`` selects rows of the cache
    (beam reordering); slots before ``start`` are known to be equal in the rows exchanged (the
    shared prompt) and may be left in place. :func:`gather_cache_rows` reorders caches whose
    arrays carry the batch axis first.
    """

    vocab_size: int  # number of logits per position

    def init_cache(self, batch: int, max_length: int) -> Any: ...

    def step(self, params, input_ids, attention_mask, position_ids, cache) -> tuple[Array, Any]: ...

    def reorder_cache(self, cache, index, start: int = 0) -> Any: ...


def gather_cache_rows(cache, index: Int[Array, " n"], batch: int, start: int = 0):
    """Select rows ``index`` of every cache array whose leading axis is the batch (size
    ``batch``); other leaves (e.g. a shared write index) are kept as they are. ``start`` is
    accepted for the :class:`Decoder` signature; every slot is gathered."""
    del start

    def take(leaf):
        if hasattr(leaf, "shape") and leaf.ndim >= 1 and leaf.shape[0] == batch:
            return jnp.take(leaf, index, axis=0)
        return leaf

    return jax.tree_util.tree_map(take, cache)


# --------------------------------------------------------------------------------------------
# Settings


class GenerateOutput(NamedTuple):
    """Result of :func:`generate`; rows are prompt-major (prompt b, return sequence r → b·R + r).

    sequences: ``[B·R, T + max_new_tokens]`` prompt (left padding kept) then new tokens, padded
        with ``pad_token_id`` after EOS.
    new_tokens: ``[B·R, max_new_tokens]`` the new tokens alone.
    num_new_tokens: ``[B·R]`` how many new tokens each row has (EOS included).
    sequences_scores: ``[B·R]`` beam search only: the hypothesis score
        ``Σ log p / L**length_penalty`` (Hugging Face's ``sequences_scores``); None otherwise.
    """

    sequences: Int[Array, "rows total"]
    new_tokens: Int[Array, "rows new"]
    num_new_tokens: Int[Array, " rows"]
    sequences_scores: Float[Array, " rows"] | None


class StaticSettings(NamedTuple):
    """Settings that fix shapes or control flow (one compilation each)."""

    max_new_tokens: int
    num_beams: int
    do_sample: bool
    top_k: int  # 0 = off
    use_temperature: bool
    use_top_p: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    min_tokens_to_keep: int


class DynamicSettings(NamedTuple):
    """Numeric settings, traced (sweeping them does not recompile)."""

    min_new_tokens: Int[Array, ""]
    early_stopping: Bool[Array, ""]  # early_stopping is True (not False or "never")
    temperature: Float[Array, ""]
    top_p_threshold: Float[Array, ""]  # float32(1 - top_p), as Hugging Face compares
    repetition_penalty: Float[Array, ""]
    # float32(n ** length_penalty) for n = 0..max_new (finished-hypothesis normalisation) and the
    # early-stopping heuristic's denominator after n new tokens; computed in float64 on the host
    # as Python does in Hugging Face's code.
    length_norm: Float[Array, " new1"]
    heuristic_norm: Float[Array, " new1"]


# --------------------------------------------------------------------------------------------
# Logits processors (Hugging Face ``logits_process.py``)


def true_divide(x: Float[Array, "..."], divisor) -> Float[Array, "..."]:
    """``x / divisor`` with IEEE division. XLA rewrites a division by a broadcast scalar into a
    multiplication by its reciprocal, which is one ulp off in about a third of the cases;
    Hugging Face divides, so the divisor is materialised behind an optimisation barrier."""
    divisor = jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape)
    return x / jax.lax.optimization_barrier(divisor)


def repetition_penalty(
    scores: Float[Array, "n vocab"], seen: Bool[Array, "n vocab"], penalty
) -> Float[Array, "n vocab"]:
    """``RepetitionPenaltyLogitsProcessor``: for every token already present (``seen``),
    ``s ← s·θ`` if ``s < 0`` else ``s/θ`` (CTRL, Keskar et al. 2019, eq. in §4.1)."""
    penalised = jnp.where(scores < 0, scores * penalty, true_divide(scores, penalty))
    return jnp.where(seen, penalised, scores)


def mask_tokens(scores: Float[Array, "n vocab"], token_ids: Sequence[int], active) -> Array:
    """Set ``token_ids`` to −∞ where ``active`` (``MinNewTokensLengthLogitsProcessor``)."""
    if not token_ids:
        return scores
    is_token = jnp.isin(jnp.arange(scores.shape[-1]), jnp.asarray(token_ids))
    return jnp.where(active & is_token[None, :], -jnp.inf, scores)


def top_k_filter(
    scores: Float[Array, "n vocab"], top_k: int, min_tokens_to_keep: int = 1
) -> Float[Array, "n vocab"]:
    """``TopKLogitsWarper``: keep the scores ≥ the k-th largest, k = max(top_k, min_keep)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(
    scores: Float[Array, "n vocab"], threshold, min_tokens_to_keep: int = 1
) -> Float[Array, "n vocab"]:
    """``TopPLogitsWarper`` (nucleus, Holtzman et al. 2020): sort ascending, remove the tokens
    whose cumulative probability is ≤ ``threshold = 1 − top_p``, always keep the
    ``min_tokens_to_keep`` most likely."""
    order = jnp.argsort(scores, axis=-1)
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = cumulative <= threshold
    vocab = scores.shape[-1]
    remove_sorted = remove_sorted & (jnp.arange(vocab) < vocab - min_tokens_to_keep)[None, :]
    rows = jnp.arange(scores.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, scores)


def _process(scores, seen, t, static: StaticSettings, dyn: DynamicSettings):
    """Apply the processors in Hugging Face's order to ``scores[N, V]`` at new-token index t."""
    # θ = 1 is an exact no-op (s·1 = s/1 = s), so the penalty is always applied: one program
    # serves every θ
    scores = repetition_penalty(scores, seen, dyn.repetition_penalty)
    scores = mask_tokens(scores, static.eos_token_ids, t < dyn.min_new_tokens)
    if static.do_sample:
        if static.use_temperature:
            scores = true_divide(scores, dyn.temperature)
        if static.top_k > 0:
            scores = top_k_filter(scores, static.top_k, static.min_tokens_to_keep)
        if static.use_top_p:
            scores = top_p_filter(scores, dyn.top_p_threshold, static.min_tokens_to_keep)
    return scores


def _is_eos(tokens, eos_token_ids: tuple[int, ...]):
    if not eos_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_token_ids))


def _mark_seen(seen, tokens):
    """Set ``seen[i, tokens[i]]``."""
    return seen.at[jnp.arange(seen.shape[0]), tokens].set(True)


# --------------------------------------------------------------------------------------------
# The prompt


class Prompt(NamedTuple):
    input_ids: Int[Array, "n t"]
    mask: Int[Array, "n t"]
    n_real: Int[Array, " n"]  # number of non-padding prompt tokens


def _prefill(decoder: Decoder, params, prompt: Prompt, max_new: int):
    """Encode all prompt tokens but the last into a fresh cache (slots 0..T−2).

    The logits of this call are unused, so XLA drops its LM-head matmul (T·V·E multiply-adds per
    prompt, a third of OPT-125m's prefill); the last prompt token is fed by the first decoding
    step, which gives the logits of the first new token. Left padding makes the last column a
    real token in every row.
    """
    n, t = prompt.input_ids.shape
    cache = decoder.init_cache(n, t + max_new)
    if t > 1:
        pad = jnp.zeros((n, max_new + 1), prompt.mask.dtype)
        slot_mask = jnp.concatenate([prompt.mask[:, :-1], pad], axis=1)
        # Hugging Face's OPT positions: cumsum(mask)·mask − 1 (padding gets −1).
        positions = jnp.cumsum(prompt.mask, axis=1) * prompt.mask - 1
        _, cache = decoder.step(
            params, prompt.input_ids[:, :-1], slot_mask, positions[:, :-1], cache
        )
    return cache


def _feed(decoder: Decoder, params, prompt: Prompt, max_new: int, tokens, s, cache):
    """Decoding step ``s``: feed ``tokens`` (the last prompt token when s = 0, else new token
    s − 1) into cache slot ``T − 1 + s``; return the float32 logits of new token ``s`` and the
    cache."""
    t = prompt.mask.shape[1]
    slots = jnp.arange(t + max_new)
    written = (slots >= t) & (slots <= t - 1 + s)
    prompt_part = jnp.pad(prompt.mask, ((0, 0), (0, max_new)))
    slot_mask = jnp.where(written[None, :], 1, prompt_part).astype(prompt.mask.dtype)
    # that token follows the n_real − 1 other prompt tokens and s − 1 new tokens
    positions = (prompt.n_real - 1 + s)[:, None].astype(prompt.mask.dtype)
    logits, cache = decoder.step(params, tokens[:, None], slot_mask, positions, cache)
    return logits[:, -1, :].astype(jnp.float32), cache


def _prompt_seen(prompt: Prompt, vocab: int) -> Bool[Array, "n vocab"]:
    """Which vocabulary entries occur among the real (non-padding) prompt tokens."""
    n = prompt.input_ids.shape[0]
    counts = jnp.zeros((n, vocab), jnp.int32)
    rows = jnp.arange(n)[:, None]
    counts = counts.at[rows, prompt.input_ids].max((prompt.mask != 0).astype(jnp.int32))
    return counts > 0


# --------------------------------------------------------------------------------------------
# Greedy search and sampling (Hugging Face ``_sample``)


class _SampleState(NamedTuple):
    t: Int[Array, ""]  # number of new tokens generated so far
    tokens: Int[Array, "n new"]
    unfinished: Bool[Array, " n"]
    lengths: Int[Array, " n"]
    seen: Bool[Array, "n vocab"]  # tokens of the prompt and generated so far
    stop: Bool[Array, ""]
    next_input: Int[Array, " n"]  # the token the next decoding step feeds
    cache: Any


def _sample_select(
    state: _SampleState, logits, key, static: StaticSettings, dyn: DynamicSettings
) -> _SampleState:
    """Choose new token t for every row (argmax or a draw from the processed scores)."""
    t = state.t
    scores = _process(logits, state.seen, t, static, dyn)
    if static.do_sample:
        token = jax.random.categorical(jax.random.fold_in(key, t), scores, axis=-1)
    else:
        token = jnp.argmax(scores, axis=-1)
    token = jnp.where(state.unfinished, token, static.pad_token_id).astype(state.tokens.dtype)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], t, axis=1)
    lengths = state.lengths + state.unfinished.astype(state.lengths.dtype)
    seen = _mark_seen(state.seen, token)
    done = _is_eos(token, static.eos_token_ids) | (t + 1 >= static.max_new_tokens)
    unfinished = state.unfinished & ~done
    return state._replace(
        t=t + 1,
        tokens=tokens,
        unfinished=unfinished,
        lengths=lengths,
        seen=seen,
        stop=~jnp.any(unfinished),
        next_input=token,
    )


def sample_search(
    decoder, params, prompt: Prompt, static: StaticSettings, dyn: DynamicSettings, key
):
    n = prompt.input_ids.shape[0]
    m = static.max_new_tokens
    state = _SampleState(
        t=jnp.zeros((), jnp.int32),
        tokens=jnp.full((n, m), static.pad_token_id, prompt.input_ids.dtype),
        unfinished=jnp.ones((n,), bool),
        lengths=jnp.zeros((n,), jnp.int32),
        seen=_prompt_seen(prompt, decoder.vocab_size),
        stop=jnp.zeros((), bool),
        next_input=prompt.input_ids[:, -1],
        cache=_prefill(decoder, params, prompt, m),
    )

    def cond(state):
        return ~state.stop & (state.t < m)

    def body(state):
        logits, cache = _feed(decoder, params, prompt, m, state.next_input, state.t, state.cache)
        return _sample_select(state._replace(cache=cache), logits, key, static, dyn)

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.lengths, None


# --------------------------------------------------------------------------------------------
# Beam search (Hugging Face ``beam_search``)


class _BeamState(NamedTuple):
    t: Int[Array, ""]  # number of new tokens generated so far
    running_tokens: Int[Array, "b k new"]
    running_scores: Float[Array, "b k"]
    seen: Bool[Array, "bk vocab"]  # tokens of the prompt and generated so far
    fin_tokens: Int[Array, "b k new"]  # finished hypotheses, best first
    fin_scores: Float[Array, "b k"]
    fin_done: Bool[Array, "b k"]
    fin_len: Int[Array, "b k"]
    early_unsat: Bool[Array, " b"]  # the early-stop heuristic says the prompt can still improve
    stop: Bool[Array, ""]
    next_input: Int[Array, " bk"]  # the tokens the next decoding step feeds
    cache: Any


def _gather(x, index):
    """``x[b, index[b, j], ...]`` (Hugging Face ``_gather_beams``)."""
    index = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
    return jnp.take_along_axis(x, index, axis=1)


def _beam_select(
    state: _BeamState,
    logits,
    decoder,
    prompt_len: int,
    key,
    static: StaticSettings,
    dyn: DynamicSettings,
) -> _BeamState:
    """One beam-search step at new-token index t (Hugging Face ``beam_search`` steps b–g)."""
    b, k, m = state.running_tokens.shape
    vocab = logits.shape[-1]
    n_candidates = max(2, 1 + len(static.eos_token_ids)) * k
    t = state.t
    stop_early = dyn.early_stopping

    # b. processed log-probabilities, accumulated over each beam's history
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_probs = _process(log_probs, state.seen, t, static, dyn)
    log_probs = log_probs.reshape(b, k, vocab) + state.running_scores[:, :, None]
    log_probs = log_probs.reshape(b, k * vocab)

    # c. the best n_candidates continuations over all beams (or a draw without replacement:
    # Gumbel-top-k has the law of successive multinomial draws, as torch.multinomial makes)
    if static.do_sample:
        noise = jax.random.gumbel(jax.random.fold_in(key, t), log_probs.shape, log_probs.dtype)
        index = jax.lax.top_k(log_probs + noise, n_candidates)[1]
        top_log_probs = jnp.take_along_axis(log_probs, index, axis=1)
    else:
        top_log_probs, index = jax.lax.top_k(log_probs, n_candidates)
    source_beam = index // vocab
    token = (index % vocab).astype(state.running_tokens.dtype)
    at_t = (jnp.arange(m) == t)[None, None, :]
    candidates = jnp.where(at_t, token[:, :, None], _gather(state.running_tokens, source_beam))

    # d. which candidates stop (EOS, or the last allowed token)
    hits = _is_eos(token, static.eos_token_ids) | (t + 1 >= m)

    # e. the best num_beams candidates that do not stop continue
    running_log_probs = top_log_probs + jnp.where(hits, _NEG, 0.0)
    keep = jax.lax.top_k(running_log_probs, k)[1]
    running_tokens = _gather(candidates, keep)
    running_scores = _gather(running_log_probs, keep)
    parent = _gather(source_beam, keep)

    # f. stopping candidates among the first num_beams join the finished hypotheses
    just_finished = hits & (jnp.arange(n_candidates) < k)[None, :]
    scores = true_divide(top_log_probs, dyn.length_norm[t + 1])
    full = jnp.all(state.fin_done, axis=-1, keepdims=True) & stop_early
    scores = scores + jnp.where(full, _NEG, 0.0)
    scores = scores + jnp.where(~state.early_unsat[:, None], _NEG, 0.0)
    scores = scores + jnp.where(~just_finished, _NEG, 0.0)
    merged_scores = jnp.concatenate([state.fin_scores, scores], axis=1)
    best = jax.lax.top_k(merged_scores, k)[1]
    fin_tokens = _gather(jnp.concatenate([state.fin_tokens, candidates], axis=1), best)
    fin_scores = _gather(merged_scores, best)
    fin_done = _gather(jnp.concatenate([state.fin_done, just_finished], axis=1), best)
    new_len = jnp.full((b, n_candidates), t + 1, state.fin_len.dtype)
    fin_len = _gather(jnp.concatenate([state.fin_len, new_len], axis=1), best)

    # g. reorder the cache (and the repetition-penalty sets) to the continuing beams; stop rule
    rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
    cache = decoder.reorder_cache(state.cache, rows, prompt_len)
    next_input = running_tokens[:, :, t].reshape(-1)
    seen = _mark_seen(state.seen[rows], next_input)
    t1 = t + 1
    best_running = true_divide(running_scores[:, :1], dyn.heuristic_norm[t1])
    worst_finished = jnp.where(
        fin_done, jnp.min(fin_scores, axis=1, keepdims=True), jnp.float32(_NEG)
    )
    early_unsat = state.early_unsat & jnp.any(best_running > worst_finished, axis=-1)
    go_on = jnp.any(early_unsat) & ~(jnp.all(fin_done) & stop_early) & ~jnp.all(hits)
    return state._replace(
        t=t1,
        running_tokens=running_tokens,
        running_scores=running_scores,
        seen=seen,
        fin_tokens=fin_tokens,
        fin_scores=fin_scores,
        fin_done=fin_done,
        fin_len=fin_len,
        early_unsat=early_unsat,
        stop=~go_on,
        next_input=next_input,
        cache=cache,
    )


def beam_search(decoder, params, prompt: Prompt, static: StaticSettings, dyn: DynamicSettings, key):
    b = prompt.input_ids.shape[0]
    k, m = static.num_beams, static.max_new_tokens
    # Every beam of a prompt starts from the same prefill (encoded once, then copied).
    cache = _prefill(decoder, params, prompt, m)
    rows = jnp.repeat(jnp.arange(b), k)
    beam_prompt = Prompt(*(x[rows] for x in prompt))
    fill = jnp.full((b, k, m), static.pad_token_id, prompt.input_ids.dtype)
    state = _BeamState(
        t=jnp.zeros((), jnp.int32),
        running_tokens=fill,
        # only the first beam is live at the start, so the beams do not all pick the same token
        running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG),
        seen=_prompt_seen(beam_prompt, decoder.vocab_size),
        fin_tokens=fill,
        fin_scores=jnp.full((b, k), _NEG, jnp.float32),
        fin_done=jnp.zeros((b, k), bool),
        fin_len=jnp.zeros((b, k), jnp.int32),
        early_unsat=jnp.ones((b,), bool),
        stop=jnp.zeros((), bool),
        next_input=beam_prompt.input_ids[:, -1],
        cache=decoder.reorder_cache(cache, rows),
    )

    def cond(state):
        return ~state.stop & (state.t < m)

    def body(state):
        logits, cache = _feed(
            decoder, params, beam_prompt, m, state.next_input, state.t, state.cache
        )
        return _beam_select(
            state._replace(cache=cache), logits, decoder, prompt.mask.shape[1], key, static, dyn
        )

    state = jax.lax.while_loop(cond, body, state)
    return state.fin_tokens, state.fin_len, state.fin_scores
