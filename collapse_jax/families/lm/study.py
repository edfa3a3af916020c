"""The language-model study: generations of OPT fine-tuned on their own beam-search text
(Shumailov et al. 2024, Fig. 1b,c and Example 1).

Generation 0 is the base model fine-tuned on the real training blocks (64 tokens each). Every
model then continues each 64-token block of the *original* training set with 64 new tokens
(5-way beam search by default); the continuations form an artificial data set of the same size,
which the shared :func:`~collapse_jax.core.loop.mix_training_data` mixes with fresh original
blocks (``fresh_fractions``, e.g. the paper's 10%) or accumulates, and generation ``g + 1`` is
fine-tuned on the result, starting from the base model (the paper) or from generation ``g``.
Each fine-tune keeps the epoch with the lowest loss on the original validation set.

Without network access there are no pre-trained weights: a built-in model name (``tiny``,
``small``, ``base``) makes the study pre-train a small OPT-architecture model from scratch on a
part of the training text that the regime never uses, and that model plays the "pre-trained
base". With the ``synthetic`` corpus the text comes from a known hidden-Markov source, so the
true log-likelihood of generated text and the true probability mass of the tails it lost are
measured exactly (:mod:`collapse_jax.families.lm.synthetic_language`).

Long runs are safe to interrupt: training writes an Orbax checkpoint after every epoch, each
finished generation leaves its selected weights (Hugging Face safetensors, openable by
``transformers``), its evaluation and its generated data (token ``.npy`` files; generation in
progress is saved in chunks), and ``resume = true`` continues from the last completed step with
the same result as an uninterrupted run.
"""

from __future__ import annotations

import time

import numpy as np

from collapse_jax.core.errors import ConfigError
from collapse_jax.core.host_loop import check_resume
from collapse_jax.core.runs import (
    RunDir,
    read_json,
    write_json,
)
from collapse_jax.core.training import maybe_initialize_distributed
from collapse_jax.families.lm import training as lt
from collapse_jax.families.lm.config import (
    DESCRIPTION,
    NAME,
    Config,
    add_arguments,
    config_from_args,
    demo_config,
    prepare,
    validate,
)
from collapse_jax.families.lm.evaluation import collect, summarize
from collapse_jax.families.lm.generations import Regime
from collapse_jax.families.lm.report import write_report

__all__ = [
    "DESCRIPTION",
    "NAME",
    "Config",
    "ConfigError",
    "add_arguments",
    "config_from_args",
    "demo_config",
    "prepare",
    "run",
    "validate",
]


def run(config: Config, out_dir, *, progress: bool | None = None) -> dict:
    """Run the regime (see the module docstring) and write arrays, figures and the report."""
    config = validate(config)
    maybe_initialize_distributed()  # a no-op unless the environment describes several hosts
    rd = RunDir(out_dir)
    work = rd.file("work")
    check_resume(config, rd, started=work.exists() and any(work.iterdir()))
    setup = prepare(config)  # all corpus/model checks before any training
    if lt.is_main():
        rd.write_config(config, NAME)
    regime = Regime(config, setup, work, progress)
    t0 = time.perf_counter()
    seeds = [config.seed + i for i in range(config.seeds)]
    for seed in seeds:
        regime.run_first(seed)
        for arm in range(len(config.fresh_fractions)):
            regime.run_chain(seed, arm)
    arrays = collect(regime, seeds)
    # Wall time summed over every invocation (an interrupted run resumed counts all its parts).
    elapsed_path = work / "elapsed.json"
    before = read_json(elapsed_path) if elapsed_path.exists() else {"seconds": 0.0, "runs": 0}
    seconds = float(before["seconds"]) + time.perf_counter() - t0
    if lt.is_main():
        write_json(elapsed_path, {"seconds": seconds, "runs": int(before["runs"]) + 1})
    arrays["seconds"] = np.float64(seconds)
    if not lt.is_main():
        return {}
    rd.write_metrics(**arrays)
    summary = summarize(config, setup, arrays)
    rd.write_summary(summary)
    write_report(rd, config, setup, summary)
    return summary
