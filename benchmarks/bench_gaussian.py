"""Benchmark: the Gaussian fit-and-resample recursion, collapse_jax vs NumPy.

Workload (the project's acceptance workload): 10,000 chains, M = 1000 samples per generation,
1000 generations, replace policy, unbiased estimator, in d = 1 and d = 10.

* ours: :func:`collapse_jax.families.gaussian.kernel.make_family` with the ``sufficient`` sampler
  (mean ~ N(μ, Σ/M), scatter ~ Wishart(M − 1, Σ) by the Bartlett decomposition), its one-chain
  ``step`` vmapped over chains and scanned over generations exactly as the shared runner does
  (per-chain keys ``fold_in(chain_key, generation)``, metrics on recorded generations only,
  recorded every 100 generations; d = 10 over 200 generations). Figures are steady-state (compilation excluded, best of
  ``--repeats``); the end-to-end time of :func:`collapse_jax.core.loop.run_generations`
  (compilation, chunking and progress included) is printed too.
* NumPy sample-level loop (what a researcher writes): draw M points per chain, fit mean and
  covariance (``ddof = 1``). Its cost per generation does not change over a run, so it is timed
  over a few generations.
* NumPy sufficient-statistic loop: the same exact sampler in NumPy (``normal`` + ``chisquare``;
  in d = 10 the Bartlett factor from ``chisquare`` + ``normal`` and batched matrix products).

Rates are chain-generations per second; each ratio is ours / peer. The CPU may be shared with
other work: figures are the best of ``--repeats`` runs.

Then the whole process (``whole.py``: fresh interpreters, cold and warm compilation cache,
report and figures written) of the time-to-result issue's run, ``collapse-jax run gaussian``
with d = 1, M = 1000, 10,000 chains, 5,000 generations, the ``sufficient`` sampler, recorded
every 10th generation and (today's default) every generation, against NumPy scripts: the
sufficient-statistic loop at full length, and the sample-level loop, whose 5,000 generations
(about 25 minutes) are extrapolated from two shorter whole runs of the same script (its cost per
generation is constant): T(G) = T(a) + (T(b) − T(a)) (G − a) / (b − a), with a = 20 and
b = 220 (b = 40 gave 669 s and 1,246 s in two runs of one session: a 0.5 s jitter in either
short run moves the slope by a quarter).

    python benchmarks/bench_gaussian.py [--quick] [--repeats N] [--x64] [--whole-only]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

# Both cores: the chain axis is sharded over two host devices (set before JAX starts).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()

import jax
import numpy as np

from collapse_jax.core.loop import chain_sharding, run_generations, scan_generations
from collapse_jax.families.gaussian import d0 as gd0
from collapse_jax.families.gaussian import kernel as proc

from whole import Whole, extrapolate, line

#: The issue's whole-process run (d = 1).
WHOLE_CHAINS, WHOLE_GENS, WHOLE_M = 10_000, 5_000, 1000
#: The peers' scripts: each runs GENS generations of 10,000 one-dimensional chains and saves the
#: final means and standard deviations to OUT.
NUMPY_SAMPLES_SCRIPT = """
import numpy as np
rng = np.random.default_rng(0)
mean, sd = np.zeros(CHAINS), np.ones(CHAINS)
for _ in range(GENS):
    x = mean[:, None] + sd[:, None] * rng.standard_normal((CHAINS, M))
    mean, sd = x.mean(1), x.std(1, ddof=1)
np.savez(OUT, mean=mean, sd=sd)
"""
NUMPY_SUFFICIENT_SCRIPT = """
import numpy as np
rng = np.random.default_rng(0)
mu, sigma = np.zeros(CHAINS), np.ones(CHAINS)
for _ in range(GENS):
    mu = mu + sigma * rng.standard_normal(CHAINS) / np.sqrt(M)
    sigma = sigma * np.sqrt(rng.chisquare(M - 1, CHAINS) / (M - 1))
