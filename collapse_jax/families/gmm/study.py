"""The Gaussian-mixture study: hundreds of recursions of EM fitting and resampling at once, with
the paper's scatter snapshots and the L2 and component-std curves over recursions."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.core import compilation, operators
from collapse_jax.core.errors import (
    ConfigError,
    check_choice,
    check_float,
    check_int,
    check_memory,
)
from collapse_jax.core.flags import add_config_arguments, apply_flags, as_tuple
from collapse_jax.core.loop import run_generations
from collapse_jax.core.policies import Policy, Schedule, check_loop_fields, check_reuse
from collapse_jax.core.runs import RunDir, series
from collapse_jax.core.statistics import chain_arrays
from collapse_jax.families import DESCRIPTIONS
from collapse_jax.families.gmm import kernel as proc
from collapse_jax.families.gmm.metrics import w2_exact_records, w2_pairs, w2_sinkhorn
from collapse_jax.families.gmm.report import claims, make_figures, write_report
from collapse_jax.numerics.random import seed_key

NAME = "gmm"
DESCRIPTION = DESCRIPTIONS[NAME]

#: Per-recursion scalar metrics recorded every ``record_every`` generations.
METRICS = (
    "l2_distance",
    "component_std",
    "component_std_min",
    "component_std_max",
    "l2_to_first_fit",
    "heldout_loglik",
    "weight_entropy",
    "train_loglik",
    "em_iterations",
    "em_converged",
)
#: The paper's scatter-plot generations.
PAPER_SNAPSHOTS = (0, 50, 100, 150, 200, 350, 2000)
#: Largest accumulation pool (points × recursions × d) allowed, in float32 bytes.
MAX_POOL_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class Config(operators.OperatorFields):
    """The GMM study. Defaults: the paper's figure (1,000 points of N(0, I₂), 2 full-covariance
    components, 2,000 generations), with 256 independent recursions.
    The data-operator fields come from :class:`collapse_jax.core.operators.OperatorFields`."""

    components: int = 2  # K, mixture components fitted at every generation
    covariance_type: str = "full"  # full | diag | spherical
    init: str = "kmeans"  # kmeans (scikit-learn's default) | kmeans++ | warm (previous fit)
    samples: int = 1000  # M_0, points per generation (first size of a schedule)
    chains: int = 256  # independent recursions run at once
    generations: int = 2000  # fitted generations after generation 0 (= D0)
    policy: str = "replace"  # replace | accumulate | accumulate-subsample | mix:ALPHA,BETA,GAMMA
    fresh_fraction: float = 0.0  # gamma: fraction of every new batch drawn fresh from D0
    schedule: str = "constant"  # constant | linear[:SLOPE] | poly:A | list:M0,M1,... | file.npy
    tol: float = 1e-5  # EM stops when the mean log-likelihood changes by less than this
    max_iter: int = 100  # maximum EM iterations per generation
    reg_covar: float = 1e-6  # added to covariance diagonals (scikit-learn's reg_covar)
    record_every: int = 1  # keep metrics of every k-th generation (and the last)
    seed: int = 0  # PRNG seed; same seed, same results
    d0: str = "paper"  # paper | two-gaussians | mixture | path to an (N, d) .npy of points
    d0_weights: tuple = ()  # d0 = mixture: weights, e.g. [0.3, 0.7]
    d0_means: tuple = ()  # d0 = mixture: K × d means, e.g. [[0, 0], [3, 0]]
    d0_covs: tuple = ()  # d0 = mixture: covariances, (K, d, d), (K, d) diagonal or (K,) variances
    heldout: int = 1000  # held-out original points (fresh per recursion; .npy: set aside once)
    w2_samples: int = 256  # points per side of the W2 estimate (<= heldout)
    w2_every: int = 0  # W2 every k generations (a multiple of record_every); 0: about 20 times
    w2_method: str = "exact"  # exact (optimal assignment, SciPy on the host) | sinkhorn (ott-jax)
    w2_chains: int = 64  # recursions whose W2 is estimated (the first ones); 0: all
    w2_epsilon: float = 1e-2  # sinkhorn: regularisation (absolute, squared-distance units)
    pool_capacity: int = 0  # accumulating policies: pool size in points; 0: exactly what is needed
    snapshots: tuple = PAPER_SNAPSHOTS  # generations whose points (recursion 0) are plotted


def validate(config: Config) -> Config:
    check_loop_fields(config)
    """Check every field; raise ConfigError naming the bad value. Returns the config with list
    fields (from TOML) turned into tuples."""
    config = dataclasses.replace(
        config,
        d0_weights=as_tuple(config.d0_weights),
        d0_means=as_tuple(config.d0_means),
        d0_covs=as_tuple(config.d0_covs),
        snapshots=as_tuple(config.snapshots),
    )
    check_int("components", config.components, 1)
    check_choice("covariance type", config.covariance_type, proc.COVARIANCE_TYPES)
    check_choice("init", config.init, proc.INITS)
    check_float("tol", config.tol, 0.0)
    check_int("max_iter", config.max_iter, 1)
    check_float("reg_covar", config.reg_covar, 0.0, open_min=True)
    check_int("heldout", config.heldout, 1)
    check_int("w2_samples", config.w2_samples, 1, config.heldout)
    check_int("w2_every", config.w2_every, 0)
    if config.w2_every and config.w2_every % config.record_every:
        raise ConfigError(
            f"w2_every {config.w2_every} must be a multiple of record_every {config.record_every}"
        )
    check_choice("w2 method", config.w2_method, ("exact", "sinkhorn"))
    check_int("w2_chains", config.w2_chains, 0)
    check_float("w2_epsilon", config.w2_epsilon, 0.0, open_min=True)
    check_int("pool_capacity", config.pool_capacity, 0)
    for g in config.snapshots:
        check_int(f"snapshots {config.snapshots}: generation", g, 0)
    if config.d0 != "mixture":
        for name in ("d0_weights", "d0_means", "d0_covs"):
            if getattr(config, name):
                raise ConfigError(
                    f"{name} {getattr(config, name)} applies to d0 = 'mixture' only, "
                    f"not d0 {config.d0!r}"
                )
    setup(config)
    return config


def spec_ops(config: Config) -> operators.Operators:
    """The run's data operators (validated)."""
    return setup(config)[3].ops


