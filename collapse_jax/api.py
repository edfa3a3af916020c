"""The Python API: run a built-in study or your own family from a notebook and get the results
in memory (a run directory is written only when ``out`` is given).

>>> import collapse_jax as cj
>>> res = cj.run("discrete", states=50, samples=1000, chains=4096, generations=500)
>>> res.series["heterozygosity"]["mean"], res.checks, res.final_state
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from collapse_jax.core import compilation, devices
from collapse_jax.core import point_family as pf_study
from collapse_jax.core.errors import ConfigError
from collapse_jax.core.flags import config_with
from collapse_jax.core.point_family import PointFamily
from collapse_jax.core.runs import RunDir, read_arrays
from collapse_jax.families import STUDIES, load_study

#: Studies whose runs need a directory on disk (checkpoints, saved models).
NEEDS_DIRECTORY = ("vae", "lm")


@dataclasses.dataclass(frozen=True)
class Result:
    """What one run gives back."""

    study: str  # the study or family name
    config: Any  # the validated config that ran
    summary: dict  # what summary.json holds: per-metric series, theory checks, facts
    arrays: dict[str, np.ndarray]  # what metrics.npz holds (the arrays every figure is drawn from)
    final_state: Any  # the last generation's per-chain state (None where a study keeps none)
    run_dir: Path | None  # the run directory, when one was written

    @property
    def series(self) -> dict[str, dict]:
        """Per-generation metrics: ``{name: {"generation", "mean", "stderr"}}``."""
        return {
            k: v
            for k, v in self.summary.items()
            if isinstance(v, dict) and {"generation", "mean", "stderr"} <= set(v)
        }

    @property
    def checks(self) -> list[dict]:
        """Theory-vs-Monte-Carlo rows: claim, theory, monte_carlo, stderr, z, agrees."""
        return list(self.summary.get("checks", []))


def _config(target, overrides: dict[str, Any]):
    if isinstance(target, PointFamily):
        return pf_study.validate(
            config_with(pf_study.PointConfig(), overrides, target.name), target
        )
    module = load_study(target)
    return module.validate(config_with(module.Config(), overrides, f"study {target!r}"))


def run(
    study: str | PointFamily,
    *,
    out: str | Path | None = None,
    progress: bool = False,
    cache: bool = True,
    **settings: Any,
) -> Result:
    """Run a built-in study (``"discrete"``, ``"gaussian"``, ``"gmm"``, ``"vae"``, ``"lm"``) or a
    user-defined :class:`~collapse_jax.core.point_family.PointFamily`.

    Args:
        study: a study name or a point family.
        out: write the run directory there (config.json, metrics.npz, summary.json, figures,
            report.md); ``None`` keeps everything in memory (the VAE and LM studies need one).
        progress: show a progress bar.
        cache: use the persistent compilation cache (:mod:`collapse_jax.core.compilation`).
        **settings: the study's config fields (e.g. ``chains=4096, policy="accumulate"``);
            unknown names are refused.
    """
    name = study.name if isinstance(study, PointFamily) else study
    if not isinstance(study, PointFamily) and study not in STUDIES:
        raise ConfigError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    if out is None and name in NEEDS_DIRECTORY:
        raise ConfigError(f"the {name} study keeps checkpoints and models on disk: pass out=DIR")
    config = _config(study, settings)
    compilation.enable(cache)
    if not isinstance(study, PointFamily):
        devices.split_for(load_study(study), [config])  # only before JAX has started
    run_dir = RunDir(out)
    if isinstance(study, PointFamily):
        summary = pf_study.run(study, config, run_dir, progress=progress)
    elif name in NEEDS_DIRECTORY:  # these studies manage their directory (checkpoints, resume)
        summary = load_study(study).run(config, out, progress=progress)
        metrics = Path(out) / "metrics.npz"
        run_dir.arrays = read_arrays(metrics) if metrics.exists() else {}
    else:
        summary = load_study(study).run(config, run_dir, progress=progress)
    return Result(
        name,
        config,
        summary,
        dict(run_dir.arrays),
        run_dir.final_state,
        None if out is None else Path(out),
    )


def sweep(
    study: str | PointFamily,
    field: str,
    values,
    *,
    out: str | Path | None = None,
    progress: bool = False,
    **settings: Any,
) -> dict[Any, Result]:
    """One :func:`run` per value of the setting ``field`` (into ``out/FIELD=VALUE`` when ``out``
    is given); returns ``{value: Result}``."""
    results = {}
    for v in values:
        sub = None if out is None else Path(out) / f"{field}={v}"
        results[v] = run(study, out=sub, progress=progress, **{**settings, field: v})
    return results
