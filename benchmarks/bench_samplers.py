"""Benchmark: Wright–Fisher multinomial resampling, collapse_jax.numerics.samplers vs NumPy.

Workload (the project's acceptance workload): K = 50 states, M = 1000 samples, 4096 chains,
counts start uniform (p0 = 1/K); each generation draws ``counts ~ Multinomial(M, counts / M)``
for every chain. Ours: ``jax.vmap(samplers.multinomial)`` over chains inside ``lax.scan`` over
generations (jitted, compile time excluded). Peer: NumPy ``Generator.multinomial`` with a 2-D
``pvals`` array (one call per generation for the whole chain batch).

NumPy's per-state loop stops once the remaining count hits 0, so it speeds up as states die;
we report chain-generations/s over the first 50 generations and over the full horizon, plus the
speed of our multinomial alone for compacted state axes K' = 50, 16, 8, 4 (what re-packing the
alive states buys). Each figure is the best of ``--repeats`` runs (the CPU may be shared).

    python benchmarks/bench_samplers.py [--quick] [--impl rbg]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.numerics import samplers


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_wf(k_states: int, m: int, n_gens: int):
    """Jitted: (keys[C], counts[C, K]) -> final counts after ``n_gens`` generations."""

    def step(counts, key_gen):
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_gen[0], key_gen[1])
        p = counts.astype(jnp.float32) / m
        new = jax.vmap(samplers.multinomial, in_axes=(0, None, 0))(keys, m, p)
        return new, None

    @jax.jit
    def run(keys, counts):
        gens = jnp.arange(n_gens, dtype=jnp.uint32)
        out, _ = jax.lax.scan(lambda c, g: step(c, (keys, g)), counts, gens)
        return out

    return run


def numpy_wf(rng, counts: np.ndarray, m: int, n_gens: int) -> np.ndarray:
    for _ in range(n_gens):
        counts = rng.multinomial(m, counts / m)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer generations and chains")
    ap.add_argument("--impl", default="threefry2x32", help="jax.random key implementation")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    k_states, m = 50, 1000
    chains = 1024 if args.quick else 4096
    horizons = (50, 200) if args.quick else (50, 1000)
    print(f"devices: {jax.devices()}; key impl {args.impl}; K={k_states} M={m} chains={chains}")
    keys = jax.random.split(jax.random.key(0, impl=args.impl), chains)
    counts0 = np.full((chains, k_states), m // k_states, np.int64)
    rng = np.random.default_rng(0)

    print("\n| generations | ours (chain-gen/s) | NumPy (chain-gen/s) | ours / NumPy |")
    print("|---|---|---|---|")
    for g in horizons:
        run = make_wf(k_states, m, g)
        c0 = jnp.asarray(counts0, jnp.int32)
        out = run(keys, c0).block_until_ready()  # compile
        assert int(out.sum()) == chains * m
        t_ours = _best(lambda run=run, c0=c0: run(keys, c0).block_until_ready(), args.repeats)
        t_np = _best(lambda g=g: numpy_wf(rng, counts0, m, g), args.repeats)
        r_ours, r_np = chains * g / t_ours, chains * g / t_np
        print(f"| {g} | {r_ours:.3g} | {r_np:.3g} | {r_ours / r_np:.2f} |")

    print("\nOur multinomial alone, one generation from uniform counts over K' alive states")
    print("| K' | ours (chain-gen/s) | NumPy (chain-gen/s) | ours / NumPy |")
    print("|---|---|---|---|")
    g = 20
    for kp in (50, 16, 8, 4):
        p = jnp.full((chains, kp), 1.0 / kp, jnp.float32)

        @jax.jit
        def draw(keys, p):
            def body(acc, gen):
                ks = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, gen)
                x = jax.vmap(samplers.multinomial, in_axes=(0, None, 0))(ks, m, p)
                return acc + x[:, 0], None

            acc, _ = jax.lax.scan(body, jnp.zeros((chains,), jnp.int32), jnp.arange(g))
            return acc

        draw(keys, p).block_until_ready()
        t_ours = _best(lambda draw=draw, p=p: draw(keys, p).block_until_ready(), args.repeats)
        pn = np.full((chains, kp), 1.0 / kp)
        t_np = _best(lambda pn=pn: [rng.multinomial(m, pn) for _ in range(g)], args.repeats)
        r_ours, r_np = chains * g / t_ours, chains * g / t_np
        print(f"| {kp} | {r_ours:.3g} | {r_np:.3g} | {r_ours / r_np:.2f} |")


if __name__ == "__main__":
    main()
