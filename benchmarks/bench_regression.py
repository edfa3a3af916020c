"""Benchmark: the regression recursion through collapse_jax against the NumPy loop a researcher
writes (Collapse-or-Thrive's ``fit_linear_regressions`` shape), same work, one process.

Workload: d = 10, T = 100 rows of a fixed isotropic design per chain, σ = 1, OLS, replace, the
test error ‖ŵ_n − w*‖² every generation; C chains × G generations.

Peers, both NumPy in this process:
* ``per-seed loop``: the published shape, one chain (seed) at a time, ``np.linalg.pinv(X) @ y``
  every iteration (timed on a few chains and extrapolated: its cost per chain is constant);
* ``batched``: the same recursion written by hand over all chains at once (``np.linalg.solve``
  on the stacked normal equations), the strongest NumPy a researcher is likely to write.

Ours: the study's kernels on the shared runner, the ``sufficient`` path (exact statistics, cost
independent of T) and the ``samples`` path (the rows themselves): steady state (second run of the
compiled program) and first call (compilation included). Then the whole process, each in a fresh
interpreter: ``collapse-jax run regression`` with a cold compilation cache and again warm (report
and figures written), against a script running the batched NumPy loop and writing its result.

Run: ``python benchmarks/bench_regression.py [--chains C] [--generations G] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from collapse_jax.core.loop import precision, run_generations
from collapse_jax.families.regression import kernel as proc
from collapse_jax.families.regression import study

from whole import Whole, line

D, T, SIGMA = 10, 100, 1.0


def per_seed_loop(seed: int, generations: int) -> float:
    """One seed, the published shape (pinv every iteration); returns the final test error."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=D)
    x = rng.normal(size=(T, D))
    y = x @ w_star + SIGMA * rng.normal(size=T)
    err = 0.0
    for _ in range(generations):
        w_hat = np.linalg.pinv(x) @ y
        err = float(np.sum((w_hat - w_star) ** 2))
        y = x @ w_hat + SIGMA * rng.normal(size=T)
    return err


BATCHED = """
import numpy as np
def batched(chains, generations, seed=0):
    rng = np.random.default_rng(seed)
    w_star = np.full(D, 1 / np.sqrt(D))
    x = rng.normal(size=(chains, T, D))
    gram = np.einsum("ctj,ctk->cjk", x, x)
    y = x @ w_star + SIGMA * rng.normal(size=(chains, T))
    errs = np.empty((generations, chains))
    for g in range(generations):
        w_hat = np.linalg.solve(gram, np.einsum("ctj,ct->cj", x, y)[..., None])[..., 0]
        errs[g] = np.sum((w_hat - w_star) ** 2, axis=1)
        y = np.einsum("ctj,cj->ct", x, w_hat) + SIGMA * rng.normal(size=(chains, T))
    return errs
"""
_PEER = {"D": D, "T": T, "SIGMA": SIGMA}
exec(BATCHED, _PEER)  # the same source runs here and, below, as the peer's whole script
batched = _PEER["batched"]


def ours(sampler: str, chains: int, generations: int) -> tuple[float, float, float]:
    """(first call with compilation, steady state) seconds and the final mean excess risk."""
    config = study.Config(
        dim=D, samples=T, noise=SIGMA, chains=chains, generations=generations, sampler=sampler
    )
    spec, path, sizes, _ = study.setup(config)
    with precision(True):
        family = proc.make_family(spec, path)

        def once():
            t = time.perf_counter()
            res = run_generations(family, jax.random.key(0), chains, sizes, progress=False)
            jax.block_until_ready(res.state)
            return time.perf_counter() - t, float(res.trace.excess_risk.mean[-1])

        first, _ = once()
        steady, err = once()
    return first, steady, err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", type=int, default=1000)
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--peer-chains", type=int, default=20, help="seeds timed for the per-seed loop")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    chains, gens = (64, 20) if a.quick else (a.chains, a.generations)
    work = chains * gens
    print(f"workload: d = {D}, T = {T}, sigma = {SIGMA}, OLS, replace, fixed design; "
          f"{chains} chains x {gens} generations; load {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")  # fmt: skip

    t = time.perf_counter()
    for s in range(min(a.peer_chains, chains)):
        per_seed_loop(s, gens)
    loop_rate = min(a.peer_chains, chains) * gens / (time.perf_counter() - t)
    t = time.perf_counter()
    errs = batched(chains, gens)
    batched_s = time.perf_counter() - t
    print(f"NumPy per-seed loop (pinv)      : {loop_rate:10.3e} chain-gen/s")
    print(f"NumPy batched (solve)           : {work / batched_s:10.3e} chain-gen/s "
          f"({batched_s:.2f} s; final E err {errs[-1].mean():.4f})")  # fmt: skip
    for sampler in ("sufficient", "samples"):
        first, steady, err = ours(sampler, chains, gens)
        print(f"collapse_jax {sampler:<10} steady : {work / steady:10.3e} chain-gen/s "
              f"({steady:.3f} s; first call {first:.2f} s; final E err {err:.4f}) -> "
              f"{loop_rate and work / steady / loop_rate:.0f}x the per-seed loop, "
              f"{batched_s / steady:.1f}x batched NumPy")  # fmt: skip
    print(f"theory sigma^2 n d/(T-d-1) at n = {gens}: {SIGMA**2 * gens * D / (T - D - 1):.4f}")

    # Whole process, each in a fresh interpreter.
    with Whole() as w:
        cold, warm = w.cli(["regression", "--dim", str(D), "--samples", str(T),
                            "--chains", str(chains), "--generations", str(gens)])  # fmt: skip
        peer = w.script(
            f"D, T, SIGMA = {D}, {T}, {SIGMA}\n{BATCHED}\n"
            f"np.save(OUT.replace('.npz', '.npy'), batched({chains}, {gens}))\n"
        )
    print(line("collapse-jax run regression (report + figures)", cold, warm, peer,
               "batched NumPy script"))  # fmt: skip


if __name__ == "__main__":
    main()
