"""Two JAX processes on this machine equal one: the scan runner and the language-model trainer
and decoder run under ``jax.distributed`` (CPU, a coordinator on localhost, Gloo collectives),
with 2 host devices in each process, and are compared with one process of 4 host devices (the
same mesh of 4 devices, so the same shards and the same per-device programs).

Three real subprocesses run ``tests/multiprocess_driver.py`` (each sets its own environment:
this test process has 8 host devices, see ``conftest.py``). What must agree bit for bit is
everything computed per chain or per row and everything that only moves, sorts or counts
values: every chain's state, per-chain trace and final info, the quantiles and fractions over
chains, a checkpointed and resumed run, the decoded tokens, token counts and the selected
epoch. Sums across devices agree to rounding only: in one process XLA's CPU all-reduce adds the
4 devices' partial sums, across processes Gloo's all-reduce adds them in another order, and
float addition is not associative. That touches the means and standard errors over chains
(at most a few units in the last place) and the data-parallel gradient, hence the losses and
the parameters after some Adam updates (within 1e-6 absolutely; the attention key biases,
whose exact gradient is zero, hold only rounding noise and are bounded instead, as in
``test_opt_training.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DRIVER = Path(__file__).with_name("multiprocess_driver.py")
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds for all three processes (together about 70 s of CPU time)
LEARNING_RATE = 3e-3  # the driver's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _start(out: Path, n_processes: int, process_id: int, port: int, devices: int):
    """Start one driver process; its output goes to ``out/log_ID.txt``."""
    args = [sys.executable, str(DRIVER), str(out), str(n_processes), str(process_id), str(port)]
    with open(out / f"log_{process_id}.txt", "w") as log:
        return subprocess.Popen(args, env=_env(devices), stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(one, [p0, p1])``: the results of one process of 4 devices and of each of 2 processes
    of 2 devices (all three run at the same time)."""
    one_dir, two_dir = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    port = _free_port()
    jobs = [(one_dir, 0, _start(one_dir, 1, 0, 0, 4))]
    jobs += [(two_dir, i, _start(two_dir, 2, i, port, 2)) for i in range(2)]
    try:
        for _, _, p in jobs:
            p.wait(timeout=TIMEOUT)
    finally:
        for _, _, p in jobs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for out, i, p in jobs:
        log = (out / f"log_{i}.txt").read_text()
        assert p.returncode == 0, f"{out.name} process {i} failed ({p.returncode}):\n{log[-4000:]}"
    one = dict(np.load(one_dir / "process_0.npz"))
    two = [dict(np.load(two_dir / f"process_{i}.npz")) for i in range(2)]
    return one, two


def _rounded(name: str) -> bool:
    """Whether ``name`` passes through a float sum across devices (see the module docstring)."""
    if name.startswith(("train_model/train_loss", "train_model/val_loss", "train_model/params")):
        return True
    if name.startswith("score_blocks/nll"):
        return True
    return name.startswith("gaussian/trace") and name.endswith(("['mean']", "['stderr']"))


def test_two_processes_of_two_devices_each_gather_the_same_results(runs):
    one, (p0, p1) = runs
    assert int(one["devices"]) == int(p0["devices"]) == 4
    assert int(one["local"]) == 4 and int(p0["local"]) == int(p1["local"]) == 2
    assert p0.keys() == p1.keys() == one.keys()
    for name in p0:
        if name != "local":
            np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)


def test_per_chain_results_tokens_and_counts_equal_one_process_bit_for_bit(runs):
    one, (two, _) = runs
    exact = [name for name in one if not _rounded(name) and name != "local"]
    assert len(exact) > 60  # every discrete and Gaussian chain array, tokens, counts
    for name in exact:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)
    for name in ("decode/greedy", "decode/beam"):
        assert two[name].shape == (8, 6)
    # The checkpointed and resumed run is the uninterrupted one, in both runs.
    assert sum(name.startswith("discrete/resumed") for name in one) > 10
    for res in (one, two):
        for name in res:
            if name.startswith("discrete/resumed_trace"):
                np.testing.assert_array_equal(res[name], res[name.replace("resumed_", "")])
            elif name.startswith("discrete/resumed."):
                np.testing.assert_array_equal(res[name], res[name.replace("resumed", "state")])


def test_sums_across_devices_agree_to_rounding(runs):
    one, (two, _) = runs
    rounded = [name for name in one if _rounded(name)]
    for name in rounded:
        a, b = one[name], two[name]
        if "params" in name:
            if "k_proj" in name and "bias" in name:
                assert np.abs(a).max() < 10 * LEARNING_RATE > np.abs(b).max(), name
            else:
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-6, err_msg=name)
    # Not vacuous: training moved the parameters far beyond the tolerance, and the loss fell.
    name = "['layers_0']['fc1']['kernel']"
    assert np.abs(one[f"train_model/params{name}"] - one[f"init/params{name}"]).max() > 1e-3
    assert one["train_model/train_loss"][-1] < one["train_model/train_loss"][0]
