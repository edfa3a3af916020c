"""Metrics of the language-model study assembled from its work directory, and the summary
(mean ± standard error over seeds via :func:`collapse_jax.core.statistics.chain_stats`)."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from collapse_jax.core import operators
from collapse_jax.core.runs import (
    series,
    write_arrays,
)
from collapse_jax.core.statistics import chain_stats
from collapse_jax.families.lm import synthetic_language as sl
from collapse_jax.families.lm import text_metrics as tm
from collapse_jax.families.lm import training as lt
from collapse_jax.families.lm.config import DISTINCT_N, NAME, OPERATORS, REPEAT_N, Config, Setup
from collapse_jax.families.lm.generations import Regime, load_model

# --------------------------------------------------------------------------------------------
# Metrics assembled from the work directory


def collect(regime: Regime, seeds: list[int]) -> dict[str, np.ndarray]:
    """All per-generation metrics as arrays (arms × seeds × generations, and histograms)."""
    lt.sync("collect")
    c, s = regime.config, regime.setup
    G, A, S = c.generations, len(c.fresh_fractions), len(seeds)
    test_ppl = np.zeros((A, S, G + 1))
    val_loss = np.zeros((A, S, G + 1))
    best_epoch = np.zeros((A, S, G + 1), np.int64)
    rep_frac = np.full((A, S, G + 1), np.nan)
    distinct = np.full((A, S, G + 1, len(DISTINCT_N)), np.nan)
    gen_nll = [[[] for _ in range(G)] for _ in range(A)]  # model g's data scored by gen 0
    test_nll_seq = np.zeros((A, S, G + 1, len(s.test)))
    cont = np.zeros((A, G + 1, len(s.prompts), c.block_size), np.int32)
    real_scored = []
    synth = s.source is not None
    if synth:
        true_nll = np.full((A, S, G + 1), np.nan)
        true_cond = np.full((A, S, G + 1), np.nan)
        uni_lost = np.full((A, S, G + 1), np.nan)
        bi_lost = np.full((A, S, G + 1), np.nan)
        tail_freq = np.full((A, S, G + 1), np.nan)
        invalid = np.full((A, S, G + 1), np.nan)
    for si, seed in enumerate(seeds):
        gen0 = lt.device_params(load_model(regime.gen_dir(seed, None, 0) / "model"))
        nll, cnt = lt.score_blocks(s.model_config, gen0, s.train, c.eval_batch_size, regime.dtype)
        real_scored.append(nll / cnt)
        for a in range(A):
            for g in range(G + 1):
                arm = None if g == 0 else a
                d = regime.gen_dir(seed, arm, g)
                with np.load(d / "eval.npz") as z:
                    test_nll_seq[a, si, g] = z["test_nll_sum"] / z["test_count"]
                    test_ppl[a, si, g] = math.exp(lt.corpus_nll(z["test_nll_sum"], z["test_count"]))
                    val_loss[a, si, g] = z["val_loss"][int(z["best_epoch"]) - 1]
                    best_epoch[a, si, g] = int(z["best_epoch"])
                if si == 0 and len(s.prompts):
                    cont[a, g] = np.load(d / "prompts_generated.npy")
                if g == G:
                    continue
                data = regime.generated(seed, arm, g)
                scores_path = d / "scored_by_gen0.npz"
                if scores_path.exists():
                    with np.load(scores_path) as z:
                        gnll, gcnt = z["nll_sum"], z["count"]
                else:
                    gnll, gcnt = lt.score_blocks(
                        s.model_config, gen0, data, c.eval_batch_size, regime.dtype
                    )
                    if lt.is_main():
                        write_arrays(scores_path, nll_sum=gnll, count=gcnt)
                gen_nll[a][g].append(gnll / gcnt)
                rep_frac[a, si, g] = float(tm.repeated_ngram_fraction(data, REPEAT_N).mean())
                for j, n in enumerate(DISTINCT_N):
                    distinct[a, si, g, j] = tm.distinct_n(data, n)
                if synth:
                    st = sl.tail_stats(s.source, data, c.tail_mass)
                    true_nll[a, si, g] = float(np.mean(st.true_nll))
                    cond = (
                        -np.asarray(
                            sl.conditional_log_likelihood(
                                s.source, jnp.asarray(s.train), jnp.asarray(data)
                            )
                        )
                        / c.block_size
                    )
                    true_cond[a, si, g] = float(np.mean(cond))
                    uni_lost[a, si, g] = st.unigram_lost_mass
                    bi_lost[a, si, g] = st.bigram_lost_mass
                    tail_freq[a, si, g] = st.tail_frequency
                    invalid[a, si, g] = st.invalid_fraction
    real_ppl = np.exp(np.concatenate(real_scored))
    real_test_ppl = np.exp(test_nll_seq[0, :, 0].ravel())
    gen_ppl = [[np.exp(np.concatenate(gen_nll[a][g])) for g in range(G)] for a in range(A)]
    rows = [real_ppl] + [x for arm_rows in gen_ppl for x in arm_rows]
    edges = tm.log_bins(rows, 40)
    hist = (
        np.stack([tm.histograms(gen_ppl[a], edges) for a in range(A)])
        if G
        else np.zeros((A, 0, 40))
    )
    out = {
        "generation": np.arange(G + 1),
        "fresh_fractions": np.asarray(c.fresh_fractions, np.float64),
        "seeds": np.asarray(seeds),
        "test_perplexity": test_ppl,
        "test_nll_per_sequence": test_nll_seq,
        "val_loss": val_loss,
        "best_epoch": best_epoch,
        "repeated_ngram_fraction": rep_frac,
        "distinct_n": distinct,
        "distinct_n_orders": np.asarray(DISTINCT_N),
        "hist_edges": edges,
        "hist_generated": hist,  # (arms, generations 0..G-1, bins): model g's data, by gen 0
        "hist_real_train": tm.histogram(real_ppl, edges),
        "hist_real_test": tm.histogram(real_test_ppl, edges),
        "real_train_perplexity_by_gen0": real_ppl,
        "real_repeated_ngram_fraction": np.float64(
            tm.repeated_ngram_fraction(s.train, REPEAT_N).mean()
        ),
        "real_distinct_n": np.asarray([tm.distinct_n(s.train, n) for n in DISTINCT_N]),
        "prompts": s.prompts,
        "continuations": cont,  # (arms, generations, prompts, block), seed 0
    }
    for a in range(A):
        for g in range(G):
            out[f"generated_perplexity_by_gen0_arm{a}_gen{g}"] = gen_ppl[a][g]
    if synth:
        st = sl.tail_stats(s.source, s.train, c.tail_mass)
        test_true = sl.tail_stats(s.source, s.test, c.tail_mass).true_nll
        out.update(
            true_nll_generated=true_nll,
            true_conditional_nll_generated=true_cond,
            unigram_lost_mass=uni_lost,
            bigram_lost_mass=bi_lost,
            tail_frequency=tail_freq,
            invalid_fraction=invalid,
            real_true_nll=np.float64(np.mean(st.true_nll)),
            real_unigram_lost_mass=np.float64(st.unigram_lost_mass),
            real_bigram_lost_mass=np.float64(st.bigram_lost_mass),
            real_tail_frequency=np.float64(st.tail_frequency),
            test_true_nll_per_sequence=test_true,
            source_test_perplexity=np.float64(_source_perplexity(s.source, s.test)),
            source_tail_mass=np.float64(
                np.asarray(sl.unigram_marginal(s.source))[
                    sl.tail_set(sl.unigram_marginal(s.source), c.tail_mass)
                ].sum()
            ),
        )
    return out


def _source_perplexity(source, blocks: np.ndarray) -> float:
    """The true source's perplexity on the scored targets of ``blocks`` (tokens 2..T given their
    prefix): exp(sum_b [log p(x_1) - log p(x_1..x_T)] / (n (T - 1))), exact by the forward
    algorithm; no model can do better in expectation."""

    ll = np.asarray(sl.log_likelihood(source, jnp.asarray(blocks)), np.float64)
    first = np.log(np.asarray(sl.unigram_marginal(source), np.float64))[blocks[:, 0]]
    return math.exp(float((first - ll).sum()) / (blocks.shape[0] * (blocks.shape[1] - 1)))


def mean_stderr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over seeds (axis 0) of the finite entries
    (:func:`~collapse_jax.core.statistics.chain_stats`; all-NaN entries stay NaN)."""
    st = chain_stats(np.asarray(x, np.float32))
    return np.asarray(st.mean, np.float64), np.asarray(st.stderr, np.float64)


