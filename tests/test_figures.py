"""Figures drawn by worker processes (core/figures.py): the same files as in process, every
failure drawn in process instead, no worker left behind (test_imports checks that a command's
own process then never imports matplotlib)."""

from __future__ import annotations

import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from collapse_jax.core import figures
from collapse_jax.core.errors import ConfigError
from collapse_jax.core.report import pyplot
from collapse_jax.families import STUDIES, load_study
from collapse_jax.families.discrete import report as discrete_report
from collapse_jax.families.discrete import study as discrete

PNGS = ("metrics.png", "theory.png", "absorption.png")


def _config():
    return discrete.Config(states=6, samples=20, chains=16, generations=12, seed=3)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> Path:
    """A small discrete run whose figures were drawn in this process."""
    out = tmp_path_factory.mktemp("in_process")
    discrete.run(_config(), out)
    return out


def _fails(path):
    raise RuntimeError(f"no figures for {path.name}")


def test_workers_draw_the_same_files_as_the_process(in_process, tmp_path):
    with figures.workers([discrete_report.__name__], count=2) as pool:
        assert len(pool.procs) == 2
        discrete.run(_config(), tmp_path)
        # The run's figures came from the workers: asked again, they answer for every figure.
        assert pool.draw(discrete_report.make_figures, tmp_path) is not None
    for name in PNGS:
        assert (tmp_path / name).read_bytes() == (in_process / name).read_bytes(), name


def test_each_figure_is_drawn_by_exactly_one_worker(tmp_path, monkeypatch):
    discrete.run(_config(), tmp_path)
    drawn = []
    for index in range(2):
        monkeypatch.setattr(figures, "_share", (index, 2))
        figures._seen.clear()
        figures._drawn.clear()
        listed = discrete_report.make_figures(tmp_path)
        drawn.append(list(figures._drawn))
        assert figures._seen == [str(tmp_path / name) for name, _ in listed]
    assert sorted(drawn[0] + drawn[1]) == sorted(figures._seen)
    assert not set(drawn[0]) & set(drawn[1])


def test_what_a_worker_cannot_draw_is_drawn_in_process(in_process, tmp_path):
    discrete.run(_config(), tmp_path, progress=False)
    with figures.workers([], count=1) as pool:
        # A lambda cannot be sent: drawn here.
        assert pool.draw(lambda p: discrete_report.make_figures(p), tmp_path) is None
        assert figures.draw(lambda p: [("x.png", "x")], tmp_path) == [("x.png", "x")]
        # A figure function that raises in the worker raises again here, with its own error.
        assert pool.draw(_fails, tmp_path) is None
        with pytest.raises(RuntimeError, match="no figures for"):
            figures.draw(_fails, tmp_path)
        # A worker that died: the pool closes and the figures are drawn here.
        pool.procs[0].kill()
        pool.procs[0].wait()
        for name in PNGS:
            (tmp_path / name).unlink()
        listed = figures.draw(discrete_report.make_figures, tmp_path)
        assert pool.procs == []
    assert sorted(name for name, _ in listed) == sorted(PNGS)
    for name in PNGS:
        assert (tmp_path / name).read_bytes() == (in_process / name).read_bytes(), name


def _modules(path):
    """A figure function that draws nothing and lists the worker's preload probe modules."""
    return [(name, "") for name in ("tabnanny", "colorsys") if name in sys.modules]


def test_closing_the_pool_ends_every_worker(tmp_path):
    # Asked for figures: each worker exits on its own once its input is closed.
    with figures.workers([], count=2) as pool:
        procs = list(pool.procs)
        assert pool.draw(_modules, tmp_path) is not None
    assert [p.returncode for p in procs] == [0, 0]
    assert figures._active is None
    # Never asked (bad input, a study drawing its own way): ended at once, not awaited.
    with figures.workers([], count=2) as pool:
        procs = list(pool.procs)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2


def test_serve_tells_the_running_workers_what_to_import(tmp_path, monkeypatch):
    """Workers start before the command knows its study; :func:`figures.serve` then names the
    figure modules they import while the run computes."""
    monkeypatch.setenv("COLLAPSE_JAX_FIGURE_WORKERS", "2")
    study = types.SimpleNamespace(make_figures=lambda path: [])
    study.make_figures.__module__ = "tabnanny"  # a module neither matplotlib nor we import
    with figures.workers() as pool:
        assert pool.draw(_modules, tmp_path) == []
        figures.serve([study])
        assert pool.draw(_modules, tmp_path) == [("tabnanny", "")]
        assert len(pool.procs) == 2


def test_worker_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("COLLAPSE_JAX_FIGURE_WORKERS", "0")
    with figures.workers([]) as pool:
        assert pool is None
    monkeypatch.setenv("COLLAPSE_JAX_FIGURE_WORKERS", "3")
    assert figures.default_count() == 3
    monkeypatch.setenv("COLLAPSE_JAX_FIGURE_WORKERS", "two")
    with pytest.raises(ConfigError, match="'two'"):
        figures.default_count()


def test_only_studies_that_draw_from_the_run_directory_keep_their_workers(monkeypatch):
    monkeypatch.setenv("COLLAPSE_JAX_FIGURE_WORKERS", "1")
    from collapse_jax.families.gaussian import study as gaussian

    with figures.workers() as pool:
        procs = list(pool.procs)
        figures.serve([object()])  # no make_figures: the workers are ended
        assert pool.procs == []
        assert procs[0].returncode is not None
    with figures.workers() as pool:
        figures.serve([gaussian])
        assert len(pool.procs) == 1


def test_a_worker_builds_only_the_figures_it_draws(tmp_path, monkeypatch):
    """A worker's share of a report excludes the other workers' figures: they are not built
    at all (no pyplot figure is made for them), and the shares cover every figure once."""
    discrete.run(_config(), tmp_path)
    plt = pyplot()
    made = []
    real = plt.subplots

    def subplots(*args, **kwargs):
        made.append(tuple(round(v, 1) for v in kwargs["figsize"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(plt, "subplots", subplots)
    # In order: theory.png (a curves figure, 2 panels), metrics.png (curves, 6 panels),
    # absorption.png (the report's own). Worker 0 draws the first and the third.
    built, drawn = {}, {}
    for index in range(2):
        monkeypatch.setattr(figures, "_share", (index, 2))
        figures._seen.clear()
        figures._drawn.clear()
        made.clear()
        discrete_report.make_figures(tmp_path)
        built[index] = list(made)
        drawn[index] = [Path(p).name for p in figures._drawn]
    assert drawn == {0: ["theory.png", "absorption.png"], 1: ["metrics.png"]}
    theory, metrics, absorption = (10.4, 3.6), (15.6, 7.2), (10.5, 3.6)
    assert built == {0: [theory, absorption], 1: [metrics]}


def test_every_figure_module_imports_without_jax():
    """The workers import each study's figure module while the run computes: none of them may
    pull in JAX (half a second of a processor the run is using)."""
    studies = [load_study(name) for name in STUDIES]
    names = figures.figure_modules(studies)
    assert set(names) == {
        f"collapse_jax.families.{name}.report"
        for name in ("discrete", "gaussian", "gmm", "regression", "kde")
    }
    probe = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)\n"
    probe += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')))"
    done = subprocess.run(
        [sys.executable, "-c", probe, *names], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
