"""Figures and the Markdown report of the language-model study (from the saved arrays only)."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import NullFormatter, ScalarFormatter

from collapse_jax.core import report as rep
from collapse_jax.core.runs import (
    RunDir,
    read_arrays,
    save_figure,
)
from collapse_jax.families.lm.config import BUILTIN_MODELS, REPEAT_N, Config, Setup
from collapse_jax.families.lm.evaluation import mean_stderr

plt = rep.pyplot()

# --------------------------------------------------------------------------------------------
# Figures and report (from the saved arrays only)


def _arm_label(f: float) -> str:
    return "no original data" if f == 0 else f"{f:.0%} original data"


def _log_x(ax) -> None:
    """Log x axis with plain major labels only (minor labels overlap on short ranges)."""

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


CAPTIONS = {
    "perplexity_histograms.png": (
        "Per-sequence perplexity of each generation's generated data, scored by the "
        "generation-0 model; dashed: the real training data."
    ),
    "perplexity_ridgeline.png": (
        "The same histograms as a ridgeline, bottom: real data, then generations 0, 1, ... upwards."
    ),
    "repetition_diversity.png": (
        "Repetition within generated sequences and "
        "distinct-n diversity of each generation's generated data."
    ),
    "synthetic_truth.png": (
        "Exact quantities under the true source: NLL of the "
        "generated text and the probability mass of unigrams/bigrams it never "
        "contains."
    ),
}


def _save(figs: list, rd: RunDir, fig, name: str) -> None:
    """Save ``fig`` as ``name`` in the run directory and list it with its caption."""
    save_figure(fig, rd.file(name))
    figs.append((name, CAPTIONS[name]))


def write_figures(rd: RunDir, arrays: dict) -> list[tuple[str, str]]:
    """Draw every figure from ``metrics.npz`` arrays; return (file, caption) pairs."""

    figs = []
    gens = arrays["generation"]
    fr = arrays["fresh_fractions"]
    A = len(fr)
    # Test perplexity: mean ± 2 stderr over seeds, seeds as thin lines (the paper's right panels).
    fig, axes = plt.subplots(1, A, figsize=(5 * A, 3.6), squeeze=False, sharey=True)
    for a, ax in enumerate(axes[0]):
        ppl = arrays["test_perplexity"][a]
        for row in ppl:
            ax.plot(gens, row, color="0.6", lw=0.8)
        m, se = mean_stderr(ppl)
        rep.band(ax, gens, m, se, label="mean ± 2 stderr")
        if "source_test_perplexity" in arrays:
            ax.axhline(
                float(arrays["source_test_perplexity"]),
                color="k",
                ls="--",
                label="true source (floor)",
            )
        ax.set_title(_arm_label(fr[a]))
        ax.set_xlabel("generation")
        ax.set_ylabel("test perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, rd.file("test_perplexity.png"))
    figs.append(("test_perplexity.png", "Test perplexity per generation; grey: each seed."))

    # Per-sequence perplexity histograms, 2-D overlay (the paper's left panels).
    edges = arrays["hist_edges"]
    centers = np.sqrt(edges[1:] * edges[:-1])
    hist = arrays["hist_generated"]
    G = hist.shape[1]
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, A, figsize=(5 * A, 3.6), squeeze=False, sharey=True)
    for a, ax in enumerate(axes[0]):
        for g in range(G):
            ax.plot(
                centers,
                hist[a, g],
                color=cmap(g / max(G - 1, 1)),
                lw=1.2,
                label=f"generation {g}" if g in (0, G - 1) or G <= 5 else None,
            )
        ax.plot(centers, arrays["hist_real_train"], "k--", lw=1.2, label="real training data")
        ax.plot(centers, arrays["hist_real_test"], "k:", lw=1.2, label="real test data")
        _log_x(ax)
        ax.set_xlabel("perplexity under the generation-0 model")
        ax.set_ylabel("density (per log perplexity)")
        ax.set_title(_arm_label(fr[a]))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(figs, rd, fig, "perplexity_histograms.png")

    # Ridgeline: one offset curve per generation.
    fig, axes = plt.subplots(1, A, figsize=(5 * A, 0.6 * (G + 2) + 1.5), squeeze=False)
    for a, ax in enumerate(axes[0]):
        scale = max(float(hist[a].max()) if G else 1.0, float(arrays["hist_real_train"].max()))
        step = 0.6 * scale
        rows = [("real", arrays["hist_real_train"])] + [(f"gen {g}", hist[a, g]) for g in range(G)]
        for i, (label, h) in enumerate(rows):
            base = step * i
            color = "0.3" if i == 0 else cmap((i - 1) / max(G - 1, 1))
            ax.fill_between(centers, base, base + h, color=color, alpha=0.6, lw=0)
            ax.plot(centers, base + h, color="k", lw=0.5)
            ax.text(centers[0], base + 0.05 * step, label, fontsize=7, va="bottom")
        _log_x(ax)
        ax.set_yticks([])
        ax.set_xlabel("perplexity under the generation-0 model")
        ax.set_title(_arm_label(fr[a]))
    _save(figs, rd, fig, "perplexity_ridgeline.png")

    # Repetition and diversity of the generated data.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    gg = gens[:-1] if len(gens) > 1 else gens
    for a in range(A):
        m, se = mean_stderr(arrays["repeated_ngram_fraction"][a][:, : len(gg)])
        rep.band(axes[0], gg, m, se, label=_arm_label(fr[a]))
        for j, n in enumerate(arrays["distinct_n_orders"]):
            if n not in (1, 2, 4):
                continue
            m, se = mean_stderr(arrays["distinct_n"][a, :, : len(gg), j])
            rep.band(axes[1], gg, m, se, label=f"distinct-{n}, {_arm_label(fr[a])}")
    axes[0].axhline(
        float(arrays["real_repeated_ngram_fraction"]), color="k", ls="--", label="real data"
    )
    axes[0].set_ylabel(f"repeated {REPEAT_N}-gram fraction")
    axes[1].set_ylabel("distinct-n")
    for ax in axes:
        ax.set_xlabel("generation that produced the data")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(figs, rd, fig, "repetition_diversity.png")

    if "true_nll_generated" in arrays:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
        keys = (
            ("true_nll_generated", "real_true_nll", "true NLL per token (nats)"),
            ("unigram_lost_mass", "real_unigram_lost_mass", "lost unigram mass"),
            ("bigram_lost_mass", "real_bigram_lost_mass", "lost bigram mass"),
        )
        for ax, (key, ref, label) in zip(axes, keys, strict=True):
            for a in range(A):
                m, se = mean_stderr(arrays[key][a][:, : len(gg)])
                rep.band(ax, gg, m, se, label=_arm_label(fr[a]))
            ax.axhline(float(arrays[ref]), color="k", ls="--", label="real training data")
            ax.set_ylabel(label)
            ax.set_xlabel("generation that produced the data")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        _save(figs, rd, fig, "synthetic_truth.png")
    return figs


def _decode_text(tokenizer, ids) -> str:
    text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
    return " ".join(text.split())


def write_report(rd: RunDir, config: Config, setup: Setup, summary: dict) -> None:

    arrays = read_arrays(rd.file("metrics.npz"))
    figs = write_figures(rd, arrays)
    G = config.generations
    lines = [
        "# Language-model regime: generations trained on generated text",
        "",
        f"Model `{config.model}`"
        + (" (pre-trained here from scratch as the base)" if config.model in BUILTIN_MODELS else "")
        + f", corpus: {setup.corpus_source}, {len(setup.train)} training blocks of "
        f"{config.block_size} tokens, {config.generations} generations after generation 0, "
        f"{config.epochs} epochs each, {config.seeds} seeds, policy `{config.policy}`, "
        f"start from `{config.start_from}`, decoding `{config.decoding}`"
        + (f" ({config.num_beams} beams)" if config.decoding == "beam" else "")
        + (
            f", repetition penalty {config.repetition_penalty:g}"
            if config.repetition_penalty != 1
            else ""
        )
        + f". Wall time {summary['seconds']:.0f} s (all invocations of this run directory).",
        *rep.operators_lines(summary.get("operators", [])),
        "",
        "No closed-form theory exists for this regime; the table reports the measured change "
        "of test perplexity from generation 0 to the last generation (mean ± stderr over "
        "seeds); it rises when the change is beyond 2 standard errors.",
        "",
        f"| arm | test perplexity, gen 0 | test perplexity, gen {G} | change ± stderr | rises? |",
        "|---|---|---|---|---|",
    ]
    for a, f in enumerate(config.fresh_fractions):
        ppl = arrays["test_perplexity"][a]
        m, se = mean_stderr(ppl)
        ch = summary["arms"][a]["perplexity_change"]
        lines.append(
            f"| {_arm_label(f)} | {rep.fmt(m[0])} ± {rep.fmt(se[0])} | {rep.fmt(m[-1])} ± "
            f"{rep.fmt(se[-1])} | {ch['mean']:+.4g} ± {ch['stderr']:.2g} | "
            f"{summary['arms'][a]['claims'][0]['verdict']} |"
        )
    if "true_nll_generated" in arrays:
        lines += [
            "",
            "Exact source quantities of the data each generation produced (seed mean; the real "
            "training data for reference):",
            "",
            "| data | true NLL/token | lost unigram mass | lost bigram mass | tail-word frequency |",
            "|---|---|---|---|---|",
            f"| real training data | {rep.fmt(float(arrays['real_true_nll']))} | "
            f"{rep.fmt(float(arrays['real_unigram_lost_mass']))} | "
            f"{rep.fmt(float(arrays['real_bigram_lost_mass']))} | "
            f"{rep.fmt(float(arrays['real_tail_frequency']))} |",
        ]
        for a, f in enumerate(config.fresh_fractions):
            for g in range(G):
                lines.append(
                    f"| gen {g}, {_arm_label(f)} | "
                    + " | ".join(
                        rep.fmt(float(np.nanmean(arrays[k][a, :, g])))
                        for k in (
                            "true_nll_generated",
                            "unigram_lost_mass",
                            "bigram_lost_mass",
                            "tail_frequency",
                        )
                    )
                    + " |"
                )
    lines.append("")
    for name, caption in figs:
        lines.append(rep.figure_md(name, caption))
    if len(arrays["prompts"]):
        lines += ["## Continuations of fixed prompts (seed 0)", ""]
        for p in range(len(arrays["prompts"])):
            prompt = _decode_text(setup.tokenizer, arrays["prompts"][p])
            lines.append(f"**Prompt {p}:** {prompt}")
            lines.append("")
            for a, f in enumerate(config.fresh_fractions):
                for g in range(G + 1):
                    if g == 0 and a > 0:
                        continue
                    text = _decode_text(setup.tokenizer, arrays["continuations"][a, g, p])
                    who = "gen 0" if g == 0 else f"gen {g} ({_arm_label(f)})"
                    lines.append(f"- *{who}:* {text}")
            lines.append("")
    rd.write_report("\n".join(lines) + "\n")