#: A change counts as shown beyond this many standard errors over seeds (neural regimes run a
#: handful of seeds; the VAE study uses the same threshold).
Z_SHOWN = 2.0


def perplexity_claim(change: float, stderr: float, seeds: int, last: int) -> dict:
    """The paper's claim that test perplexity rises over generations, judged by the paired
    change over seeds from generation 0 to ``last``: "yes" / "no" beyond :data:`Z_SHOWN`
    standard errors of the right / wrong sign, "not shown at this length" in between, and no
    verdict from one seed (no standard error)."""
    if seeds < 2:
        verdict = "one seed: no standard error"
    elif change > Z_SHOWN * stderr:
        verdict = "yes"
    elif change < -Z_SHOWN * stderr:
        verdict = "no"
    else:
        verdict = "not shown at this length"
    return {
        "claim": f"test perplexity rises, generation 0 → {last}",
        "change": change,
        "stderr": stderr,
        "seeds": seeds,
        "z": change / stderr if stderr > 0 else None,
        "verdict": verdict,
    }


def summarize(config: Config, setup: Setup, arrays: dict) -> dict:
    """summary.json: per-arm series (mean ± stderr over seeds) and the headline changes."""
    gens = arrays["generation"]
    out: dict[str, Any] = {
        "study": NAME,
        "corpus": setup.corpus_source,
        "operators": operators.parse(config, NAME, OPERATORS, sequences=True).describe(),
        "model": config.model,
        "seconds": float(arrays["seconds"]),
        "arms": [],
    }
    for a, f in enumerate(config.fresh_fractions):
        arm: dict[str, Any] = {"fresh_fraction": f}
        ppl = arrays["test_perplexity"][a]
        arm["test_perplexity"] = series(gens, *mean_stderr(ppl))
        change = ppl[:, -1] - ppl[:, 0]
        m, se = mean_stderr(change[:, None])
        arm["perplexity_change"] = {"mean": float(m[0]), "stderr": float(se[0])}
        arm["claims"] = [perplexity_claim(float(m[0]), float(se[0]), ppl.shape[0], int(gens[-1]))]
        arm["repeated_ngram_fraction"] = series(
            gens, *mean_stderr(arrays["repeated_ngram_fraction"][a])
        )
        arm["distinct_2"] = series(gens, *mean_stderr(arrays["distinct_n"][a, :, :, 1]))
        if "true_nll_generated" in arrays:
            for key in (
                "true_nll_generated",
                "unigram_lost_mass",
                "bigram_lost_mass",
                "tail_frequency",
            ):
                arm[key] = series(gens, *mean_stderr(arrays[key][a]))
        out["arms"].append(arm)
    for a, f in enumerate(config.fresh_fractions):
        out[f"test_perplexity_fresh{f:g}"] = out["arms"][a]["test_perplexity"]
    return out
