"""Process-level device settings made before JAX starts its backends: whether the environment
describes a multi-process run, and splitting a CPU into one JAX device per core for the runs
that gain from it.

Why split a CPU. XLA:CPU runs one device's program on one thread, and parallelises inside it
only the array operations it can cut into blocks. The discrete family's exact count samplers are
rejection loops (``numerics/samplers.py``), which it cannot: on one device a K = 50, M = 1000,
8,192-chain run used both of two cores at 1.7 cores of processor time and ran 21.8 s pinned to
one. With the CPU split into devices, :func:`collapse_jax.core.loop.chain_sharding` gives each
device its share of the chains, and each device's loops run on a core of their own. Measured
(warm, ``BENCHMARKS.md``): that run 19.7 → 11.9–12.9 s on two cores, and its whole command
17.4 → 5.8 s on 16 cores (8 devices). Runs whose programs XLA already spreads over the cores
gain nothing and pay the split's overhead (the ``samples`` method, 4,096 and 16,384 chains:
equal within noise; the Gaussian family and the demo config's whole command: 0.3–1.6 s slower),
so a study asks for the split only for its exact count samplers (``splits_cpu(config)``).

Each chain's draws are the same split or not; the means over chains are summed in another order
(float32 rounding, relative differences about 1e-7).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

#: The most devices a CPU is split into: measured up to 8 (16 cores, 8 devices).
MAX_CPU_DEVICES = 8

_MULTIHOST_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # explicit: with JAX_NUM_PROCESSES and JAX_PROCESS_ID
    "COORDINATOR_ADDRESS",
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
    "TPU_WORKER_HOSTNAMES",  # Cloud TPU pod slices
)


def multihost_requested(env: Mapping[str, str]) -> bool:
    """Whether ``env`` describes a run of several processes (coordinator, TPU pod, SLURM, MPI)."""
    if any(env.get(k) for k in _MULTIHOST_ENV[:3]):
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        try:
            if int(env.get(key, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_split(chains: int, cores: int) -> int:
    """The devices a CPU of ``cores`` cores is split into for ``chains`` chains: the largest
    count up to ``cores`` and :data:`MAX_CPU_DEVICES` that divides ``chains`` (the chain axis
    is sharded only in equal shares), 1 for no split."""
    return max(d for d in range(1, max(1, min(cores, MAX_CPU_DEVICES)) + 1) if chains % d == 0)


def split_cpu(chains: int, env: Mapping[str, str] | None = None) -> int:
    """Make JAX's CPU backend :func:`cpu_split` devices for a run of ``chains`` chains. Returns
    the devices set, or 0 where nothing was set: the backends have started already (a
    notebook that ran JAX before), the user chose a device count (``JAX_NUM_CPU_DEVICES``,
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, ``jax_num_cpu_devices``),
    several processes run, or one device is all the split gives. On a machine with a GPU only
    the CPU backend, which the run does not compute on, is split."""
    import jax
    from jax._src import xla_bridge

    env = os.environ if env is None else env
    chosen = "JAX_NUM_CPU_DEVICES" in env or "xla_force_host_platform_device_count" in env.get(
        "XLA_FLAGS", ""
    )
    if chosen or jax.config.jax_num_cpu_devices != -1 or multihost_requested(env):
        return 0
    devices = cpu_split(chains, cores())
    if devices == 1 or xla_bridge.backends_are_initialized():
        return 0
    jax.config.update("jax_num_cpu_devices", devices)
    return devices


def split_for(module, configs) -> int:
    """:func:`split_cpu` for runs of a study ``module`` with ``configs`` (one, or a sweep's),
    where the study asks for it (its ``splits_cpu(config)``) for any of them; the devices then
    divide every run's chains. Returns the devices set, or 0."""
    wants = getattr(module, "splits_cpu", None)
    if wants is None or not any(wants(c) for c in configs):
        return 0
    return split_cpu(math.gcd(*(c.chains for c in configs)))
