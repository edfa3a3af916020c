"""Decoding: greedy, sampling and beam search against ``transformers``' PyTorch ``generate``.

Checkpoints are random OPTs built by ``transformers`` (float32), saved with ``save_pretrained``
and loaded by our converter. The final LayerNorm bias is pushed towards the EOS embedding so
that EOS is a plausible token and the EOS paths of beam search are exercised (each case states
whether it must see an EOS, so a case cannot silently test nothing).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from collapse_jax.core.errors import ConfigError  # noqa: E402
from collapse_jax.families.lm import decoding  # noqa: E402
from collapse_jax.families.lm.opt import OPTForCausalLM  # noqa: E402
from collapse_jax.families.lm.opt_weights import load_pretrained  # noqa: E402

PAD, BOS, EOS = 1, 2, 3
MAX_NEW = 16


def _make_checkpoint(directory, seed: int, eos_bias: float, **overrides):
    """A random ``transformers`` OPT saved to ``directory``; returns the torch model."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        dropout=0.0,
        init_std=0.1,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=BOS,
    )
    kwargs.update(overrides)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**kwargs)).eval()
    with torch.no_grad():
        decoder = hf.model.decoder
        eos_row = decoder.embed_tokens.weight[EOS]
        if decoder.project_out is not None:  # 350m-style: the head acts after project_out
            eos_row = eos_row @ decoder.project_out.weight
        last_norm = decoder.final_layer_norm if decoder.final_layer_norm is not None else None
        if last_norm is None:
            last_norm = decoder.layers[-1].final_layer_norm
        last_norm.bias += eos_bias * eos_row / eos_row.norm()
    hf.save_pretrained(directory)
    return hf


