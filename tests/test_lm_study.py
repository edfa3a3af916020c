"""The language-model study end to end on a shrunk synthetic configuration: files, arrays,
exact per-sequence values against `collapse-jax lm score`, and interrupt/resume."""

import dataclasses
import json

import numpy as np
import pytest

from collapse_jax.core import checkpointing
from collapse_jax.core.runs import read_arrays
from collapse_jax.families.lm import cli as lm_cli
from collapse_jax.families.lm import generations as lm_generations
from collapse_jax.families.lm import study as lm
from collapse_jax.families.lm import synthetic_language as sl

TINY = lm.Config(
    model="micro",
    block_size=8,
    synthetic_vocab=16,
    synthetic_blocks=64,
    train_blocks=16,
    eval_blocks=16,
    pretrain_blocks=16,  # pre-training = fine-tuning shapes and schedule: one compiled step
    pretrain_epochs=2,
    pretrain_learning_rate=1e-3,
    generations=2,
    epochs=2,
    seeds=1,
    fresh_fractions=(0.0,),
    batch_size=8,
    generate_batch_size=8,
    eval_batch_size=8,
    n_prompts=2,
    num_beams=2,
)
# Decoding calls of one TINY run: gen 0 prompts (1), gen 0 data (2, 3), gen 1 prompts (4),
# gen 1 data (5, 6), gen 2 prompts (7).
N_DECODE_CALLS = 7


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    summary = lm.run(TINY, out, progress=False)
    return out, summary


def test_run_writes_arrays_figures_and_report(uninterrupted):
    out, summary = uninterrupted
    for name in (
        "config.json",
        "metrics.npz",
        "summary.json",
        "report.md",
        "test_perplexity.png",
        "perplexity_histograms.png",
        "perplexity_ridgeline.png",
        "repetition_diversity.png",
        "synthetic_truth.png",
    ):
        assert (out / name).is_file(), name
    a = read_arrays(out / "metrics.npz")
    assert a["test_perplexity"].shape == (1, 1, 3)
    assert np.all(np.isfinite(a["test_perplexity"]))
    # No model beats the true source on its own text (the exact forward-algorithm perplexity of
    # the same scored targets); the tiny model is far above it (about 19.5 against 4.6).
    assert np.all(a["test_perplexity"] > a["source_test_perplexity"])
    assert a["hist_generated"].shape == (1, 2, 40)
    assert a["continuations"].shape == (1, 3, 2, 8)
    # The generated sets are token arrays on disk, one per model that generated.
    gen1 = np.load(out / "work" / "seed0" / "arm0" / "gen01" / "generated.npy")
    assert gen1.shape == (16, 8) and gen1.dtype == np.int32
    # Exact source-side metrics are recomputable from the saved tokens.
    source = sl.make_source(sl.SourceConfig(vocab_size=16, n_states=TINY.synthetic_states))
    st = sl.tail_stats(source, gen1, 0.1)
    assert a["bigram_lost_mass"][0, 0, 1] == pytest.approx(st.bigram_lost_mass)
    assert summary["arms"][0]["test_perplexity"]["generation"] == [0, 1, 2]
    assert "Continuations of fixed prompts" in (out / "report.md").read_text()


def test_per_sequence_perplexities_equal_lm_score(uninterrupted, tmp_path):
    out, _ = uninterrupted
    gen1 = np.load(out / "work" / "seed0" / "arm0" / "gen01" / "generated.npy")
    text = tmp_path / "gen1.txt"
    text.write_text("\n".join(sl.decode(row) for row in gen1) + "\n")
    scores = tmp_path / "scores.jsonl"
    model = out / "work" / "seed0" / "gen00" / "model"
    rc = lm_cli.main(
        [
            "score",
            "--model",
            str(model),
            "--text-file",
            str(text),
            "--out",
            str(scores),
            "--block-size",
            "8",
        ]
    )
    assert rc == 0
    rows = [json.loads(ln) for ln in scores.read_text().splitlines()]
    cli_ppl = np.array([r["perplexity"] for r in rows])
    assert all(r["n_tokens"] == 7 for r in rows)
    ours = read_arrays(out / "metrics.npz")["generated_perplexity_by_gen0_arm0_gen1"]
    np.testing.assert_allclose(ours, cli_ppl, rtol=1e-5)


