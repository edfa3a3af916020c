"""Benchmark: our vectorised EM against scikit-learn's ``GaussianMixture`` (the paper's peer).

1. One fit: 1,000 points of N(0, I₂), 2 full-covariance components, tol 1e-5 (the paper's),
   reg_covar 1e-6, both started from the same k-means initial parameters (scikit-learn's
   ``weights_init`` / ``means_init`` / ``precisions_init``); times and log-likelihoods reached.
2. The recursion: R recursions × G generations of fit-and-resample (the paper's loop, fresh
   k-means initialisation every generation). Ours runs all recursions at once through the gmm
   study (vmap + scan); scikit-learn runs one recursion at a time in a Python loop, timed on
   fewer recursions and generations and extrapolated linearly (its cost per generation does not
   depend on the recursion).

3. The whole process (``whole.py``: fresh interpreters, cold and warm compilation cache, report
   and figures written) of ``collapse-jax run gmm`` on the demo config (32 recursions × 200
   generations, tol 1e-3) against a script running the same loop with scikit-learn, all 32
   recursions.

Run: ``python benchmarks/bench_gmm.py [--quick] [--whole-only]``. Wall and process CPU times are printed; on a
shared machine, CPU time is the fairer comparison. scikit-learn runs with BLAS limited to one
thread (its fastest setting for these tiny matrices).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from collapse_jax.core.loop import scan_generations
from collapse_jax.families.gmm import kernel as proc
from collapse_jax.families.gmm import study as study

from whole import Whole, line

TOL = 1e-5
REG = 1e-6


def _timed(fn, *args):
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    out = jax.block_until_ready(out) if not isinstance(out, GaussianMixture) else out
    return out, time.perf_counter() - t, time.process_time() - c


def one_fit(repeats: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 2))
    xj = jnp.asarray(x, jnp.float32)
    wj = jnp.ones(1000, jnp.float32)
    cfg = proc.EMConfig("full", TOL, 100, REG)
    init = jax.jit(proc.initialize, static_argnums=(3, 4, 5))(
        jax.random.key(0), xj, wj, 2, cfg, "kmeans"
    )
    fit = jax.jit(proc.fit_em, static_argnums=3)
    (_, _), t_compile, _ = _timed(fit, xj, wj, init, cfg)
    ours = [_timed(fit, xj, wj, init, cfg) for _ in range(repeats)]
    (_, info) = ours[-1][0]
    t_ours = min(o[1] for o in ours)
    c_ours = min(o[2] for o in ours)

    w0 = np.asarray(init.weights, np.float64)

    def sk_fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return GaussianMixture(
                2,
                covariance_type="full",
                tol=TOL,
                reg_covar=REG,
                max_iter=100,
                weights_init=w0 / w0.sum(),
                means_init=np.asarray(init.means, np.float64),
                precisions_init=np.linalg.inv(np.asarray(init.covs, np.float64)),
            ).fit(x)

    sk = [_timed(sk_fit) for _ in range(repeats)]
    t_sk = min(s[1] for s in sk)
    c_sk = min(s[2] for s in sk)
    gm = sk[-1][0]
    print("## one fit (1000 points, K = 2 full, tol 1e-5, same initial parameters)")
    print(
        f"ours    : {t_ours * 1e3:8.2f} ms wall, {c_ours * 1e3:8.2f} ms CPU, {int(info.n_iter)} "
        f"iterations, mean log-lik {float(info.loglik):.7f} (compile {t_compile:.2f} s)"
    )
    print(
        f"sklearn : {t_sk * 1e3:8.2f} ms wall, {c_sk * 1e3:8.2f} ms CPU, {gm.n_iter_} "
        f"iterations, mean log-lik {gm.score(x):.7f}"
    )
    print(f"log-lik difference (ours - sklearn): {float(info.loglik) - gm.score(x):+.2e} per point")
    print(f"ratio sklearn/ours: {t_sk / t_ours:.2f}× wall, {c_sk / c_ours:.2f}× CPU")


def sklearn_recursion(recursions: int, generations: int, seed: int = 0):
    """The paper's loop with scikit-learn, one recursion at a time."""
    finals = []
    for r in range(recursions):
        rng = np.random.default_rng(seed + r)
        x = rng.normal(size=(1000, 2))
        for _ in range(generations):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gm = GaussianMixture(
                    2,
                    covariance_type="full",
                    tol=TOL,
                    reg_covar=REG,
                    random_state=int(rng.integers(2**31)),
                ).fit(x)
            x, _ = gm.sample(1000)
            x = x[
                rng.permutation(1000)
            ]  # GaussianMixture.sample returns points sorted by component
        std = np.mean([np.sqrt(np.trace(c) / 2) for c in gm.covariances_])
        finals.append((gm.score(x), std))
    return finals


