"""What each command imports, in a fresh interpreter: the time a user waits before anything runs.

`collapse-jax list` and `--help` must not start JAX; a run of a chain study must not load the
neural stack (torch, transformers, Flax, Optax, Orbax); the discrete study, and the Gaussian one
with its default normal D0, keep `scipy.stats` out (its import alone is about a tenth of a warm
run; the closed forms use `scipy.special`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

NEURAL = ("torch", "transformers", "flax", "optax", "orbax", "orbax.checkpoint")

PROBE = """
import json, sys
from collapse_jax import cli
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _imported(argv: list[str], tmp_path) -> set[str]:
    env = {**os.environ, "COLLAPSE_JAX_NO_CACHE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    return set(result["modules"])


@pytest.mark.parametrize("argv", [["list"], ["--help"]])
def test_listing_and_help_do_not_start_jax(argv, tmp_path):
    modules = _imported(argv, tmp_path)
    assert "jax" not in modules
    assert not modules & set(NEURAL)


@pytest.mark.parametrize(
    ("study", "flags", "also_absent"),
    [
        ("discrete", ["--chains", "8", "--generations", "3"], ("scipy.stats",)),
        ("gaussian", ["--chains", "8", "--generations", "3"], ("scipy.stats",)),
    ],
)
def test_a_chain_study_run_never_loads_the_neural_stack(study, flags, also_absent, tmp_path):
    argv = ["run", study, *flags, "--out", str(tmp_path / "run"), "--no-progress"]
    modules = _imported(argv, tmp_path)
    assert (tmp_path / "run" / "report.md").exists()
    assert "jax" in modules  # the probe sees the run's imports
    loaded = modules & {*NEURAL, *also_absent}
    assert not loaded, f"{study} run imported {sorted(loaded)}"


@pytest.mark.parametrize("workers", ["2", "0"])
def test_a_run_with_figure_workers_never_imports_matplotlib(workers, tmp_path, monkeypatch):
    """The figure workers (core/figures.py) draw the figures; the run's process never imports
    pyplot (0.3 s). Without workers it does, and draws the same files."""
    monkeypatch.setenv("COLLAPSE_JAX_FIGURE_WORKERS", workers)
    out = tmp_path / "run"
    argv = ["run", "discrete", "--chains", "8", "--generations", "5", "--no-progress"]
    modules = _imported([*argv, "--out", str(out)], tmp_path)
    assert ("matplotlib.pyplot" in modules) == (workers == "0")
    for name in ("metrics.png", "theory.png", "absorption.png"):
        assert (out / name).stat().st_size > 0
        assert name in (out / "report.md").read_text()


EXIT_PROBE = """
import atexit, sys
from collapse_jax import cli
atexit.register(lambda: print("teardown ran", flush=True))
sys.argv = ["collapse-jax", *sys.argv[1:]]
cli.console()
"""


@pytest.mark.parametrize(
    ("argv", "code", "teardown"),
    [
        (["run", "discrete", "--chains", "8", "--generations", "3", "--no-progress"], 0, False),
        (["run", "discrete", "--chains", "0", "--no-progress"], 2, False),
        (["list"], 0, True),  # no JAX imported: an ordinary exit
    ],
)
def test_the_command_exits_fast_after_a_jax_run_with_its_code(argv, code, teardown, tmp_path):
    """``collapse-jax`` skips the interpreter's teardown after a one-process JAX run (os._exit),
    with the run's exit code, its output flushed through a pipe and every file written."""
    out = tmp_path / "run"
    argv = [*argv, "--out", str(out)] if argv[0] == "run" else argv
    env = {**os.environ, "COLLAPSE_JAX_NO_CACHE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == code, done.stderr[-2000:]
    assert ("teardown ran" in done.stdout) == teardown
    if code == 0 and argv[0] == "run":
        assert f"wrote {out / 'report.md'}" in done.stdout  # flushed before the exit
        assert "## Figures" in (out / "report.md").read_text()  # the report's last section
        assert json.loads((out / "summary.json").read_text())["chains"] == 8
    if code == 2:
        assert done.stderr.strip().splitlines()[-1].startswith("collapse-jax")