def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    ref_out, _ = uninterrupted
    out = tmp_path / "run"

    # 1) Kill during the second epoch of generation 1's fine-tune (after its first checkpoint).
    saves = {"n": 0}
    real_save = checkpointing.Checkpointer.save

    def save_then_die(self, step, arrays, meta):
        real_save(self, step, arrays, meta)
        saves["n"] += 1
        if saves["n"] == 5:  # pre-train (2) + generation 0 (2) + generation 1, epoch 1
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        lm.run(TINY, out, progress=False)
    monkeypatch.setattr(checkpointing.Checkpointer, "save", real_save)
    assert (out / "work" / "seed0" / "arm0" / "gen01" / "ckpt").is_dir()

    # A second start without resume refuses to overwrite the run.
    with pytest.raises(lm.ConfigError, match="--resume"):
        lm.run(TINY, out, progress=False)

    # 2) Resume; kill during the generation of generation 1's data (second decoding batch).
    calls = {"n": 0}
    real_generate = lm_generations.generate_batch

    def counting(*args, die_at=None):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt
        return real_generate(*args)

    resumed = dataclasses.replace(TINY, resume=True)
    monkeypatch.setattr(lm_generations, "generate_batch", lambda *a: counting(*a, die_at=3))
    with pytest.raises(KeyboardInterrupt):
        lm.run(resumed, out, progress=False)
    # Calls so far in this attempt: gen 1 prompts, gen 1 data batch 1, batch 2 (killed).
    assert (out / "work" / "seed0" / "arm0" / "gen01" / "generated.partial.npz").is_file()

    # 3) Resume to the end: only the unfinished batch and the last prompts are decoded again.
    calls["n"] = 0
    monkeypatch.setattr(lm_generations, "generate_batch", lambda *a: counting(*a))
    lm.run(resumed, out, progress=False)
    assert calls["n"] == 2
    assert calls["n"] < N_DECODE_CALLS

    ref = read_arrays(ref_out / "metrics.npz")
    got = read_arrays(out / "metrics.npz")
    for key in (
        "test_perplexity",
        "test_nll_per_sequence",
        "val_loss",
        "continuations",
        "hist_generated",
        "true_nll_generated",
        "bigram_lost_mass",
    ):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    for g in (0, 1):
        np.testing.assert_array_equal(
            np.load(
                out / "work" / "seed0" / ("gen00" if g == 0 else "arm0/gen01") / "generated.npy"
            ),
            np.load(
                ref_out / "work" / "seed0" / ("gen00" if g == 0 else "arm0/gen01") / "generated.npy"
            ),
        )


def test_test_perplexity_rises_over_generations(tmp_path):
    """At tiny scale with 4 seeds and 3 generations, test perplexity rises from generation 0 to
    the last: the paired change over seeds, recomputed here from the saved per-seed values, is
    beyond 2 of its standard errors (the study's threshold), and the report's verdict says so."""
    config = dataclasses.replace(TINY, seeds=4, generations=3)
    summary = lm.run(config, tmp_path / "run", progress=False)
    ppl = read_arrays(tmp_path / "run" / "metrics.npz")["test_perplexity"][0]  # seeds × gens
    change = ppl[:, -1] - ppl[:, 0]
    z = change.mean() / (change.std(ddof=1) / np.sqrt(change.size))
    assert z > 2, (ppl, z)
    claim = summary["arms"][0]["claims"][0]
    assert claim["verdict"] == "yes" and claim["seeds"] == 4
    assert "| yes |" in (tmp_path / "run" / "report.md").read_text()


def test_perplexity_claim_verdicts():
    from collapse_jax.families.lm.evaluation import perplexity_claim

    assert perplexity_claim(1.0, 0.4, 4, 3)["verdict"] == "yes"
    assert perplexity_claim(-1.0, 0.4, 4, 3)["verdict"] == "no"
    assert perplexity_claim(0.5, 0.4, 4, 3)["verdict"] == "not shown at this length"
    assert perplexity_claim(1.0, 0.0, 1, 3)["verdict"] == "one seed: no standard error"
