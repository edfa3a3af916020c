"""Every study's discrete options run to the end together (tiny sizes, in memory).

Each study's option axes (policy, sampler / method, estimator / EM settings, design, bandwidth
rule, precision, schedule kind) are combined so that every policy meets every value of the
study's main method axis (the GMM's EM options, which change the fit and not the loop, are
cycled over its policies), and every value of every other axis appears (cycled over the runs):
a crash in any combination a user can ask for fails here. The Gaussian study's full
policy × sampler × precision product is in ``test_gaussian_study.py``. Each run must finish
with finite recorded metrics (NaN only where a metric is undefined by construction: named
per study, or a mean over chains none of which is finite, as its finite fraction says).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import collapse_jax as cj
from collapse_jax.core.errors import ConfigError

POLICIES = [
    ("replace", 0.0),
    ("replace", 0.2),
    ("accumulate", 0.0),
    ("accumulate-subsample", 0.0),
    ("mix:0.6,0.2,0.2", 0.0),
]
SCHEDULES = ["constant", "linear:2", "poly:0.5"]


def _cycle(values, i):
    return values[i % len(values)]


def _cases(study, main_axis, others):
    """Every policy × every value of ``main_axis`` (name, values); each of ``others`` (name ->
    values) cycled over those runs, schedule kinds included."""
    name, values = main_axis
    out = []
    for i, ((policy, fresh), value) in enumerate(itertools.product(POLICIES, values)):
        settings = {"policy": policy, "fresh_fraction": fresh, name: value}
        settings["schedule"] = _cycle(SCHEDULES, i)
        for other, vals in others.items():
            settings[other] = _cycle(vals, i)
        out.append(pytest.param(study, settings, id=f"{study}-{i}-{policy}-{value}"))
    return out


TINY = {
    "discrete": dict(states=4, samples=10, chains=8, generations=3),
    "gmm": dict(
        samples=24, chains=4, generations=3, heldout=16, w2_samples=8, w2_chains=2, max_iter=10
    ),
    "kde": dict(samples=20, chains=4, generations=3, heldout=16, w2_samples=8, w2_chains=2),
    "regression": dict(dim=2, samples=10, chains=4, generations=3),
    "gaussian": dict(dim=2, samples=10, chains=8, generations=3),
}

CASES = [
    *_cases("discrete", ("method", ["counts", "samples"]), {"compact": ["on", "off", "auto"]}),
    *_cases(  # EM options change the fit, not the loop: cycled over the policies (5 runs)
        "gmm",
        ("w2_method", ["exact"]),
        {"init": ["kmeans", "kmeans++", "warm"], "covariance_type": ["full", "diag", "spherical"]},
    ),
    *_cases(
        "kde",
        ("bandwidth", ["0.3", "scott", "silverman"]),
        {"dataset": ["blobs", "circles", "moons", "swiss-roll"]},
    ),
    *_cases(
        "regression",
        ("design", ["fixed", "fresh"]),
        {"sampler": ["auto", "samples"], "x64": [True, False, False], "ridge": [0.0, 0.5]},
    ),
    *_cases(
        "gaussian",
        ("estimator", ["mle"]),
        {"sampler": ["samples"], "x64": [False, True]},
    ),
]

#: Metrics undefined at generation 0 by construction (no fit yet), per study.
UNDEFINED_AT_0 = {"gmm": {"l2_to_first_fit"}, "kde": {"heldout_nll"}}


@pytest.mark.parametrize(("study", "settings"), CASES)
def test_combination_runs_to_the_end(study, settings):
    try:
        res = cj.run(study, **TINY[study], **settings)
    except ConfigError as e:
        # The only refusal allowed: the sufficient sampler asked for a combination it cannot
        # run, with the reason and the way out named.
        assert settings.get("sampler") == "sufficient" and "--sampler samples" in str(e), e
        return
    assert res.series, study
    for name, s in res.series.items():
        if not isinstance(s, dict) or "mean" not in s:
            continue
        mean = np.asarray(s["mean"], dtype=float)
        if name in UNDEFINED_AT_0.get(study, ()):
            mean = mean[1:]
        if "finite_fraction" in s:  # e.g. KL(p0‖p_n): infinite once a state died, in every chain
            mean = mean[np.asarray(s["finite_fraction"]) > 0]
        assert np.all(np.isfinite(mean)), (study, name, settings, mean)


def test_cases_cover_every_option_value():
    """The case list covers each policy with each main-axis value and every other value."""
    seen: dict[tuple[str, str], set] = {}
    for case in CASES:
        study, settings = case.values
        for k, v in settings.items():
            seen.setdefault((study, k), set()).add(str(v))
    assert seen[("discrete", "compact")] == {"on", "off", "auto"}
    assert seen[("gmm", "covariance_type")] == {"full", "diag", "spherical"}
    assert seen[("gmm", "init")] == {"kmeans", "kmeans++", "warm"}
    assert seen[("kde", "dataset")] == {"blobs", "circles", "moons", "swiss-roll"}
    assert seen[("regression", "sampler")] == {"auto", "samples"}
    for study in ("discrete", "gmm", "kde", "regression", "gaussian"):
        assert seen[(study, "schedule")] == set(SCHEDULES), study
        assert len(seen[(study, "policy")]) == 4, study  # replace appears with and without γ
