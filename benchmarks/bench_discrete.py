"""Discrete engine vs the NumPy loop a researcher would write, same workload, one process.

Workload (issue default): K = 50 uniform states, M = 1000, 4096 chains, 1000 generations,
`replace`. Prints chain-generations per second of each and the ratio; also `samples` vs `counts`.

Then the whole process (``whole.py``: fresh interpreters, cold and warm compilation cache,
report and figures written) of ``collapse-jax run discrete`` against a NumPy script doing the
same recursion and recording the same kind of summary, on the two workloads of the
time-to-result issue: the demo config (K = 20 Zipf(1.1), M = 100, 1,024 chains, 800
generations, every second one recorded) and K = 50 uniform, M = 1000, 8,192 chains, 1,000
generations, every 100th recorded.

    python benchmarks/bench_discrete.py            # full workload
    python benchmarks/bench_discrete.py --quick    # 1024 chains, 200 generations
    python benchmarks/bench_discrete.py --whole-only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import numpy as np

from collapse_jax.core import devices
from collapse_jax.families.discrete import study as study

from whole import Whole, line

#: The peer's whole script: the multinomial recursion, a record of the mean heterozygosity,
#: support and entropy every EVERY generations, each chain's absorption time, saved to OUT.
NUMPY_SCRIPT = """
import numpy as np
p0 = np.arange(1, K + 1, dtype=float) ** -S
p0 /= p0.sum()
rng = np.random.default_rng(0)
counts = rng.multinomial(M, p0, size=CHAINS)
absorbed = np.full(CHAINS, -1)
record = []
for g in range(1, GENS + 1):
    p = counts / M
    if g % EVERY == 0 or g == GENS:
        logp = np.log(np.where(p > 0, p, 1.0))
        record.append([(1 - (p * p).sum(1)).mean(), (p > 0).sum(1).mean(),
                       -(p * logp).sum(1).mean()])
    absorbed[(absorbed < 0) & ((counts > 0).sum(1) == 1)] = g
    counts = rng.multinomial(M, p)
np.savez(OUT, record=np.array(record), absorbed=absorbed)
"""

#: (what, CLI flags, the script's settings) of the issue's two discrete workloads.
WHOLE = (
    (
        "demo config (K = 20 Zipf(1.1), M = 100, 1,024 chains, 800 generations)",
        "--states 20 --p0 zipf:1.1 --samples 100 --chains 1024 --generations 800 --record-every 2",
        "K, S, M, CHAINS, GENS, EVERY = 20, 1.1, 100, 1024, 800, 2",
    ),
    (
        "K = 50, M = 1000, 8,192 chains, 1,000 generations, record every 100",
        "--states 50 --p0 uniform --samples 1000 --chains 8192 --generations 1000 "
        "--record-every 100",
        "K, S, M, CHAINS, GENS, EVERY = 50, 0.0, 1000, 8192, 1000, 100",
    ),
)


def _children_run_on_cpu() -> bool:
    """Whether ``collapse-jax run`` started from here computes on the CPU (no GPU, or
    ``JAX_PLATFORMS=cpu``): splitting the CPU into devices means nothing to a GPU run. Asked
    of a child, so that this process never holds an accelerator the runs need."""
    code = "import jax; print(jax.default_backend())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip() == "cpu"


def whole_process() -> None:
    """Each workload as a user runs it, then (on two or more cores, runs on the CPU) in the
    other device form: unsplit (``JAX_NUM_CPU_DEVICES=1``) where the run splits the CPU into
    one JAX device per core by itself (the ``counts`` method, core/devices.py), split where it
    does not, the peer in the same run."""
    on_cpu = _children_run_on_cpu()
    with Whole() as w:
        for what, flags, settings in WHOLE:
            cold, warm = w.cli(["discrete", *flags.split()])
            peer = w.script(f"{settings}\n{NUMPY_SCRIPT}")
            print(line(what, cold, warm, peer, "NumPy script"), flush=True)
            config = _config(flags)
            split = devices.cpu_split(config.chains, devices.cores()) if on_cpu else 1
            if split > 1:  # the devices the library's own split would make
                other = "1" if study.splits_cpu(config) else str(split)
                cold, warm = w.cli(["discrete", *flags.split()], env={"JAX_NUM_CPU_DEVICES": other})
                what = f"{what}, JAX_NUM_CPU_DEVICES={other}"
                print(line(what, cold, warm, peer, "NumPy script"), flush=True)


def _config(flags: str) -> study.Config:
    """The config ``collapse-jax run discrete FLAGS`` runs."""
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    return study.config_from_args(parser.parse_args(flags.split()), study.Config())


def numpy_loop(k: int, m: int, chains: int, generations: int, seed: int = 0) -> float:
    """The peer: `Generator.multinomial` over the chain batch, generation after generation."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(m, np.full(k, 1.0 / k), size=chains)
    t0 = time.perf_counter()
    for _ in range(generations):
        counts = rng.multinomial(m, counts / m)
    return time.perf_counter() - t0


def ours(k, m, chains, generations, method="counts", compact="on", seed=0) -> tuple[float, float]:
    """Returns (seconds including compilation, seconds of a second, compiled run)."""
    cfg = study.Config(
        states=k,
        samples=m,
        chains=chains,
        generations=generations,
        method=method,
        record_every=max(1, generations // 100),
        seed=seed,
        compact=compact,
    )
    t0 = time.perf_counter()
    study.simulate(cfg, progress=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    study.simulate(cfg, progress=False)
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--chains", type=int, default=None)
    ap.add_argument("--generations", type=int, default=None)
    ap.add_argument("--skip-samples", action="store_true", help="skip the samples-method run")
    ap.add_argument("--whole-only", action="store_true", help="only the whole-process figures")
    ap.add_argument(
        "--steady-only",
        action="store_true",
        help="only the compacted counts against NumPy (no other method, no whole process)",
    )
    args = ap.parse_args()
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if args.whole_only:
        whole_process()
        return
    k, m = 50, 1000
    chains = args.chains or (1024 if args.quick else 4096)
    gens = args.generations or (200 if args.quick else 1000)
    work = chains * gens
    print(f"workload: K={k}, M={m}, {chains} chains x {gens} generations, replace")

    t_np = numpy_loop(k, m, chains, gens)
    print(f"numpy Generator.multinomial loop : {work / t_np:10.3e} chain-gen/s ({t_np:.2f} s)")
    first, t_ours = ours(k, m, chains, gens)
    print(
        f"collapse_jax counts (compacted)  : {work / t_ours:10.3e} chain-gen/s ({t_ours:.2f} s; "
        f"first call with compilation {first:.2f} s)"
    )
    print(f"ratio ours / numpy               : {t_np / t_ours:10.2f}x")
    if args.steady_only:
        return
    _, t_nc = ours(k, m, chains, gens, compact="off")
    print(f"collapse_jax counts, no compaction: {work / t_nc:10.3e} chain-gen/s ({t_nc:.2f} s)")
    if not args.skip_samples:
        sg = max(10, gens // 10)
        _, t_s = ours(k, m, chains, sg, method="samples", compact="off")
        _, t_c = ours(k, m, chains, sg, method="counts", compact="off")
        print(
            f"samples vs counts over {sg} generations: samples {chains * sg / t_s:.3e}, "
            f"counts {chains * sg / t_c:.3e} chain-gen/s (counts {t_s / t_c:.1f}x faster)"
        )
    whole_process()


if __name__ == "__main__":
    main()
