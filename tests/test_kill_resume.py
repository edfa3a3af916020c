"""Runs that survive a kill: each study (the five scan studies, the VAE and the language model)
is started as a real `collapse-jax run` process, killed with SIGKILL at random moments after its
checkpoints appear, resumed with `--resume`, and its final metrics.npz and summary.json compared
bit for bit with an uninterrupted run (summary timings aside)."""

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
#: The neural studies at tiny sizes: several epoch checkpoints per run, a few seconds each.
NEURAL = {
    "vae": ["--generations", "3", "--epochs", "3", "--batch-size", "32", "--samples", "256",
            "--channels1", "4", "--channels2", "8", "--latent", "4", "--eval-samples", "64",
            "--eval-test", "64", "--diversity-samples", "32", "--classifier-epochs", "1",
            "--classifier-train", "512", "--seeds", "2", "--mnist-source", "sklearn-digits"],
    "lm": ["--model", "micro", "--block-size", "8", "--synthetic-vocab", "16",
           "--synthetic-blocks", "64", "--train-blocks", "16", "--eval-blocks", "16",
           "--pretrain-blocks", "16", "--pretrain-epochs", "2", "--generations", "3",
           "--epochs", "3", "--seeds", "2", "--fresh-fractions", "0.0", "--batch-size", "8",
           "--generate-batch-size", "8", "--eval-batch-size", "8", "--n-prompts", "2",
           "--num-beams", "2"],
}  # fmt: skip
#: Timing fields, the only ones that may differ between an interrupted and a whole run.
TIMINGS = {"seconds", "chain_generations_per_second"}


def _cmd(study, out, *extra):
    args = STUDIES.get(study) or NEURAL[study]
    if study == "vae":  # the trained classifier is cached next to the runs, not in the home
        args = [*args, "--cache-dir", str(out.parent / "cache")]
    return [sys.executable, "-m", "collapse_jax.cli", "run", study, "--out", str(out),
            "--no-progress", *args, *extra]  # fmt: skip


def _env():
    return {**os.environ, "COLLAPSE_JAX_CHECKPOINT_SECONDS": "0", "PYTHONUNBUFFERED": "1"}


def _kill_after_checkpoint(cmd, progress, rng, timeout=240.0, wait=0.4) -> bool:
    """Start ``cmd``; once ``progress()`` (a snapshot of the checkpoints on disk) has changed,
    wait a random moment (up to ``wait`` s) and SIGKILL it. Returns False when the run finished
    before it could be killed."""
    before = progress()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if progress() != before:
            time.sleep(rng.uniform(0.0, wait))
            if proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint within {timeout} s: {proc.stderr.read().decode()[-2000:]}")


def _mtime(path):
    return path.stat().st_mtime_ns if path.exists() else None


def _committed_steps(out):
    """Every committed checkpoint step under ``out`` (Orbax commits a step by renaming its
    temporary directory to the step number) and every finished per-seed result file."""
    # The running process renames and deletes directories while this walks them: a path that
    # vanished mid-walk is skipped (os.walk ignores errors), never an error.
    found = set()
    for root, dirs, files in os.walk(out):
        found.update(os.path.join(root, d) for d in dirs if d.isdigit())
        found.update(os.path.join(root, f) for f in files if f.endswith(".npz"))
    return frozenset(found)


def _final(out):
    with np.load(out / "metrics.npz") as z:
        arrays = {k: z[k] for k in z.files if k not in TIMINGS}
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
        if not _kill_after_checkpoint(_cmd(study, out, *extra), lambda: _mtime(ckpt), rng):
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


@pytest.mark.parametrize("study", list(NEURAL))
def test_neural_sigkill_then_resume_is_bit_identical(study, tmp_path):
    """The VAE and LM studies killed with SIGKILL at random moments after epoch checkpoints
    are committed (twice when the run lasts), resumed with --resume: metrics.npz and
    summary.json equal an uninterrupted run's bit for bit, and a killed run never leaves a
    summary.json or report.md behind."""
    whole = tmp_path / "whole"
    done = subprocess.run(_cmd(study, whole), env=_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = tmp_path / "killed"
    rng = random.Random(study)
    kills = 0
    for attempt in range(2):
        extra = ("--resume",) if attempt else ()
        cmd = _cmd(study, out, *extra)
        if not _kill_after_checkpoint(cmd, lambda: _committed_steps(out), rng, wait=1.0):
            break
        kills += 1
        assert not (out / "summary.json").exists() and not (out / "report.md").exists()
    assert kills >= 1, "the run finished before any kill; make it longer"
    done = subprocess.run(_cmd(study, out, "--resume"), env=_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    a_whole, s_whole = _final(whole)
    a_res, s_res = _final(out)
    assert sorted(a_whole) == sorted(a_res)
    for k in a_whole:
        np.testing.assert_array_equal(a_res[k], a_whole[k], err_msg=k)
    assert s_res == s_whole
