"""Numerical endurance: very long recursions must never produce NaN or inf in a recorded metric.

Runs the Gaussian study (float64, d = 1 and d = 10, unbiased estimator, replace: Σₙ → 0 by
hundreds of orders of magnitude) for 10⁵ generations and the GMM study for 10⁴ generations, each
in memory, and prints for every recorded metric the fraction of finite values (every chain, every
recorded generation) and how far the collapse went. ``tests/test_endurance.py`` runs the same
checks at reduced length in CI.

    python benchmarks/endurance.py [--gaussian-generations 100000] [--gmm-generations 10000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from collapse_jax.core.runs import RunDir
from collapse_jax.families.gaussian import study as gaussian
from collapse_jax.families.gmm import study as gmm


def check(name: str, arrays: dict, metrics) -> bool:
    ok = True
    for m in metrics:
        mean = arrays[f"{m}_mean"]
        bad = int(np.sum(~np.isfinite(mean)))
        if f"{m}_chains" in arrays:  # every chain's value at every record
            finite = np.isfinite(arrays[f"{m}_chains"]).mean(axis=1)
        else:  # the fraction of finite chains at every record
            finite = arrays.get(f"{m}_finite")
        worst = float(np.min(finite)) if finite is not None else float("nan")
        print(f"  {name} {m:<16} non-finite means: {bad}, lowest finite fraction over chains: "
              f"{worst:.4f}, last mean {mean[-1]:.4g}")  # fmt: skip
        ok &= bad == 0 and (finite is None or worst == 1.0)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gaussian-generations", type=int, default=100_000)
    ap.add_argument("--gmm-generations", type=int, default=10_000)
    ap.add_argument("--chains", type=int, default=1000)
    a = ap.parse_args()
    ok = True
    for dim in (1, 10):
        cfg = gaussian.Config(
            dim=dim,
            samples=20,
            chains=a.chains,
            generations=a.gaussian_generations,
            record_every=max(1, a.gaussian_generations // 1000),
        )
        t = time.perf_counter()
        rd = RunDir(None)
        s = gaussian.run(cfg, rd, progress=False)
        print(f"gaussian d = {dim}, {a.chains} chains x {cfg.generations} generations, float64: "
              f"{time.perf_counter() - t:.1f} s; final mean log tr Σ_n "
              f"{s['log_trace_cov']['mean'][-1]:.4g}, numerically collapsed chains "
              f"{s['numerically_collapsed_fraction'][-1]:.3%}")  # fmt: skip
        ok &= check(f"d={dim}", rd.arrays, gaussian.METRICS)
    cfg = gmm.Config(
        chains=16, generations=a.gmm_generations, samples=1000, tol=1e-5, record_every=10
    )
    t = time.perf_counter()
    rd = RunDir(None)
    s = gmm.run(cfg, rd, progress=False)
    print(f"gmm 16 recursions x {cfg.generations} generations: {time.perf_counter() - t:.1f} s; "
          f"final component std {s['final']['component_std']['mean']:.4g}")  # fmt: skip
    metrics = ("l2_distance", "component_std", "heldout_loglik", "weight_entropy", "train_loglik")
    ok &= check("gmm", rd.arrays, metrics)
    print("ALL FINITE" if ok else "NON-FINITE VALUES FOUND")


if __name__ == "__main__":
    main()
