"""Runs that survive a kill: each scan study is started as a real `collapse-jax run` process,
killed with SIGKILL at random moments after its chunk checkpoints appear, resumed with
`--resume`, and its final metrics.npz and summary.json compared bit for bit with an
uninterrupted run (summary timings aside)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

#: A few seconds of chunks each (several chunks of 200 generations), CPU-sized.
STUDIES = {
    "discrete": ["--states", "50", "--samples", "1000", "--chains", "1024", "--generations",
                 "1600", "--record-every", "20"],
    "gaussian": ["--dim", "3", "--samples", "200", "--sampler", "samples", "--chains", "256",
                 "--generations", "1600", "--record-every", "20"],
    "gmm": ["--samples", "200", "--chains", "16", "--generations", "800", "--record-every", "20",
            "--heldout", "64", "--w2-samples", "32", "--w2-chains", "4", "--tol", "1e-3"],
    "kde": ["--samples", "100", "--chains", "64", "--generations", "1000", "--record-every",
            "20", "--heldout", "64", "--w2-samples", "32", "--w2-chains", "4"],
    "regression": ["--dim", "5", "--samples", "50", "--sampler", "samples", "--chains", "512",
                   "--generations", "2000", "--record-every", "20"],
}  # fmt: skip
#: Timing fields, the only ones that may differ between an interrupted and a whole run.
TIMINGS = {"seconds", "chain_generations_per_second"}


def _cmd(study, out, *extra):
    return [sys.executable, "-m", "collapse_jax.cli", "run", study, "--out", str(out),
            "--no-progress", *STUDIES[study], *extra]  # fmt: skip


def _env():
    return {**os.environ, "COLLAPSE_JAX_CHECKPOINT_SECONDS": "0", "PYTHONUNBUFFERED": "1"}


def _kill_after_checkpoint(cmd, ckpt, rng, timeout=240.0) -> bool:
    """Start ``cmd``; once a new chunk checkpoint has been written, wait a random moment and
    SIGKILL it. Returns False when the run finished before it could be killed."""
    before = ckpt.stat().st_mtime_ns if ckpt.exists() else None
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if ckpt.exists() and ckpt.stat().st_mtime_ns != before:
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint within {timeout} s: {proc.stderr.read().decode()[-2000:]}")


def _final(out):
    with np.load(out / "metrics.npz") as z:
        arrays = {k: z[k] for k in z.files}
    summary = json.loads((out / "summary.json").read_text())
    return arrays, {k: v for k, v in summary.items() if k not in TIMINGS}


@pytest.mark.parametrize("study", list(STUDIES))
def test_sigkill_then_resume_is_bit_identical(study, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(_cmd(study, whole), env=_env(), check=True, capture_output=True)
    out = tmp_path / "killed"
    ckpt = out / "chains_checkpoint.npz"
    rng = random.Random(study)
    kills = 0
    for attempt in range(2):
        extra = ("--resume",) if attempt else ()
        if not _kill_after_checkpoint(_cmd(study, out, *extra), ckpt, rng):
            break
        kills += 1
        # Killed mid-run: nothing that looks complete, and the checkpoint is whole.
        assert not (out / "summary.json").exists() and not (out / "report.md").exists()
        with np.load(ckpt) as z:
            assert "meta" in z.files
    assert kills >= 1, "the run finished before any kill; make it longer"
    done = subprocess.run(_cmd(study, out, "--resume"), env=_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    a_whole, s_whole = _final(whole)
    a_res, s_res = _final(out)
    assert sorted(a_whole) == sorted(a_res)
    for k in a_whole:
        np.testing.assert_array_equal(a_res[k], a_whole[k], err_msg=k)
    assert s_res == s_whole


def test_resume_refuses_another_configuration(tmp_path):
    """A resume with a different configuration is refused with one line, exit 2."""
    out = tmp_path / "run"
    args = ["--dim", "2", "--samples", "10", "--chains", "8", "--generations", "3"]
    base = [sys.executable, "-m", "collapse_jax.cli", "run", "regression", "--out", str(out)]
    subprocess.run([*base, *args], env=_env(), check=True, capture_output=True)
    res = subprocess.run(
        [*base, *args[:-1], "4", "--resume"], env=_env(), capture_output=True, text=True
    )
    assert res.returncode == 2
    assert "cannot resume" in res.stderr and "generations" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