def setup(config: Config):
    """Everything derived from the config: (D0, policy, sizes M_0..M_G, recursion spec)."""
    try:
        d0 = proc.original_data(config.d0, config.d0_weights, config.d0_means, config.d0_covs)
    except ConfigError as e:
        if config.d0 != "mixture":
            raise
        raise ConfigError(
            f"d0 mixture (d0_weights {config.d0_weights}, d0_means {config.d0_means}, d0_covs "
            f"{config.d0_covs}): {e}"
        ) from None
    check_memory(
        4 * d0.dim * config.chains * config.heldout,
        f"chains {config.chains} of heldout {config.heldout} points",
        "use fewer chains or held-out points",
    )
    d0 = d0.split_heldout(config.heldout, config.seed)
    policy = Policy.parse(config.policy, config.fresh_fraction)
    # M_0 .. M_G: M_n is the batch drawn at generation n (M_G is drawn but never fitted).
    sizes = Schedule.parse(config.schedule).sizes(config.samples, config.generations + 1)
    k = config.components
    if sizes.min() < k:
        raise ConfigError(
            f"every generation needs at least as many points as components ({k}); the "
            f"schedule gives {int(sizes.min())} points"
        )
    if d0.points is not None and d0.points.shape[0] < sizes[0]:
        raise ConfigError(
            f"d0 point set has {d0.points.shape[0]} points after setting {config.heldout} aside "
            f"for evaluation, fewer than samples = {int(sizes[0])}"
        )
    check_reuse(policy, sizes)
    max_batch = int(sizes.max())
    need = int(sizes[:-1].sum()) + max_batch  # pool slots: all fitted data + one batch of slack
    capacity = 0
    if policy.accumulates:
        if config.pool_capacity and config.pool_capacity < need - max_batch:
            raise ConfigError(
                f"policy {policy.mode!r} pools {need - max_batch} points over {config.generations} "
                f"generations, more than pool_capacity = {config.pool_capacity}; raise "
                "pool_capacity or run fewer generations (an exact accumulating pool cannot drop data)"
            )
        capacity = max(need, config.pool_capacity + max_batch)
        nbytes = capacity * d0.dim * 4 * config.chains
        if nbytes > MAX_POOL_BYTES:
            raise ConfigError(
                f"policy {policy.mode!r} with pool_capacity {config.pool_capacity} needs a pool "
                f"of {capacity} points per recursion "
                f"({nbytes / 2**30:.1f} GiB for {config.chains} recursions), above "
                f"{MAX_POOL_BYTES / 2**30:.0f} GiB; use fewer generations, recursions or samples"
            )
    # Per recursion: the batch, training set, pool and held-out points, and EM's
    # responsibilities (points × components, over the pool for accumulating policies).
    rows = 3 * max_batch + capacity
    check_memory(
        4 * config.chains * (rows * (d0.dim + 1 + k) + config.heldout * d0.dim),
        f"chains {config.chains} of {rows} points and components {k}",
        "use fewer chains, samples or components",
    )
    if config.top_k > k:
        raise ConfigError(f"top_k {config.top_k} exceeds the {k} components")
    em = proc.EMConfig(config.covariance_type, config.tol, config.max_iter, config.reg_covar)
    spec = proc.RecursionSpec(
        n_components=k,
        em=em,
        init=config.init,
        policy=policy,
        m0=int(sizes[0]),
        max_batch=max_batch,
        pool_capacity=capacity,
        heldout=config.heldout if d0.heldout is None else d0.heldout.shape[0],
        w2_samples=config.w2_samples,
        ops=operators.parse(config, NAME, operators.MIXTURE_OPERATORS, dim=d0.dim),
    )
    return d0, policy, sizes, spec