def _prompts(seed: int, lengths, vocab: int):
    """Left-padded prompts ``[BOS, random tokens...]`` of the given lengths."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), PAD, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = np.concatenate([[BOS], rng.integers(EOS + 1, vocab, n - 1)])
        mask[i, t - n :] = 1
    return ids, mask


@dataclasses.dataclass
class Setup:
    hf: object
    model: OPTForCausalLM
    params: dict
    ids: np.ndarray
    mask: np.ndarray


def _setup(directory, seed, eos_bias, lengths, **overrides) -> Setup:
    hf = _make_checkpoint(directory, seed, eos_bias, **overrides)
    config, params = load_pretrained(directory)
    ids, mask = _prompts(seed, lengths, config.vocab_size)
    return Setup(hf, OPTForCausalLM(config), jax.device_put(params), ids, mask)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("tiny_opt"), 0, 2.0, [9, 5, 7, 3])


def _hf_generate(setup: Setup, **kwargs):
    with torch.no_grad():
        return setup.hf.generate(
            torch.tensor(setup.ids),
            attention_mask=torch.tensor(setup.mask),
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )


def _assert_same_tokens(ours: decoding.GenerateOutput, hf_sequences: np.ndarray, pad: int):
    """Hugging Face crops its output to the longest returned sequence; ours is static."""
    width = hf_sequences.shape[1]
    ours_seq = np.asarray(ours.sequences)
    np.testing.assert_array_equal(ours_seq[:, :width], hf_sequences)
    assert np.all(ours_seq[:, width:] == pad)
    t = ours_seq.shape[1] - ours.new_tokens.shape[1]
    # num_new_tokens: EOS (when present) is the last new token of the row
    new = ours_seq[:, t:]
    for row, n in zip(new, np.asarray(ours.num_new_tokens), strict=True):
        assert np.all(row[n:] == pad)
        if n < new.shape[1]:
            assert row[n - 1] == EOS


BEAM_CASES = [
    # (settings, EOS must appear in Hugging Face's output)
    (dict(), True),
    (dict(min_new_tokens=MAX_NEW), False),  # the paper's setting: exactly MAX_NEW new tokens
    (dict(length_penalty=0.5, early_stopping=True), True),
    (dict(length_penalty=-0.7), True),
    (dict(length_penalty=1.5, early_stopping="never", num_return_sequences=5), True),
    (dict(num_return_sequences=3), True),
    (dict(repetition_penalty=2.0, min_new_tokens=MAX_NEW), False),  # the paper's other setting
    (dict(repetition_penalty=1.3, min_new_tokens=4), True),
]


@pytest.mark.parametrize(("settings", "expect_eos"), BEAM_CASES, ids=lambda v: str(v))
def test_beam_search_matches_transformers(tiny, settings, expect_eos):
    kwargs = dict(max_new_tokens=MAX_NEW, num_beams=5, eos_token_id=EOS, pad_token_id=PAD)
    kwargs.update(settings)
    ref = _hf_generate(tiny, do_sample=False, **kwargs)
    ours = decoding.generate(tiny.model, tiny.params, tiny.ids, tiny.mask, **kwargs)
    hf_seq = ref.sequences.numpy()
    t = tiny.ids.shape[1]
    assert bool(np.any(hf_seq[:, t:] == EOS)) == expect_eos
    if not expect_eos:
        assert hf_seq.shape[1] == t + MAX_NEW
    _assert_same_tokens(ours, hf_seq, PAD)
    # the scores are sums of MAX_NEW float32 log-probabilities (times L**-length_penalty):
    # equal up to float32 rounding of the two implementations
    np.testing.assert_allclose(
        np.asarray(ours.sequences_scores), ref.sequences_scores.numpy(), rtol=MAX_NEW * 2e-7
    )


def test_greedy_matches_transformers(tiny):
    for settings in (dict(), dict(repetition_penalty=1.5, min_new_tokens=6)):
        kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=PAD, **settings)
        ref = _hf_generate(tiny, do_sample=False, **kwargs).sequences.numpy()
        ours = decoding.generate(tiny.model, tiny.params, tiny.ids, tiny.mask, **kwargs)
        assert np.any(ref[:, tiny.ids.shape[1] :] == EOS)  # some rows stop early
        _assert_same_tokens(ours, ref, PAD)
        assert ours.sequences_scores is None


def test_sampling_with_one_candidate_is_greedy(tiny):
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=PAD)
    greedy = decoding.generate(tiny.model, tiny.params, tiny.ids, tiny.mask, **kwargs)
    sampled = decoding.generate(
        tiny.model,
        tiny.params,
        tiny.ids,
        tiny.mask,
        do_sample=True,
        top_k=1,
        temperature=0.7,
        key=jax.random.key(3),
        **kwargs,
    )
    np.testing.assert_array_equal(np.asarray(sampled.sequences), np.asarray(greedy.sequences))


def test_beam_sampling_at_low_temperature_is_beam_search(tiny):
    """Temperature τ scales every processed log-probability by 1/τ, which leaves the ranking of
    candidates and hypotheses unchanged; at τ = 1e-5 the score gaps (≳ 1e-2/τ) dwarf the Gumbel
    noise, so beam sampling must return the beam-search tokens."""
    kwargs = dict(max_new_tokens=MAX_NEW, num_beams=5, eos_token_id=EOS, pad_token_id=PAD)
    searched = decoding.generate(tiny.model, tiny.params, tiny.ids, tiny.mask, **kwargs)
    sampled = decoding.generate(
        tiny.model,
        tiny.params,
        tiny.ids,
        tiny.mask,
        do_sample=True,
        temperature=1e-5,
        key=jax.random.key(1),
        **kwargs,
    )
    np.testing.assert_array_equal(np.asarray(sampled.sequences), np.asarray(searched.sequences))


def test_sampled_first_token_follows_warped_distribution(tiny):
    """n draws of the first new token vs Hugging Face's processed probabilities (temperature,
    top-k, top-p): |frequency − p| < 4·sqrt(p(1 − p)/n) for every token (binomial stderr)."""
    n, temperature, top_k, top_p = 4000, 0.8, 8, 0.5
    ids, mask = tiny.ids[:1], tiny.mask[:1]
    out = decoding.generate(
        tiny.model,
        tiny.params,
        ids,
        mask,
        max_new_tokens=1,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_return_sequences=n,
        eos_token_id=EOS,
        pad_token_id=PAD,
        key=jax.random.key(0),
    )
    with torch.no_grad():
        logits = tiny.hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, -1]
    warped = transformers.TemperatureLogitsWarper(temperature)(None, logits)
    warped = transformers.TopKLogitsWarper(top_k)(None, warped)
    warped = transformers.TopPLogitsWarper(top_p)(None, warped)
    p = torch.softmax(warped, -1)[0].numpy().astype(np.float64)
    counts = np.bincount(np.asarray(out.new_tokens)[:, 0], minlength=p.size)
    assert 2 <= np.count_nonzero(p) < top_k  # both warpers removed tokens
    assert np.all(counts[p == 0] == 0)
    freq = counts / n
    np.testing.assert_array_less(np.abs(freq - p), 4 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_sampled_two_token_continuations_follow_transformers_joint_law(tiny):
    """Multi-step sampling (the cache path of step 2 included) against the exact joint law of
    the first two new tokens from Hugging Face's model and warpers: p(t1)·p(t2 | t1), each
    step's probabilities processed by temperature, top-k and top-p, EOS ending the row.
    n draws: |frequency − p| < 4·sqrt(p(1 − p)/n) for every pair (binomial stderr)."""
    n, temperature, top_k, top_p = 6000, 0.2, 6, 0.9
    ids, mask = tiny.ids[:1], tiny.mask[:1]
    out = decoding.generate(
        tiny.model,
        tiny.params,
        ids,
        mask,
        max_new_tokens=2,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_return_sequences=n,
        eos_token_id=EOS,
        pad_token_id=PAD,
        key=jax.random.key(5),
    )

    def warped_probs(prefix):
        with torch.no_grad():
            t = torch.tensor(prefix)
            logits = tiny.hf(t, attention_mask=torch.ones_like(t)).logits[:, -1]
        w = transformers.TemperatureLogitsWarper(temperature)(None, logits)
        w = transformers.TopKLogitsWarper(top_k)(None, w)
        w = transformers.TopPLogitsWarper(top_p)(None, w)
        return torch.softmax(w, -1)[0].numpy().astype(np.float64)

    prompt = ids[:, mask[0] == 1]
    p1 = warped_probs(prompt)
    joint = {}
    for t1 in np.nonzero(p1)[0]:
        if t1 == EOS:
            joint[(EOS, PAD)] = p1[t1]
            continue
        p2 = warped_probs(np.concatenate([prompt, [[t1]]], axis=1))
        for t2 in np.nonzero(p2)[0]:
            joint[(int(t1), int(t2))] = p1[t1] * p2[t2]
    assert len(joint) > 6 and abs(sum(joint.values()) - 1) < 1e-6  # two steps of real choice
    pairs = [tuple(int(v) for v in row) for row in np.asarray(out.new_tokens)[:, :2]]
    assert set(pairs) <= set(joint), set(pairs) - set(joint)
    counts = {k: 0 for k in joint}
    for pair in pairs:
        counts[pair] += 1
    p = np.array(list(joint.values()))
    freq = np.array([counts[k] for k in joint]) / n
    np.testing.assert_array_less(np.abs(freq - p), 4 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_warpers_match_transformers():
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal((6, 50))).astype(np.float32)
    logits[0, :5] = 4.0  # a tie at the top-k boundary is kept, as Hugging Face keeps it
    scores = torch.tensor(logits)
    for top_k, keep in ((1, 1), (5, 1), (3, 2), (1, 4), (80, 1)):
        ref = transformers.TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(None, scores)
        ours = decoding.top_k_filter(jnp.asarray(logits), top_k, keep)
        np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    for top_p, keep in ((0.05, 1), (0.3, 1), (0.9, 1), (0.9, 3), (0.5, 2)):
        ref = transformers.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(None, scores)
        ours = decoding.top_p_filter(jnp.asarray(logits), jnp.float32(1 - top_p), keep)
        np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    ids = torch.tensor(rng.integers(0, 50, (6, 7)))
    seen = np.zeros((6, 50), bool)
    np.put_along_axis(seen, ids.numpy(), True, axis=1)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.7)(ids, scores)
    ours = decoding.repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), jnp.float32(1.7))
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


@dataclasses.dataclass(frozen=True, eq=False)
class CountingDecoder:
    """An OPT decoder that counts how often its step is traced."""

    inner: decoding.OPTDecoder
    traces: list = dataclasses.field(default_factory=list)

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    def init_cache(self, batch, max_length):
        return self.inner.init_cache(batch, max_length)

    def step(self, params, input_ids, attention_mask, position_ids, cache):
        self.traces.append(input_ids.shape)
        return self.inner.step(params, input_ids, attention_mask, position_ids, cache)

    def reorder_cache(self, cache, index, start=0):
        return self.inner.reorder_cache(cache, index, start)


def test_second_call_does_not_recompile(tiny):
    counting = CountingDecoder(decoding.OPTDecoder(tiny.model))
    kwargs = dict(max_new_tokens=4, num_beams=3, eos_token_id=EOS, pad_token_id=PAD)
    first = decoding.generate(counting, tiny.params, tiny.ids, tiny.mask, **kwargs)
    traced = len(counting.traces)
    assert traced > 0
    other_ids = np.where(tiny.mask == 1, (tiny.ids + 7) % 90 + 4, PAD)
    other_ids[:, -1] = BOS
    # new prompts, penalties and stopping rule: same compiled program
    second = decoding.generate(
        counting,
        tiny.params,
        other_ids,
        tiny.mask,
        length_penalty=0.3,
        early_stopping=True,
        min_new_tokens=2,
        num_return_sequences=2,
        **kwargs,
    )
    assert len(counting.traces) == traced
    assert second.sequences.shape == (2 * tiny.ids.shape[0], tiny.ids.shape[1] + 4)
    assert not np.array_equal(np.asarray(first.new_tokens[::2]), np.asarray(second.new_tokens))


def test_bad_inputs_raise_config_error(tiny):
    kwargs = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    right_padded = tiny.mask[:, ::-1]
    with pytest.raises(ConfigError, match="left-padded"):
        decoding.generate(tiny.model, tiny.params, tiny.ids, right_padded, **kwargs)
    with pytest.raises(ConfigError, match="num_return_sequences"):
        decoding.generate(
            tiny.model,
            tiny.params,
            tiny.ids,
            tiny.mask,
            num_beams=2,
            num_return_sequences=3,
            **kwargs,
        )
    with pytest.raises(ConfigError, match="PRNG key"):
        decoding.generate(tiny.model, tiny.params, tiny.ids, tiny.mask, do_sample=True, **kwargs)
    with pytest.raises(ConfigError, match="early_stopping"):
        decoding.generate(
            tiny.model,
            tiny.params,
            tiny.ids,
            tiny.mask,
            num_beams=2,
            early_stopping="yes",
            **kwargs,
        )
    with pytest.raises(ConfigError, match="top_p"):
        decoding.generate(tiny.model, tiny.params, tiny.ids, tiny.mask, top_p=1.5, **kwargs)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        decoding.generate(
            tiny.model,
            tiny.params,
            tiny.ids,
            tiny.mask,
            max_new_tokens=0,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )


def test_beam_search_matches_transformers_350m_style(tmp_path):
    """Post-LayerNorm with project_in/out (OPT-350m's layout), longer prompts and vocabulary."""
    setup = _setup(
        tmp_path,
        5,
        1.5,
        [12, 20, 4],
        vocab_size=256,
        hidden_size=48,
        word_embed_proj_dim=24,
        ffn_dim=96,
        num_attention_heads=6,
        num_hidden_layers=2,
        do_layer_norm_before=False,
    )
    kwargs = dict(max_new_tokens=MAX_NEW, num_beams=5, eos_token_id=EOS, pad_token_id=PAD)
    ref = _hf_generate(setup, do_sample=False, **kwargs)
    ours = decoding.generate(setup.model, setup.params, setup.ids, setup.mask, **kwargs)
    assert np.any(ref.sequences.numpy()[:, setup.ids.shape[1] :] == EOS)
    _assert_same_tokens(ours, ref.sequences.numpy(), PAD)


@pytest.mark.shared_data
def test_beam_search_matches_transformers_opt125m_width(shared_data, tmp_path):
    """OPT-125m's config.json (vocabulary 50272, width 768, 12 heads) cut to 2 layers, in the
    paper's setting: 5 beams, min_new_tokens = max_new_tokens, repetition penalty 2."""
    import json

    raw = json.loads((shared_data / "opt-125m-config" / "config.json").read_text())
    raw.update(num_hidden_layers=2, dropout=0.0, torch_dtype="float32")
    raw = {k: v for k, v in raw.items() if not k.startswith("_name")}
    torch.manual_seed(7)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**raw)).eval()
    hf.save_pretrained(tmp_path)
    config, params = load_pretrained(tmp_path)
    ids, mask = _prompts(7, [12, 7], config.vocab_size)
    setup = Setup(hf, OPTForCausalLM(config), jax.device_put(params), ids, mask)
    kwargs = dict(
        max_new_tokens=6,
        min_new_tokens=6,
        num_beams=5,
        repetition_penalty=2.0,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    ref = _hf_generate(setup, do_sample=False, **kwargs)
    ours = decoding.generate(setup.model, setup.params, ids, mask, **kwargs)
    np.testing.assert_array_equal(np.asarray(ours.sequences), ref.sequences.numpy())
