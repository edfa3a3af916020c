"""The CPU split into one JAX device per core (core/devices.py): when a run asks for it, when it
is left alone, and that a split run gives each chain the draws of an unsplit one."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from collapse_jax.core import devices
from collapse_jax.core.runs import read_arrays
from collapse_jax.families.discrete import study


@pytest.mark.parametrize(
    ("chains", "cores", "expected"),
    [(8192, 2, 2), (8192, 16, 8), (1000, 16, 8), (999, 16, 3), (7, 4, 1), (12, 1, 1), (6, 5, 3)],
)
def test_split_is_the_largest_divisor_of_the_chains_up_to_the_cores(chains, cores, expected):
    assert devices.cpu_split(chains, cores) == expected


def test_only_the_counts_method_asks_for_the_split():
    base = study.Config(states=50, samples=1000, chains=64, generations=10)
    assert study.splits_cpu(base)  # auto resolves to counts above M = 256
    assert not study.splits_cpu(study.Config(states=20, samples=100, chains=64, generations=10))
    assert study.splits_cpu(study.Config(samples=100, method="counts"))
    assert not study.splits_cpu(study.Config(samples=1000, method="samples"))


@pytest.mark.parametrize(
    "env",
    [
        {"JAX_NUM_CPU_DEVICES": "1"},
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"},
        {"SLURM_NTASKS": "4"},
    ],
)
def test_a_chosen_device_count_or_several_processes_are_left_alone(env):
    assert devices.split_cpu(8192, env) == 0
    assert jax.config.jax_num_cpu_devices == -1


def test_nothing_is_set_once_jax_has_started():
    jax.numpy.zeros(1).block_until_ready()  # this process's backends are running
    assert devices.split_cpu(8192, {}) == 0
    assert jax.config.jax_num_cpu_devices == -1


@pytest.mark.skipif(
    devices.cpu_split(64, devices.cores()) < 2, reason="one core: there is nothing to split"
)
def test_a_counts_run_is_split_and_gives_each_chain_the_unsplit_draws(tmp_path):
    """``collapse-jax run discrete`` under ``counts`` splits the CPU (summary.json: devices);
    each chain's absorption generation and state are those of the same run on one device
    (JAX_NUM_CPU_DEVICES=1), and the means over chains agree to float32 rounding."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    flags = ["--states", "6", "--samples", "300", "--chains", "64", "--generations", "400"]
    runs = {}
    for name, extra in (("split", {}), ("one", {"JAX_NUM_CPU_DEVICES": "1"})):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "collapse_jax.cli", "run", "discrete", *flags]
        proc = subprocess.run(
            [*cmd, "--no-progress", "--out", str(out)],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((out / "summary.json").read_text())
        runs[name] = (summary["devices"], read_arrays(out / "metrics.npz"))
    (split, a), (one, b) = runs["split"], runs["one"]
    assert split == devices.cpu_split(64, devices.cores()) and one == 1
    assert 0 < a["absorbed_at"].max() and (a["absorbed_at"] < 0).any()  # some absorbed, not all
    for name in ("absorbed_at", "absorbed_state"):
        np.testing.assert_array_equal(a[name], b[name])
    for name in ("heterozygosity_mean", "entropy_mean", "support_size_mean"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6)