np.savez(OUT, mean=mu, sd=sigma)
"""


def whole_process(short: tuple[int, int] = (20, 220)) -> None:
    """Print the whole-process figures (``short``: the sample-level loop's two timed lengths)."""
    settings = f"CHAINS, M = {WHOLE_CHAINS}, {WHOLE_M}\n"
    flags = ["gaussian", "--dim", "1", "--samples", str(WHOLE_M), "--chains", str(WHOLE_CHAINS),
             "--generations", str(WHOLE_GENS), "--sampler", "sufficient"]  # fmt: skip
    with Whole() as w:
        suff = w.script(f"{settings}GENS = {WHOLE_GENS}\n{NUMPY_SUFFICIENT_SCRIPT}")
        a, b = short
        t_a = w.script(f"{settings}GENS = {a}\n{NUMPY_SAMPLES_SCRIPT}")
        t_b = w.script(f"{settings}GENS = {b}\n{NUMPY_SAMPLES_SCRIPT}")
        samples = extrapolate(a, t_a, b, t_b, WHOLE_GENS)
        print(f"NumPy sample-level script: {a} generations {t_a:.1f} s, {b} generations "
              f"{t_b:.1f} s -> {WHOLE_GENS} generations {samples:.0f} s (extrapolated)")  # fmt: skip
        for every in (10, 1):
            cold, warm = w.cli([*flags, "--record-every", str(every)])
            what = (
                f"d = 1, {WHOLE_CHAINS:,} chains x {WHOLE_GENS:,} generations, record every {every}"
            )
            print(line(what, cold, warm, samples, "NumPy sample-level script"))
            print(line(what, cold, warm, suff, "NumPy sufficient-statistic script"), flush=True)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ours_steady(d: int, m: int, chains: int, gens: int, repeats: int, record_every: int = 100):
    """Steady-state chain-generations/s of the sufficient sampler through the library's loop
    (:func:`scan_generations`, compile excluded): the marginal cost of ``gens`` generations,
    i.e. the time of a 2·gens run minus that of a gens run, so the one-off generation 0 (M_0
    real D0 samples per chain) is not counted as generational work."""
    record_every = min(record_every, gens)  # at least one record: a scan of length 0 runs nothing
    gens = gens - gens % record_every
    d0 = gd0.make_d0("normal", d)
    sharding = chain_sharding(chains)
    key = jax.random.key(0)
    seconds = []
    for horizon in (gens, 2 * gens):
        family = _family(d0, m, horizon)
        run = jax.jit(
            lambda key, family=family, horizon=horizon: scan_generations(
                family,
                key,
                None,
                np.full(horizon + 1, m),
                n_chains=chains,
                record_every=record_every,
                sharding=sharding,
            )
        )
        jax.block_until_ready(run(key))
        seconds.append(_best(lambda run=run: jax.block_until_ready(run(key)), repeats))
    return chains * gens / max(seconds[1] - seconds[0], 1e-9)


def _family(d0, m: int, gens: int):
    reduce = functools.partial(proc.reduce_info, log_trace0=float(np.log(d0.trace)))
    return proc.make_family(d0, np.full(gens, m))._replace(reduce=reduce)


def ours_end_to_end(d: int, m: int, chains: int, gens: int, record_every: int = 100) -> float:
    d0 = gd0.make_d0("normal", d)
    r = run_generations(
        _family(d0, m, gens),
        jax.random.key(1),
        chains,
        np.full(gens + 1, m),
        record_every=record_every,
        progress=False,
    )
    return chains * gens / r.seconds


def numpy_samples(d: int, m: int, chains: int, gens: int, repeats: int) -> float:
    """Draw M points per chain per generation and fit (the literal loop)."""
    rng = np.random.default_rng(0)

    def run():
        mean = np.zeros((chains, d))
        chol = np.broadcast_to(np.eye(d), (chains, d, d)).copy()
        for _ in range(gens):
            z = rng.standard_normal((chains, m, d))
            x = mean[:, None, :] + z @ np.swapaxes(chol, 1, 2)
            mean = x.mean(1)
            if d == 1:
                chol = x.std(1, ddof=1)[:, :, None]
            else:
                xc = x - mean[:, None, :]
                cov = np.swapaxes(xc, 1, 2) @ xc / (m - 1)
                chol = np.linalg.cholesky(cov)

    return chains * gens / _best(run, repeats)


def numpy_sufficient(d: int, m: int, chains: int, gens: int, repeats: int) -> float:
    """The same exact sufficient-statistic sampler in NumPy (vectorised over chains)."""
    rng = np.random.default_rng(0)

    def run_1d():
        mu = np.zeros(chains)
        sigma = np.ones(chains)
        for _ in range(gens):
            mu = mu + sigma * rng.standard_normal(chains) / np.sqrt(m)
            sigma = sigma * np.sqrt(rng.chisquare(m - 1, chains) / (m - 1))

    rows, cols = np.tril_indices(d, -1)
    dof = m - 1 - np.arange(d)

    def run_nd():
        mu = np.zeros((chains, d))
        chol = np.broadcast_to(np.eye(d), (chains, d, d)).copy()
        for _ in range(gens):
            z = rng.standard_normal((chains, d))
            mu = mu + np.einsum("cij,cj->ci", chol, z) / np.sqrt(m)
            a = np.zeros((chains, d, d))
            a[:, np.arange(d), np.arange(d)] = np.sqrt(rng.chisquare(dof, (chains, d)))
            a[:, rows, cols] = rng.standard_normal((chains, rows.size))
            chol = chol @ a / np.sqrt(m - 1)  # L A is lower triangular: the new Cholesky factor

    return chains * gens / _best(run_1d if d == 1 else run_nd, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--x64", action="store_true", help="float64 for our sampler")
    parser.add_argument("--whole-only", action="store_true", help="only the whole-process figures")
    args = parser.parse_args()
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if args.whole_only:
        whole_process()
        return
    jax.config.update("jax_enable_x64", args.x64)
    chains, gens, m = (2000, 200, 1000) if args.quick else (10_000, 1000, 1000)
    sample_gens = {1: 3 if args.quick else 10, 10: 1 if args.quick else 2}
    print(
        f"Gaussian recursion, {chains} chains, M = {m}, {gens} generations; devices: "
        f"{jax.devices()}; dtype {'float64' if args.x64 else 'float32'} (NumPy: float64)"
    )
    print(f"{'d':>3} {'implementation':<44} {'chain-gen/s':>12} {'ours / peer':>12}")
    for d in (1, 10):
        g = gens if d == 1 else gens // 5  # d = 10: steady state over fewer generations
        ours = ours_steady(d, m, chains, g, args.repeats)
        e2e = ours_end_to_end(d, m, chains, g)
        samp = numpy_samples(d, m, chains, sample_gens[d], max(1, args.repeats - 1))
        suff = numpy_sufficient(d, m, chains, gens if d == 1 else gens // 10, args.repeats)
        print(f"{d:>3} {'ours: sufficient (steady state)':<44} {ours:>12.3g}")
        print(f"{d:>3} {'ours: run_generations end to end (+compile)':<44} {e2e:>12.3g}")
        print(
            f"{d:>3} {'NumPy sample-level (draw M, fit)':<44} {samp:>12.3g} {ours / samp:>11.1f}x"
        )
        print(f"{d:>3} {'NumPy sufficient statistics':<44} {suff:>12.3g} {ours / suff:>11.2f}x")
    whole_process(short=(3, 6) if args.quick else (20, 220))


if __name__ == "__main__":
    main()
