"""The kernel density estimation study: Gaussian KDEs refitted generation after generation on
their own samples (Kazdan, Schaeffer et al., "Collapse or Thrive", arXiv 2410.16713), thousands
of chains at once on the shared loop and point policies, with the Wright–Fisher closed forms of
``theory/kde.md``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from collapse_jax.core import compilation, operators
from collapse_jax.core import report as rep
from collapse_jax.core.errors import ConfigError, check_float, check_int, check_memory
from collapse_jax.core.flags import add_config_arguments, apply_flags
from collapse_jax.core.loop import run_generations
from collapse_jax.core.policies import Policy, Schedule, check_loop_fields, check_reuse
from collapse_jax.core.runs import RunDir, series
from collapse_jax.core.statistics import chain_arrays
from collapse_jax.families import DESCRIPTIONS
from collapse_jax.families.gmm.metrics import w2_exact_records, w2_pairs
from collapse_jax.families.kde import kernel as proc
from collapse_jax.families.kde import theory
from collapse_jax.families.kde.datasets import Dataset, make_dataset
from collapse_jax.families.kde.report import make_figures
from collapse_jax.numerics.random import seed_key

NAME = "kde"
DESCRIPTION = DESCRIPTIONS[NAME]

#: Per-chain metrics recorded every ``record_every`` generations.
METRICS = ("heldout_nll", "pairwise_sq_distance", "ancestors", "bandwidth")
#: Largest accumulation pool (points × chains × (d + 1)), in float32 bytes.
MAX_POOL_BYTES = 4 * 2**30
#: Largest sample size for which the exact ancestor chain (O(M²) per generation) is computed.
MAX_THEORY_SIZE = 3000


@dataclasses.dataclass(frozen=True)
class Config(operators.OperatorFields):
    """The KDE study. Defaults: moons (noise 0.05), M = 100 points, h = 0.1, replace, 100
    generations (a point of Collapse-or-Thrive's KDE sweep), 256 chains.
    The data-operator fields come from :class:`collapse_jax.core.operators.OperatorFields`."""

    dataset: str = (
        "moons"  # blobs | circles | moons | swiss-roll | path to an (N, d) .npy of points
    )
    bandwidth: str = "0.1"  # h: a positive number, or scott / silverman (from each training set)
    samples: int = 100  # M_0: points per generation (first size of a schedule)
    chains: int = 256  # independent chains run at once
    generations: int = 100  # fitted generations after generation 0 (= D0)
    policy: str = "replace"  # replace | accumulate | accumulate-subsample | mix:ALPHA,BETA,GAMMA
    fresh_fraction: float = 0.0  # gamma: fraction of every new batch drawn fresh from D0
    schedule: str = "constant"  # constant | linear[:SLOPE] | poly:A | list:M0,M1,... | file.npy
    record_every: int = 1  # keep metrics of every k-th generation (and the last)
    seed: int = 0  # PRNG seed (also places the blob centres); same seed, same results
    noise: float = 0.05  # circles / moons / swiss-roll: noise std (Collapse-or-Thrive: 0.05)
    factor: float = 0.8  # circles: inner radius over outer radius (scikit-learn's default)
    blob_centers: int = 3  # blobs: number of centres, uniform in [-10, 10]² (make_blobs default)
    blob_std: float = 1.0  # blobs: standard deviation of each blob (make_blobs default)
    heldout: int = 500  # real points scored by the held-out NLL (.npy: at most N - samples)
    w2_samples: int = 128  # points per side of the exact W2 to held-out real points
    w2_chains: int = 16  # chains whose W2 is computed (the first ones); 0: all


def parse_bandwidth(value) -> float | str:
    """A positive number or one of :data:`proc.RULES`; ConfigError naming the value else."""
    text = str(value).strip().lower()
    if text in proc.RULES:
        return text
    try:
        h = float(text)
    except ValueError:
        raise ConfigError(
            f"bandwidth must be a positive number, scott or silverman, got {value!r}"
        ) from None
    return check_float("bandwidth", h, 0.0, open_min=True)


def validate(config: Config) -> Config:
    """Check every field; raise ConfigError naming the bad value. Returns the config with the
    bandwidth as text (TOML may give a number)."""
    check_loop_fields(config)
    config = dataclasses.replace(config, bandwidth=str(config.bandwidth).strip())
    check_float("noise", config.noise, 0.0)
    check_float("factor", config.factor, 0.0, 1.0, open_min=True)
    check_int("blob_centers", config.blob_centers, 1)
    check_memory(16 * config.blob_centers, f"blob_centers {config.blob_centers}")
    check_float("blob_std", config.blob_std, 0.0, open_min=True)
    check_int("heldout", config.heldout, 1)
    check_int("w2_samples", config.w2_samples, 1)
    check_int("w2_chains", config.w2_chains, 0)
    setup(config)
    return config


def setup(config: Config):
    """Everything derived from the config: (D0, policy, sizes M_0..M_G, chain spec)."""
    bandwidth = parse_bandwidth(config.bandwidth)
    dataset = make_dataset(
        config.dataset,
        noise=config.noise,
        factor=config.factor,
        blob_centers=config.blob_centers,
        blob_std=config.blob_std,
        seed=config.seed,
    )
    policy = Policy.parse(config.policy, config.fresh_fraction)
    sizes = Schedule.parse(config.schedule).sizes(config.samples, config.generations + 1)
    if sizes.min() < 2:
        raise ConfigError(
            f"every generation needs at least 2 points (pairwise distances, bandwidth rules); "
            f"the schedule gives {int(sizes.min())}"
        )
    m0 = int(sizes[0])
    max_batch = int(sizes.max())
    if dataset.is_file:
        n = dataset.points.shape[0]
        if n < m0:
            raise ConfigError(f"dataset file has {n} points, fewer than samples = {m0}")
        in_sample = n == m0
        heldout = m0 if in_sample else min(config.heldout, n - m0)
    else:
        in_sample = False
        heldout = config.heldout
    check_reuse(policy, sizes)
    if policy.gamma > 0 and not dataset.is_file:
        top = m0 + config.generations * max_batch
        if top >= proc.MAX_INDEX:
            raise ConfigError(
                f"fresh D0 points get ancestor indices up to {top}, beyond float32's exact "
                f"integers ({proc.MAX_INDEX}); use fewer generations or samples"
            )
    capacity = 0
    if policy.accumulates:
        capacity = int(sizes[:-1].sum()) + max_batch
        nbytes = capacity * (dataset.dim + 1) * 4 * config.chains
        if nbytes > MAX_POOL_BYTES:
            raise ConfigError(
                f"policy {policy.mode!r} needs a pool of {capacity} points per chain "
                f"({nbytes / 2**30:.1f} GiB for {config.chains} chains), above "
                f"{MAX_POOL_BYTES / 2**30:.0f} GiB; use fewer generations, chains or samples"
            )
    # Per chain: batch, training set and pool rows (d + 1 columns: the ancestor index), the
    # held-out points and their squared distances to every centre (the held-out NLL).
    rows = 3 * max_batch + capacity
    check_memory(
        4 * config.chains * (rows * (dataset.dim + 1) + heldout * (dataset.dim + rows)),
        f"chains {config.chains} of {rows} points and heldout {heldout}",
        "use fewer chains, samples or held-out points",
    )
    spec = proc.KDESpec(
        ops=operators.parse(config, NAME, operators.POINT_OPERATORS, dim=dataset.dim),
        bandwidth=bandwidth,
        policy=policy,
        m0=m0,
        max_batch=max_batch,
        pool_capacity=capacity,
        heldout=heldout,
        in_sample=in_sample,
        w2_samples=min(config.w2_samples, int(sizes.min()), heldout),
    )
    return dataset, policy, sizes, spec


def demo_config() -> Config:
    """A short study for `collapse-jax demo` (a few seconds on 2 CPU cores)."""
    return Config(chains=64, generations=60, record_every=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's flags, one per config field; unset flags leave the config unchanged."""
    add_config_arguments(parser, Config)


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    """Apply the flags that were given onto ``base`` and validate."""
    return apply_flags(args, base, validate)


# ---------------------------------------------------------------------------------------------


def make_reduce(config: Config):
    """Per-record reduction: every chain's scalar metrics, chain 0's batch (snapshots) and the
    exact W₂² (optimal assignment, SciPy on the host) between the first S points of B_n and S
    held-out real points for the first ``w2_chains`` chains."""
    n_w2 = config.chains if config.w2_chains == 0 else min(config.w2_chains, config.chains)

    def reduce(info: proc.KDEInfo):
        out = {name: getattr(info, name) for name in METRICS}
        # the W₂² itself on the host, after the chunk (w2_exact_records)
        out.update(w2_pairs(info.w2_model[:n_w2], info.w2_original[:n_w2], jnp.array(True)))
        out["snapshot"] = info.batch[0]
        out["snapshot_w"] = info.batch_w[0]
        return out

    return reduce


def simulate(config: Config, progress: bool | None = None, checkpoint=None):
    """Run the chains; return (trace of per-record arrays, generations, sizes, seconds, D0,
    policy, spec, final per-chain state)."""
    dataset, policy, sizes, spec = setup(config)
    family = proc.make_family(spec, dataset)._replace(
        reduce=make_reduce(config),
        host_reduce=functools.partial(w2_exact_records, n_chains=config.chains),
    )
    # the programs close over the config and what setup derived from it (the data included)
    family = compilation.keyed(family, NAME, config, dataset, policy, sizes, spec)
    result = run_generations(
        family,
        seed_key(config.seed),
        config.chains,
        sizes,
        record_every=config.record_every,
        progress=progress,
        desc="kde",
        checkpoint=checkpoint,
    )
    trace = {k: np.asarray(v) for k, v in result.trace.items()}
    return trace, result.generations, sizes, result.seconds, dataset, policy, spec, result.state


def theory_curves(config: Config, dataset: Dataset, policy: Policy, spec, sizes, gens, arrays):
    """(theory, reference): closed forms where they hold (replace, no fresh data: ancestors for
    any bandwidth, pairwise distance for a fixed h) and, for a bandwidth rule, the fixed-h
    pairwise closed form at h = the chains' mean generation-1 bandwidth, drawn for reference."""
    theory_out: dict[str, np.ndarray] = {}
    reference: dict[str, np.ndarray] = {}
    if not (policy.mode == "replace" and policy.gamma == 0) or spec.ops.active():
        return theory_out, reference, None
    if int(sizes.max()) <= MAX_THEORY_SIZE:
        theory_out["ancestors"] = theory.ancestors(gens, sizes)
    args = (gens, sizes)
    if isinstance(spec.bandwidth, str):
        h1 = float(arrays["bandwidth_mean"][1]) if len(gens) > 1 else None  # first fitted record
        if h1 is not None and np.isfinite(h1):
            reference["pairwise_sq_distance"] = theory.pairwise_sq_distance(
                *args, h1, dataset.dim, dataset.pair_second_moment
            )
        return theory_out, reference, h1
    theory_out["pairwise_sq_distance"] = theory.pairwise_sq_distance(
        *args, spec.bandwidth, dataset.dim, dataset.pair_second_moment
    )
    return theory_out, reference, None


def check_rows(gens, arrays, theory_out) -> list[rep.Check]:
    """Theory against Monte Carlo at the first fitted, a middle and the last recorded
    generation."""
    rows = sorted({1, len(gens) // 2, len(gens) - 1} - {0}) if len(gens) > 1 else []
    checks = []
    for name, curve in theory_out.items():
        for i in rows:
            checks.append(
                rep.Check(
                    f"E[{name}] at generation {int(gens[i])}",
                    float(curve[i]),
                    float(arrays[f"{name}_mean"][i]),
                    float(arrays[f"{name}_stderr"][i]),
                )
            )
    return checks


def run(config: Config, out_dir: str | Path | RunDir, *, progress: bool | None = None) -> dict:
    """Run the study and write config.json, metrics.npz, summary.json, figures and report.md."""
    config = validate(config)
    run_dir = RunDir.start(out_dir, config, NAME)
    t0 = time.perf_counter()
    trace, gens, sizes, seconds, dataset, policy, spec, run_dir.final_state = simulate(
        config, progress, checkpoint=run_dir.scan_checkpoint()
    )
    snaps = sorted({0, *(int(i) for i in np.linspace(0, len(gens) - 1, 4).round())})
    arrays = {
        "generation": gens,
        "sizes": sizes,
        "snapshot_generation": np.asarray([gens[i] for i in snaps], np.int64),
        "snapshot_points": np.stack([trace["snapshot"][i] for i in snaps]),
        "snapshot_weights": np.stack([trace["snapshot_w"][i] for i in snaps]),
    }
    arrays.update(chain_arrays(trace, (*METRICS, "w2")))
    theory_out, reference, h1 = theory_curves(config, dataset, policy, spec, sizes, gens, arrays)
    for name, curve in theory_out.items():
        arrays[f"theory_{name}"] = curve
    for name, curve in reference.items():
        arrays[f"reference_{name}"] = curve
    run_dir.write_metrics("metrics.npz", **arrays)

    checks = check_rows(gens, arrays, theory_out)
    summary: dict = {
        "study": NAME,
        "operators": setup(config)[3].ops.describe(),
        "dataset": dataset.label,
        "bandwidth": config.bandwidth,
        "policy": policy.describe(),
        "schedule": Schedule.parse(config.schedule).describe(),
        "samples": config.samples,
        "chains": config.chains,
        "generations": config.generations,
        "heldout": "in-sample (the D0 points themselves)" if spec.in_sample else spec.heldout,
        "seconds": seconds,
        "chain_generations_per_second": config.chains * config.generations / seconds,
        "checks": [c.as_dict() for c in checks],
        "reference_bandwidth": h1,
    }
    for name in (*METRICS, "w2"):
        rows = np.isfinite(arrays[f"{name}_mean"])
        summary[name] = series(
            gens[rows],
            arrays[f"{name}_mean"][rows],
            arrays[f"{name}_stderr"][rows],
            arrays[f"{name}_quantiles"][rows],
        )
    run_dir.write_summary(summary)
    figures = run_dir.figures(make_figures)
    write_report(run_dir, config, summary, checks, figures, time.perf_counter() - t0)
    return summary


def write_report(
    run_dir: RunDir, config: Config, summary: dict, checks, figures, seconds: float
) -> None:
    """report.md: setup, theory against Monte Carlo, the figures."""
    holds = summary["policy"] == "replace"
    if checks:
        note = (
            "Closed forms of theory/kde.md (Wright–Fisher genealogy of the centres, N(0, h²I) "
            "per lineage step); a row agrees when within 4 Monte Carlo standard errors."
        )
        if isinstance(parse_bandwidth(config.bandwidth), str):
            note += (
                " With a bandwidth rule only the ancestor count has a closed form (the genealogy "
                "does not depend on h); the pairwise distance is drawn against the fixed-h "
                f"curve at h = {summary['reference_bandwidth']:.4g} (the mean generation-1 "
                "bandwidth) in the figure."
            )
        table = [note, "", rep.checks_table(checks)]
    elif holds:
        table = [
            "No closed form is computed for sample sizes above "
            f"{MAX_THEORY_SIZE} or fewer than two recorded generations."
        ]
    else:
        table = [
            f"Policy {summary['policy']}: the closed forms hold only under replace without fresh "
            "data (the Wright–Fisher genealogy of theory/kde.md); the curves below are Monte "
            "Carlo only."
        ]
    lines = [
        "# Kernel density estimation recursion",
        "",
        f"D0 = {summary['dataset']}; bandwidth {config.bandwidth}; M = {config.samples} "
        f"({summary['schedule']}), {config.chains} chains × {config.generations} generations, "
        f"policy {summary['policy']}, held-out points {summary['heldout']}, seed {config.seed}.",
        *rep.operators_lines(summary["operators"]),
        f"Simulation: {summary['seconds']:.1f} s ({summary['chain_generations_per_second']:.3g} "
        f"chain-generations/s); report written in {seconds:.1f} s.",
        "",
        "Generation n's sample is the batch B_n of M_n points drawn after fitting model n "
        "(generation 0: the D0 sample); `pairwise_sq_distance` and `ancestors` are measured on "
        "it, the held-out NLL and the bandwidth belong to model n.",
        "",
        "## Theory against Monte Carlo",
        "",
        *table,
        "",
        *rep.figures_section(figures),
    ]
    run_dir.write_report("\n".join(lines))
