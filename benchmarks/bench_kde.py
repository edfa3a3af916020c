"""Benchmark: the KDE recursion through collapse_jax against scikit-learn's ``KernelDensity``
fit-and-sample loop (what a researcher would write; Collapse-or-Thrive's own loop).

Workload (one chain = one seed of Collapse-or-Thrive's sweep): moons with noise 0.05, M = 100
points per generation, Gaussian kernel h = 0.1, replace, and every generation the mean negative
log-likelihood of M held-out real points under the KDE. Ours runs all chains at once through the
study's kernels on the shared runner (also measuring pairwise distances, ancestors and W₂ for one
chain); scikit-learn runs one chain at a time in a Python loop, timed on fewer chains and
extrapolated linearly (its cost per chain does not depend on the chain).

Reported: chain-generations per second, steady state (a second run of the compiled program) and
whole (first run, compilation included; and the study end to end in memory), wall and process
CPU time. Then the whole process (``whole.py``: fresh interpreters, cold and warm compilation
cache, report and figures written) of ``collapse-jax run kde`` on the same workload against a
script running scikit-learn's loop, whose time for R chains is extrapolated from whole runs of
P and 2P chains: T(R) = T(P) + (T(2P) − T(P)) (R − P) / P.

Run: ``python benchmarks/bench_kde.py [--chains R] [--generations G] [--peer-chains P]
[--whole-only]``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from sklearn.datasets import make_moons
from sklearn.neighbors import KernelDensity

from collapse_jax.core.loop import run_generations
from collapse_jax.core.runs import RunDir
from collapse_jax.families.kde import kernel as proc
from collapse_jax.families.kde import study

from whole import Whole, extrapolate, line

M, H, NOISE = 100, 0.1, 0.05


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    return time.perf_counter() - t[0], time.process_time() - t[1]


def ours(chains: int, generations: int) -> dict:
    config = study.validate(
        study.Config(
            dataset="moons",
            bandwidth=str(H),
            samples=M,
            chains=chains,
            generations=generations,
            heldout=M,
            noise=NOISE,
            w2_chains=1,
            w2_samples=32,
        )
    )
    dataset, _, sizes, spec = study.setup(config)
    family = proc.make_family(spec, dataset)._replace(reduce=study.make_reduce(config))

    def once():
        t = _clock()
        r = run_generations(family, jax.random.key(0), chains, sizes, progress=False)
        jax.block_until_ready(r.state)
        return _since(t), r

    (first, _), (warm, r) = once(), once()
    t = _clock()
    study.run(config, RunDir(None), progress=False)
    whole = _since(t)
    nll = float(np.nanmean(np.asarray(r.trace["heldout_nll"])[-1]))
    return {"first": first, "warm": warm, "study": whole, "nll_last": nll}


def peer(chains: int, generations: int) -> dict:
    t = _clock()
    last = []
    for seed in range(chains):
        rng = np.random.RandomState(seed)
        x = make_moons(2 * M, noise=NOISE, random_state=rng)[0]
        data, test = x[:M], x[M:]
        for _ in range(generations):
            kde = KernelDensity(kernel="gaussian", bandwidth=H).fit(data)
            nll = -kde.score_samples(test).mean()
            data = kde.sample(M, random_state=rng)
        last.append(nll)
    return {"time": _since(t), "nll_last": float(np.mean(last))}


#: The peer's whole script: scikit-learn's fit-score-sample loop, one chain at a time.
SKLEARN_SCRIPT = """
import numpy as np
from sklearn.datasets import make_moons
from sklearn.neighbors import KernelDensity
last = []
for seed in range(CHAINS):
    rng = np.random.RandomState(seed)
    x = make_moons(2 * M, noise=NOISE, random_state=rng)[0]
    data, test = x[:M], x[M:]
    for _ in range(G):
        kde = KernelDensity(kernel="gaussian", bandwidth=H).fit(data)
        nll = -kde.score_samples(test).mean()
        data = kde.sample(M, random_state=rng)
    last.append(nll)
np.savez(OUT, nll=np.array(last))
"""


def whole_process(chains: int, generations: int, peer_chains: int) -> None:
    with Whole() as w:
        cold, warm = w.cli(["kde", "--dataset", "moons", "--bandwidth", str(H), "--samples",
                            str(M), "--chains", str(chains), "--generations", str(generations),
                            "--heldout", str(M), "--noise", str(NOISE), "--w2-chains", "1",
                            "--w2-samples", "32"])  # fmt: skip
        settings = f"M, H, NOISE, G = {M}, {H}, {NOISE}, {generations}\n"
        t1 = w.script(f"CHAINS = {peer_chains}\n{settings}{SKLEARN_SCRIPT}")
        t2 = w.script(f"CHAINS = {2 * peer_chains}\n{settings}{SKLEARN_SCRIPT}")
    peer_time = extrapolate(peer_chains, t1, 2 * peer_chains, t2, chains)
    print(f"scikit-learn script: {peer_chains} chains {t1:.1f} s, {2 * peer_chains} chains "
          f"{t2:.1f} s -> {chains} chains {peer_time:.0f} s (extrapolated)")  # fmt: skip
    what = f"{chains} chains x {generations} generations (report + figures)"
    print(line(what, cold, warm, peer_time, "scikit-learn script"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=1000)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--peer-chains", type=int, default=20)
    parser.add_argument("--whole-only", action="store_true", help="only the whole-process figures")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, JAX {jax.__version__}")
    if args.whole_only:
        whole_process(args.chains, args.generations, args.peer_chains)
        return
    work = args.chains * args.generations
    o = ours(args.chains, args.generations)
    p = peer(args.peer_chains, args.generations)
    peer_rate_wall = args.peer_chains * args.generations / p["time"][0]
    peer_rate_cpu = args.peer_chains * args.generations / p["time"][1]
    print(
        f"workload: moons noise {NOISE}, M = {M}, h = {H}, replace, {args.chains} chains × "
        f"{args.generations} generations (scikit-learn: {args.peer_chains} chains, extrapolated)"
    )
    print(
        f"final held-out NLL: ours {o['nll_last']:.4f}, scikit-learn {p['nll_last']:.4f} "
        "(means over chains; same law, different random numbers)"
    )
    rows = [
        ("ours, steady state", o["warm"]),
        ("ours, first run incl. compilation", o["first"]),
        ("ours, study end to end (in memory)", o["study"]),
    ]
    for label, (wall, cpu) in rows:
        print(
            f"{label:<38} {work / wall:10.4g} chain-gen/s wall ({wall:7.2f} s), "
            f"{work / cpu:10.4g} CPU;  ratio vs scikit-learn {work / wall / peer_rate_wall:7.2f}× "
            f"wall, {work / cpu / peer_rate_cpu:7.2f}× CPU"
        )
    print(
        f"{'scikit-learn KernelDensity loop':<38} {peer_rate_wall:10.4g} chain-gen/s wall "
        f"({p['time'][0]:7.2f} s for {args.peer_chains} chains), {peer_rate_cpu:10.4g} CPU"
    )

    whole_process(args.chains, args.generations, args.peer_chains)


if __name__ == "__main__":
    main()