def recursion(chains: int, generations: int, sk_recursions: int, sk_generations: int) -> None:
    base = dataclasses.replace(
        study.Config(),
        chains=chains,
        tol=TOL,
        record_every=generations,
        w2_chains=1,
        w2_samples=16,
        heldout=1000,
        snapshots=(0,),
    )

    cfg = study.validate(dataclasses.replace(base, generations=generations))
    c0 = time.process_time()
    trace, _, _, t_long, *_ = study.simulate(cfg, progress=False)
    c_long = time.process_time() - c0

    # Steady state: the same kernels in one jitted vmap + scan, timed on a second call.
    d0, _, sizes, spec = study.setup(cfg)
    family = proc.make_family(spec, d0)._replace(reduce=lambda info: info.component_std)

    @jax.jit
    def run_all(key):
        return scan_generations(family, key, None, sizes, n_chains=chains)[1]

    key = jax.random.key(1)
    jax.block_until_ready(run_all(key))
    _, t_ours, c_ours = _timed(run_all, key)

    t, c = time.perf_counter(), time.process_time()
    finals = sklearn_recursion(sk_recursions, sk_generations)
    t_sk_part, c_sk_part = time.perf_counter() - t, time.process_time() - c
    scale = chains * generations / (sk_recursions * sk_generations)
    t_sk, c_sk = t_sk_part * scale, c_sk_part * scale

    print(
        f"\n## recursion: {chains} recursions × {generations} generations (M = 1000, K = 2, "
        "k-means init every generation, tol 1e-5)"
    )
    print(
        f"ours    : {t_long:8.2f} s wall, {c_long:8.2f} s CPU through the study (compilation "
        f"included); kernels alone {t_ours:8.2f} s wall, {c_ours:8.2f} s CPU "
        f"({chains * generations / t_ours:.1f} recursion-generations/s)"
    )
    print(
        f"sklearn : {t_sk_part:8.2f} s wall for {sk_recursions} × {sk_generations}; extrapolated "
        f"{t_sk:8.1f} s wall, {c_sk:8.1f} s CPU ({sk_recursions * sk_generations / t_sk_part:.1f} "
        "recursion-generations/s)"
    )
    print(
        f"ratio sklearn/ours (kernels): {t_sk / t_ours:.1f}× wall, {c_sk / c_ours:.1f}× CPU; "
        f"through the study incl. compilation: {t_sk / t_long:.1f}× wall, "
        f"{c_sk / c_long:.1f}× CPU"
    )
    std = trace["component_std"][-1]
    ll = trace["train_loglik"][-1]
    print(
        f"final generation, ours: mean component std {std.mean():.4f}, training log-lik "
        f"{ll.mean():.4f} (mean over {chains}); sklearn: std "
        f"{np.mean([f[1] for f in finals]):.4f}, log-lik {np.mean([f[0] for f in finals]):.4f} "
        f"(mean over {sk_recursions})"
    )


#: The peer's whole script: R recursions of the paper's loop with scikit-learn (single-threaded
#: BLAS, as above), G generations each; the final component spreads are saved to OUT.
SKLEARN_SCRIPT = """
import warnings
import numpy as np
from threadpoolctl import threadpool_limits
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
threadpool_limits(1)
spread = []
for r in range(R):
    rng = np.random.default_rng(r)
    x = rng.normal(size=(1000, 2))
    for _ in range(G):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm = GaussianMixture(2, covariance_type="full", tol=TOL, reg_covar=1e-6,
                                 random_state=int(rng.integers(2**31))).fit(x)
        x, _ = gm.sample(1000)
        x = x[rng.permutation(1000)]
    spread.append([np.sqrt(np.trace(c) / 2) for c in gm.covariances_])
np.savez(OUT, spread=np.array(spread))
"""


def whole_process() -> None:
    demo = study.demo_config()
    with Whole() as w:
        cold, warm = w.cli(["gmm", "--chains", str(demo.chains), "--generations",
                            str(demo.generations), "--record-every", str(demo.record_every),
                            "--tol", str(demo.tol), "--w2-samples", str(demo.w2_samples)])  # fmt: skip
        settings = f"R, G, TOL = {demo.chains}, {demo.generations}, {demo.tol}\n"
        peer = w.script(f"{settings}{SKLEARN_SCRIPT}")
    what = (
        f"demo config ({demo.chains} recursions x {demo.generations} generations, tol {demo.tol})"
    )
    print(line(what, cold, warm, peer, "scikit-learn script"))


def main() -> None:
    from threadpoolctl import threadpool_limits

    # scikit-learn's tiny BLAS calls run fastest single-threaded (no thread wake-ups).
    threadpool_limits(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--whole-only", action="store_true", help="only the whole-process figures")
    args = parser.parse_args()
    if args.whole_only:
        whole_process()
        return
    print(f"devices: {jax.devices()}")
    if args.quick:
        one_fit(3)
        recursion(32, 10, 2, 5)
    else:
        one_fit(10)
        recursion(256, 100, 4, 25)
    whole_process()


if __name__ == "__main__":
    main()
