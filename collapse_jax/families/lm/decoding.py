"""Jitted decoding for causal language models: greedy, sampling and beam search with the exact
semantics of Hugging Face ``transformers`` ``generate`` (version 5), over a KV cache.

Everything is written against a small *decoder* interface (``vocab_size``, ``init_cache``,
``step``, ``reorder_cache``: :class:`Decoder`), so any causal LM with a KV cache can be decoded;
:class:`OPTDecoder` adapts our OPT port.

Shapes are static: a batch of ``B`` left-padded prompts of length ``T`` always produces
``[B·R, T + max_new_tokens]`` tokens, finished sequences padded with ``pad_token_id``. One call
compiles once per (shape, number of beams, max_new_tokens, sampling warpers in use, EOS/pad ids);
everything else (temperature, top-p, repetition and length penalties, min_new_tokens,
early_stopping, num_return_sequences) is traced or applied outside, so sweeping it does not
recompile. The prompt is encoded once
(prefill), then a ``lax.while_loop`` runs one cached decoding step per new token and stops as
soon as Hugging Face's stopping rule says so.

Semantics reproduced from ``transformers.generation`` (``utils.py`` ``_sample``,
``beam_search`` and helpers; ``logits_process.py``):

* logits processors, in Hugging Face's order: ``RepetitionPenaltyLogitsProcessor`` (tokens of
  the prompt, left padding excluded, and generated so far: ``s < 0 ? s·θ : s/θ``),
  ``MinNewTokensLengthLogitsProcessor`` (EOS set to −∞ while fewer than ``min_new_tokens`` new
  tokens exist), then for sampling ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
  ``TopPLogitsWarper`` (with ``min_tokens_to_keep = 1``, or ``#EOS + 1`` in beam sampling);
* greedy/sampling: processors act on the raw logits; finished rows emit ``pad_token_id``;
* beam search: processors act on ``log_softmax(logits)``; the running score of a candidate is the
  sum of processed log-probabilities; the best ``max(2, 1 + #EOS)·num_beams`` candidates are kept
  (the first beam alone is live at the first step); candidates ending in EOS (or at
  ``max_new_tokens``) among the first ``num_beams`` become finished hypotheses scored
  ``score / L**length_penalty`` with ``L`` the number of new tokens including EOS; the other
  candidates continue; ``early_stopping`` ∈ {True, False, "never"} decides, through Hugging
  Face's heuristic, when a prompt's finished hypotheses can no longer improve; the output is the
  ``num_return_sequences`` best finished hypotheses.

Two deliberate differences: finished beams are always padded with ``pad_token_id`` (Hugging
Face pads with EOS when ``pad_token_id`` is 0), and random draws come from JAX keys (sampling by
``jax.random.categorical``; beam sampling by Gumbel-top-k, which has the law of
``torch.multinomial`` without replacement), so sampled tokens follow the same distribution but
not the same random stream.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from collapse_jax.core.errors import ConfigError, check_float, check_int
from collapse_jax.families.lm import opt
from collapse_jax.families.lm.opt import OPTForCausalLM
from collapse_jax.families.lm.search import (
    Decoder,
    DynamicSettings,
    GenerateOutput,
    Prompt,
    StaticSettings,
    beam_search,
    gather_cache_rows,
    repetition_penalty,
    sample_search,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "Decoder",
    "GenerateOutput",
    "OPTDecoder",
    "as_decoder",
    "gather_cache_rows",
    "generate",
    "generate_fn",
    "repetition_penalty",
    "top_k_filter",
    "top_p_filter",
]


@dataclasses.dataclass(frozen=True)
class OPTDecoder:
    """Adapter from :class:`collapse_jax.families.lm.opt.OPTForCausalLM` to :class:`Decoder`.

    Hashable (a frozen dataclass of the Flax module, itself a dataclass of its config), so jitted
    decoders are cached per model architecture, not per parameter values.
    """

    module: Any  # an OPTForCausalLM instance
    cache_dtype: Any = None  # KV cache dtype; None = the module's compute dtype (float32 default)

    @property
    def vocab_size(self) -> int:
        return self.module.config.vocab_size

    def init_cache(self, batch: int, max_length: int):
        dtype = self.cache_dtype
        if dtype is None:
            dtype = getattr(self.module, "dtype", None) or jnp.float32
        return opt.init_cache(self.module.config, batch, max_length, dtype)

    def step(self, params, input_ids, attention_mask, position_ids, cache):
        variables = params if "params" in params else {"params": params}
        return self.module.apply(
            variables, input_ids, attention_mask, position_ids, cache=cache, deterministic=True
        )

    def reorder_cache(self, cache, index, start: int = 0):
        """Gather the beams' rows; slots before ``start`` (the prompt, the same in every beam of
        a prompt) stay in place, which halves the copying in the paper's 64 + 64 setting."""
        if start <= 0 or start >= cache.keys.shape[2]:
            return opt.reorder_cache(cache, index)

        def tail(x):
            moved = jnp.take(x[:, :, start:], index, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(x, moved, start, axis=2)

        return opt.KVCache(tail(cache.keys), tail(cache.values), cache.index)


def as_decoder(model) -> Decoder:
    """Return ``model`` if it already is a :class:`Decoder`, or wrap an OPT module."""
    if all(hasattr(model, name) for name in ("vocab_size", "init_cache", "step", "reorder_cache")):
        return model
    if isinstance(model, OPTForCausalLM):
        return OPTDecoder(model)
    raise ConfigError(
        f"cannot decode with {type(model).__name__}: pass an OPTForCausalLM or an object with "
        "vocab_size, init_cache, step and reorder_cache"
    )


# --------------------------------------------------------------------------------------------
# Entry points


@functools.lru_cache(maxsize=64)
def _compiled(decoder: Decoder, static: StaticSettings):
    """One jitted decoder per (model architecture, static setting); jit keys shapes itself.

    Returns ``(tokens, lengths, scores)``: beam search gives all ``num_beams`` finished
    hypotheses per prompt (``[B, K, M]``, ``[B, K]``, ``[B, K]``, best first), so the number
    returned is chosen outside without recompiling; greedy/sampling give ``[N, M]``, ``[N]``,
    None.
    """

    def run(params, input_ids, attention_mask, dyn, key):
        mask = attention_mask.astype(jnp.int32)
        prompt = Prompt(input_ids, mask, jnp.sum(mask, axis=1))
        search = beam_search if static.num_beams > 1 else sample_search
        return search(decoder, params, prompt, static, dyn, key)

    return jax.jit(run)


def _token_ids(name: str, value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return (check_int(name, value, 0),)
    try:
        ids = tuple(check_int(name, v, 0) for v in value)
    except TypeError:
        raise ConfigError(
            f"{name} must be an integer or a list of integers, got {value!r}"
        ) from None
    return ids


def _power_table(n_max: int, exponent: float, fixed: int | None = None) -> np.ndarray:
    """float32(n ** exponent) for n = 0..n_max as Python computes it (float64), or the constant
    float32(fixed ** exponent) when ``fixed`` is given; entry 0 is unused (set to 1)."""
    values = [1.0] + [
        float((fixed if fixed is not None else n) ** exponent) for n in range(1, n_max + 1)
    ]
    return np.asarray(values, dtype=np.float32)


def generate_fn(
    model,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
):
    """Validate the settings once and return ``fn(params, input_ids, attention_mask, key=None)
    -> GenerateOutput``, a jitted decoder (see :func:`generate` for the arguments)."""
    decoder = as_decoder(model)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    min_new_tokens = check_int("min_new_tokens", min_new_tokens, 0)
    num_beams = check_int("num_beams", num_beams, 1)
    top_k = check_int("top_k", top_k, 0)
    num_return_sequences = check_int("num_return_sequences", num_return_sequences, 1)
    temperature = check_float("temperature", temperature, 0.0, open_min=True)
    top_p = check_float("top_p", top_p, 0.0, 1.0)
    repetition_penalty = check_float("repetition_penalty", repetition_penalty, 0.0, open_min=True)
    length_penalty = check_float("length_penalty", length_penalty)
    if not isinstance(do_sample, bool):
        raise ConfigError(f"do_sample must be True or False, got {do_sample!r}")
    if early_stopping not in (True, False, "never"):
        raise ConfigError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    eos = _token_ids("eos_token_id", eos_token_id)
    if pad_token_id is None:
        if not eos:
            raise ConfigError("pad_token_id is required when there is no eos_token_id")
        pad_token_id = eos[0]
    pad_token_id = check_int("pad_token_id", pad_token_id, 0)
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ConfigError(
            f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})"
        )
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ConfigError(
            f"greedy search returns one sequence per prompt, got num_return_sequences="
            f"{num_return_sequences}; use sampling or beam search"
        )
    static = StaticSettings(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        top_k=top_k,
        use_temperature=temperature != 1.0,
        use_top_p=top_p < 1.0,
        eos_token_ids=eos,
        pad_token_id=pad_token_id,
        # Hugging Face keeps #EOS + 1 tokens in beam sampling so a non-EOS continuation exists
        min_tokens_to_keep=(len(eos) + 1 if eos else 2) if num_beams > 1 else 1,
    )
    never = early_stopping == "never" and length_penalty > 0.0
    dyn = DynamicSettings(
        min_new_tokens=jnp.int32(min_new_tokens),
        early_stopping=jnp.bool_(early_stopping is True),
        temperature=jnp.float32(temperature),
        top_p_threshold=jnp.float32(1.0 - top_p),
        repetition_penalty=jnp.float32(repetition_penalty),
        length_norm=jnp.asarray(_power_table(max_new_tokens, length_penalty)),
        heuristic_norm=jnp.asarray(
            _power_table(max_new_tokens, length_penalty, max_new_tokens if never else None)
        ),
    )
    compiled = _compiled(decoder, static)
    r = num_return_sequences

    def fn(params, input_ids, attention_mask=None, key=None) -> GenerateOutput:
        input_ids, attention_mask = _check_prompts(input_ids, attention_mask)
        if do_sample and key is None:
            raise ConfigError("sampling (do_sample=True) needs a PRNG key")
        if key is None:
            key = jax.random.key(0)  # unused by greedy and beam search
        prompts = jnp.repeat(input_ids, r, axis=0)
        if num_beams == 1:
            # R samples per prompt: the prompt repeated R times (Hugging Face's expansion)
            masks = jnp.repeat(attention_mask, r, axis=0)
            tokens, lengths, scores = compiled(params, prompts, masks, dyn, key)
        else:
            tokens, lengths, scores = compiled(params, input_ids, attention_mask, dyn, key)
            tokens = tokens[:, :r].reshape(-1, max_new_tokens)
            lengths = lengths[:, :r].reshape(-1)
            scores = scores[:, :r].reshape(-1)
        tokens = tokens.astype(input_ids.dtype)
        sequences = jnp.concatenate([prompts, tokens], axis=1)
        return GenerateOutput(sequences, tokens, lengths, scores)

    return fn