def w2_every(config: Config) -> int:
    """Generations between W2 estimates: the configured value, or about 20 over the run."""
    if config.w2_every:
        return config.w2_every
    records = -(-config.generations // config.record_every)
    return config.record_every * max(1, round(records / 20))


def demo_config() -> Config:
    """A short study for `collapse-jax demo` (about half a minute on 2 CPU cores)."""
    return Config(chains=32, generations=200, record_every=5, tol=1e-3, w2_samples=128)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's flags, one per config field; unset flags leave the config unchanged."""
    add_config_arguments(parser, Config)


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    """Apply the flags that were given onto ``base`` and validate."""
    return apply_flags(args, base, validate)


# ---------------------------------------------------------------------------------------------


def make_reduce(config: Config):
    """The per-record reduction: per-recursion scalar metrics, recursion 0's batch (scatter
    snapshots) and, every ``w2_every`` generations and at the last, the Sinkhorn W2² estimate
    between fresh samples of each recursion's model and its held-out original points."""
    every = w2_every(config)
    last = config.generations
    eps = config.w2_epsilon
    n_w2 = config.chains if config.w2_chains == 0 else min(config.w2_chains, config.chains)

    def reduce(info: proc.GMMInfo):
        gen = info.generation[0]
        do_w2 = (gen % every == 0) | (gen == last)
        out = {name: getattr(info, name) for name in METRICS}
        if config.w2_method == "exact":  # on the host, after the chunk (w2_exact_records)
            out.update(w2_pairs(info.w2_model[:n_w2], info.w2_original[:n_w2], do_w2))
        else:
            nan = jnp.full(info.generation.shape, jnp.nan, info.w2_model.dtype)
            sinkhorn = jax.vmap(lambda p, q: w2_sinkhorn(p, q, eps))
            out["w2"] = jax.lax.cond(
                do_w2,
                lambda: nan.at[:n_w2].set(sinkhorn(info.w2_model[:n_w2], info.w2_original[:n_w2])),
                lambda: nan,
            )
        out["snapshot"] = info.batch[0]
        out["snapshot_w"] = info.batch_w[0]
        return out

    return reduce


def simulate(config: Config, progress: bool | None = None, checkpoint=None):
    """Run the recursions; return (trace of per-record arrays, generations, sizes, seconds,
    D0, policy, final per-recursion state)."""
    d0, policy, sizes, spec = setup(config)
    family = proc.make_family(spec, d0)._replace(
        reduce=make_reduce(config),
        host_reduce=(
            functools.partial(w2_exact_records, n_chains=config.chains)
            if config.w2_method == "exact"
            else None
        ),
    )
    # the programs close over the config and what setup derived from it (D0's points included)
    family = compilation.keyed(family, NAME, config, d0, policy, sizes, spec)
    result = run_generations(
        family,
        seed_key(config.seed),
        config.chains,
        sizes,
        record_every=config.record_every,
        progress=progress,
        desc="gmm",
        checkpoint=checkpoint,
    )
    trace = {k: np.asarray(v) for k, v in result.trace.items()}
    return trace, result.generations, sizes, result.seconds, d0, policy, result.state


def snapshot_indices(gens: np.ndarray, wanted) -> list[tuple[int, int]]:
    """(requested generation, index of the recorded generation used) for snapshots <= G; a
    request between records uses the latest recorded generation before it."""
    out = []
    for g in sorted(set(int(v) for v in wanted)):
        if g > gens[-1]:
            continue
        i = int(np.searchsorted(gens, g, side="right") - 1)
        out.append((g, i))
    return out


def run(config: Config, out_dir: str | Path, *, progress: bool | None = None) -> dict:
    """Run the study and write config.json, metrics.npz, summary.json, figures and report.md."""
    config = validate(config)
    run_dir = RunDir.start(out_dir, config, NAME)
    t0 = time.perf_counter()
    trace, gens, sizes, seconds, d0, policy, run_dir.final_state = simulate(
        config, progress, checkpoint=run_dir.scan_checkpoint()
    )

    snaps = snapshot_indices(gens, config.snapshots)
    arrays = {
        "generation": gens,
        "sizes": sizes,
        "snapshot_generation": np.array([gens[i] for _, i in snaps], np.int64),
        "snapshot_points": np.stack([trace["snapshot"][i] for _, i in snaps]),
        "snapshot_weights": np.stack([trace["snapshot_w"][i] for _, i in snaps]),
    }
    arrays.update(chain_arrays(trace, (*METRICS, "w2")))
    run_dir.write_metrics("metrics.npz", **arrays)

    summary = summarize(config, policy, sizes, gens, arrays, d0)
    summary["seconds"] = seconds
    summary["chain_generations_per_second"] = config.chains * config.generations / seconds
    run_dir.write_summary(summary)
    figures = run_dir.figures(make_figures)
    write_report(run_dir, config, summary, figures, time.perf_counter() - t0)
    return summary


def summarize(config: Config, policy: Policy, sizes, gens, arrays, d0) -> dict:
    """summary.json: each metric as {generation, mean, stderr}, and the first/last values."""
    w2_rows = np.isfinite(arrays["w2_mean"])
    summary: dict = {
        "study": NAME,
        "operators": spec_ops(config).describe(),
        "d0": d0.label,
        "components": config.components,
        "covariance_type": config.covariance_type,
        "init": config.init,
        "policy": policy.describe(),
        "schedule": Schedule.parse(config.schedule).describe(),
        "sizes_first_last": [int(sizes[0]), int(sizes[-2])],
        "chains": config.chains,
        "generations": config.generations,
        "w2_method": _w2_description(config),
    }
    for name in METRICS:
        summary[name] = series(
            gens, arrays[f"{name}_mean"], arrays[f"{name}_stderr"], arrays[f"{name}_quantiles"]
        )
    summary["w2"] = series(
        gens[w2_rows],
        arrays["w2_mean"][w2_rows],
        arrays["w2_stderr"][w2_rows],
        arrays["w2_quantiles"][w2_rows],
    )
    final = {}
    for name in (
        "l2_distance",
        "l2_to_first_fit",
        "component_std",
        "component_std_min",
        "component_std_max",
        "heldout_loglik",
        "weight_entropy",
        "w2",
    ):
        mean, se = arrays[f"{name}_mean"], arrays[f"{name}_stderr"]
        rows = np.nonzero(np.isfinite(mean))[0]
        i = rows[-1]
        final[name] = {"generation": int(gens[i]), "mean": float(mean[i]), "stderr": float(se[i])}
    summary["final"] = final
    i1 = 1 if len(gens) > 1 else 0
    summary["first_fit"] = {
        name: {
            "generation": int(gens[i1]),
            "mean": float(arrays[f"{name}_mean"][i1]),
            "stderr": float(arrays[f"{name}_stderr"][i1]),
        }
        for name in ("l2_distance", "component_std")
    }
    summary["claims"] = claims(gens, arrays)
    return summary


def _w2_description(config: Config) -> str:
    n = config.chains if config.w2_chains == 0 else min(config.w2_chains, config.chains)
    pts = f"{config.w2_samples} model samples vs {config.w2_samples} held-out points"
    if config.w2_method == "exact":
        return f"exact empirical W₂² by optimal assignment, {pts}, first {n} recursions"
    return (
        f"Sinkhorn transport cost (ott-jax, ε = {config.w2_epsilon:g}; bias ≤ ε·log n), {pts}, "
        f"first {n} recursions"
    )
