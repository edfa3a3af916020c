"""The host-loop runner of the neural families: progress display, run-directory resume checks,
the key scheme and the generation loop shared by the VAE and language-model studies.

The vectorised families run their generations inside one ``lax.scan``
(:mod:`collapse_jax.core.loop`); a neural model is too large for that, so its generations run
on the host, one (sharded) model after another, with the same numbering: generation 0 is the
real data ``D_0``, generation ``n >= 1`` is the ``n``-th fitted model, trained on the data set
``T_{n-1}`` that :func:`~collapse_jax.core.policies.mix_training_data` builds from samples of
generation ``n - 1`` (real data for ``n = 1``); ``M_n`` is the size of the data drawn at
generation ``n``.

* :class:`Progress`: the one progress display (a tqdm bar on a terminal, a log line per note
  otherwise, nothing when disabled or in a non-main process);
* :func:`check_resume`: refuse to overwrite a run directory unless resuming it with the same
  configuration;
* :func:`generation_key`: the one key scheme, ``fold_in(fold_in(key(seed), generation), part)``;
* :func:`fit_checkpoint` / :func:`restore_fit`: the one checkpoint format of an epoch loop in
  progress (a :class:`~collapse_jax.core.training.FitState` plus the family's own arrays);
* :func:`fit_generations`: the generation loop, resumable after any generation (each
  generation's outputs are its own checkpoint) and within one (the family's epoch checkpoints,
  :mod:`collapse_jax.core.checkpointing`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
from tqdm.auto import tqdm

from collapse_jax.core.checkpointing import arrays_to_tree, tree_to_arrays
from collapse_jax.core.errors import ConfigError
from collapse_jax.core.loop import place
from collapse_jax.core.runs import RunDir, read_json
from collapse_jax.core.training import FitState


class Progress:
    """The neural families' progress display.

    ``enabled``: ``None`` shows a bar on a terminal and log lines otherwise, ``False`` shows
    nothing, ``True`` shows a bar on a terminal and log lines otherwise as well. Only the main
    process of a multi-process run shows anything.
    """

    def __init__(self, enabled: bool | None, label: str, unit: str = "step"):
        self.enabled = enabled is not False and jax.process_index() == 0
        self.label, self.unit = label, unit
        self.bar = None

    def start(self, total: int, label: str | None = None) -> Progress:
        """Begin a stage of ``total`` units (closing the previous bar)."""
        self.finish()
        if label is not None:
            self.label = label
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=self.label, unit=self.unit, leave=False)
        return self

    def named(self, label: str) -> Progress:
        """Set the label of the next stage (shown by :meth:`start` and :meth:`note`)."""
        self.label = label
        return self

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def note(self, text: str) -> None:
        """Show a status: the bar's postfix, or a log line on stderr without a terminal."""
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.enabled:
            print(f"[{self.label}] {text}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def check_resume(config: Any, rd: RunDir, started: bool) -> None:
    """Refuse a run directory that already holds a run (``started``: it holds work or
    checkpoints) unless ``config.resume``, and a resume whose configuration differs."""
    cfg_path = rd.file("config.json")
    if not started and not cfg_path.exists():
        return
    if not config.resume:
        raise ConfigError(
            f"run directory {rd.path} already holds a run; pass --resume to continue it or "
            "choose another --out"
        )
    if cfg_path.exists():
        old = read_json(cfg_path).get("config", {})
        new = json.loads(json.dumps(dataclasses.asdict(config)))
        diff = [k for k in new if k != "resume" and old.get(k) != new[k]]
        if diff:
            raise ConfigError(
                f"cannot resume {rd.path}: the configuration differs in {', '.join(diff)}"
            )


def generation_key(seed: int, generation: int, *parts: int) -> jax.Array:
    """``fold_in(fold_in(key(seed), generation), part)`` for each further part in turn."""
    key = jax.random.fold_in(jax.random.key(seed), generation)
    for p in parts:
        key = jax.random.fold_in(key, p)
    return key


def fit_checkpoint(fit: FitState) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, meta)`` of an epoch loop in progress, for
    :meth:`~collapse_jax.core.checkpointing.Checkpointer.save` (families add their own)."""
    arrays = {**tree_to_arrays(fit.train, "state"), **tree_to_arrays(fit.best_params, "best")}
    meta = {
        "epoch": fit.epochs_done,
        "best_val": fit.best_val if math.isfinite(fit.best_val) else None,
        "best_epoch": fit.best_epoch,
        "train_loss": list(fit.train_loss),
        "val_loss": list(fit.val_loss),
    }
    return arrays, meta


def restore_fit(
    template: FitState, arrays: Mapping[str, Any], meta: Mapping[str, Any], sharding: Any = None
) -> FitState:
    """The :class:`FitState` saved by :func:`fit_checkpoint`, shaped like ``template`` (its
    train state placed with ``sharding`` when given)."""
    train = arrays_to_tree(template.train, arrays, "state")
    if sharding is not None:
        train = place(train, sharding)
    best_val = meta["best_val"]
    return FitState(
        train,
        int(meta["epoch"]),
        arrays_to_tree(template.best_params, arrays, "best"),
        math.inf if best_val is None else float(best_val),
        int(meta["best_epoch"]),
        tuple(meta["train_loss"]),
        tuple(meta["val_loss"]),
    )


def fit_generations(last: int, fit_generation: Callable[[int], None], *, first: int = 1) -> None:
    """Fit generations ``first .. last`` in order (generation ``n`` trains on ``T_{n-1}``); a
    study resumes by calling it again from the first unfinished generation."""
    for n in range(first, last + 1):
        fit_generation(n)