def _check_prompts(input_ids, attention_mask):
    """Validate a batch of left-padded prompts on the host (shape, padding side)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ConfigError(f"input_ids must have shape [batch, length], got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"input_ids must be integers, got dtype {ids.dtype}")
    if attention_mask is None:
        attention_mask = np.ones_like(ids)
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ConfigError(
            f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}"
        )
    mask = mask.astype(np.int32)
    if np.any((mask != 0) & (mask != 1)):
        raise ConfigError("attention_mask must hold only 0 and 1")
    if np.any(np.diff(mask, axis=1) < 0):
        row = int(np.argmax(np.any(np.diff(mask, axis=1) < 0, axis=1)))
        raise ConfigError(f"prompt {row} is not left-padded (attention_mask has 0 after 1)")
    if np.any(mask.sum(axis=1) == 0):
        row = int(np.argmax(mask.sum(axis=1) == 0))
        raise ConfigError(f"prompt {row} is empty (its attention_mask is all 0)")
    return jnp.asarray(input_ids), jnp.asarray(mask)


def generate(
    model,
    params,
    input_ids: Int[Array, "b t"],
    attention_mask: Int[Array, "b t"] | None = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    key=None,
) -> GenerateOutput:
    """Generate continuations of a batch of left-padded prompts, as Hugging Face's
    ``model.generate`` does with the same settings.

    Args:
        model: an ``OPTForCausalLM`` module or any :class:`Decoder`.
        params: the model parameters (``{"params": ...}`` or the inner dict).
        input_ids: ``[B, T]`` prompts, left-padded.
        attention_mask: ``[B, T]`` 1 for prompt tokens, 0 for left padding (None: no padding).
        max_new_tokens: number of new tokens (the output always has room for that many).
        min_new_tokens: EOS is forbidden until this many new tokens exist.
        num_beams: 1 = greedy search or sampling; > 1 = beam search (beam sampling if
            ``do_sample``).
        do_sample: draw tokens (with ``key``) instead of taking the best.
        temperature, top_k, top_p: sampling warpers (ignored without ``do_sample``).
        repetition_penalty: θ of ``RepetitionPenaltyLogitsProcessor`` (1 = off).
        length_penalty: exponent of the hypothesis length in beam scores.
        early_stopping: beam search stopping rule: True, False (heuristic) or "never".
        num_return_sequences: R sequences per prompt (best R beams, or R samples).
        eos_token_id: one id or a list of ids that end a sequence; None for none.
        pad_token_id: fills rows after their EOS (default: the first EOS id).
        key: a PRNG key, required when sampling.

    Returns:
        :class:`GenerateOutput` with ``sequences[B·R, T + max_new_tokens]``.
    """
    fn = generate_fn(
        model,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return fn(params, input_ids, attention_mask, key)
