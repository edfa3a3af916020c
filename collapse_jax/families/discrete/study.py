"""The discrete study: thousands of resampling chains, theory and simulation side by side."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from collapse_jax.core import compilation, operators
from collapse_jax.core import report as rep
from collapse_jax.core.errors import ConfigError, check_choice, check_int, check_memory
from collapse_jax.core.flags import add_config_arguments, apply_flags
from collapse_jax.core.loop import chain_sharding, run_generations
from collapse_jax.core.policies import Policy, Schedule, check_loop_fields
from collapse_jax.core.runs import RunDir, series
from collapse_jax.core.statistics import chain_stats
from collapse_jax.families import DESCRIPTIONS
from collapse_jax.families.discrete import kernel as proc
from collapse_jax.families.discrete import theory as wf
from collapse_jax.families.discrete.report import make_figures, write_report
from collapse_jax.numerics.random import seed_key

NAME = "discrete"
DESCRIPTION = DESCRIPTIONS[NAME]

METRICS = (
    "entropy",
    "support_size",
    "heterozygosity",
    "total_variation",
    "kl_model_p0",
    "kl_p0_model",
    "tail_mass_kept",
    "is_delta",
)
#: Recorded only when their operator is on: E_{p_n}[r] and E_{p_n}[e^{r − max r}] (curation),
#: the mass on the verifier's correct states (verification).
OPERATOR_METRICS = {"reward": "curate", "exp_reward": "curate", "good_mass": "verify"}


def metric_names(ops: operators.Operators) -> tuple[str, ...]:
    """The metrics a run records: :data:`METRICS` and those of its active operators."""
    return METRICS + tuple(m for m, op in OPERATOR_METRICS.items() if op in ops.active())


@dataclasses.dataclass(frozen=True)
class Config(operators.OperatorFields):
    """The discrete study. Defaults: the benchmark workload of the paper's discrete model.
    The data-operator fields (curate, verify, temperature, top_k, top_p, ...) come from
    :class:`collapse_jax.core.operators.OperatorFields`."""

    states: int = 50  # K, number of states (ignored when p0 is an explicit vector or file)
    p0: str = "uniform"  # uniform | zipf:S | dirichlet:A | comma-separated vector | path.npy
    samples: int = 1000  # M, samples per generation (M_0 of a schedule)
    chains: int = 4096  # independent chains run at once
    generations: int = 1000  # fitted generations after generation 0 (= p0)
    method: str = "auto"  # auto | counts (multinomial of the counts) | samples (draw M, recount)
    policy: str = "replace"  # replace | accumulate | accumulate-subsample | mix:ALPHA,BETA,GAMMA
    fresh_fraction: float = 0.0  # gamma: fraction of every new batch drawn fresh from p0
    schedule: str = "constant"  # constant | linear[:SLOPE] | poly:A | list:M0,M1,... | file.npy
    record_every: int = 1  # keep metrics of every k-th generation (and the last)
    seed: int = 0  # PRNG seed; same seed, same results
    compact: str = "auto"  # auto | on | off: drop dead states between scan chunks (exact)


#: ``method = auto`` draws and recounts (``samples``) up to this many points per generation and
#: takes the exact multinomial (``counts``) above. Both are exact; at small M the draw-and-recount
#: program compiles in a fraction of the time of the multinomial tree (measured on the demo
#: config, K = 20, M = 100: 23 s against 109 s for the whole cold process), and at large M the
#: multinomial's O(K) cost wins.
AUTO_SAMPLES_MAX = 256


def resolve_method(method: str, max_size: int) -> str:
    """The sampling method a run uses: ``auto`` resolved by the largest batch size M."""
    if method != "auto":
        return method
    return "samples" if max_size <= AUTO_SAMPLES_MAX else "counts"


COMPACT = ("auto", "on", "off")


def resolve_compact(compact: str, method: str, states: int, max_size: int) -> bool:
    """Whether a run compacts its state axis: ``auto`` does under the ``counts`` method, whose
    cost follows the K states, and under ``samples`` only when K > M (at most M states survive
    generation 1). Otherwise draw-and-recount costs O(M log K) whatever the width, and each new
    width is one more compilation of the chunk: on the demo config (K = 20, M = 100) compacting
    took the cold process from 9.3 s to 14.6 s and made the warm simulation no faster."""
    if compact != "auto":
        return compact == "on"
    return method == "counts" or states > max_size


def splits_cpu(config: Config) -> bool:
    """Whether a run of ``config`` gains from a CPU split into one JAX device per core
    (``core/devices.py``): under the ``counts`` method, whose rejection loops XLA:CPU runs on
    one thread per device. Draw-and-recount (``samples``) is spread over the cores already."""
    sizes = Schedule.parse(config.schedule).sizes(config.samples, config.generations)
    return resolve_method(config.method, int(sizes.max())) == "counts"


def validate(config: Config) -> Config:
    """Check every field; raise ConfigError naming the bad value."""
    policy, schedule = check_loop_fields(config)
    check_choice("method", config.method, ("auto", *proc.METHODS))
    check_choice("compact", config.compact, COMPACT)
    check_int("states", config.states, 2)
    p0 = _p0(config)
    _operators(config, p0.shape[0])
    sizes = schedule.sizes(config.samples, config.generations)
    if policy.mode == "accumulate" and sizes.sum() > 2**31 - 1:
        raise ConfigError(f"accumulate pools {sizes.sum()} samples, beyond int32 counts")
    # Per chain: counts, pool, p0 and index of every state (and M draws for method samples).
    k = p0.shape[0]
    method = resolve_method(config.method, int(sizes.max()))
    per_chain = 6 * 4 * k + (3 * 4 * int(sizes.max()) if method == "samples" else 0)
    check_memory(
        config.chains * per_chain,
        f"chains {config.chains} of states {k} (samples {int(sizes.max())}, method {method})",
        "use fewer chains, states or samples",
    )
    return config


def _operators(config: Config, states: int) -> operators.Operators:
    """The run's data operators (validated; refused when the family cannot take them)."""
    return operators.parse(config, NAME, proc.OPERATORS, states=states)


def _p0(config: Config) -> np.ndarray:
    spec = config.p0
    parametric = spec == "uniform" or spec.split(":")[0] in ("zipf", "dirichlet")
    if parametric:
        check_int("states", config.states, 2)
        # p0 is materialised per state: refuse a K no memory holds before allocating it.
        check_memory(8 * config.states, f"p0 {spec!r} over states {config.states}")
    try:
        return proc.initial_distribution(spec, config.states if parametric else None)
    except ConfigError as e:
        if spec in str(e):
            raise
        raise ConfigError(f"p0 {spec!r}: {e}") from None


def demo_config() -> Config:
    """A short study for `collapse-jax demo` (under a minute on 2 CPU cores, mostly compiling)."""
    return Config(
        states=20, p0="zipf:1.1", samples=100, chains=1024, generations=800, record_every=2
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's flags, one per config field; unset flags leave the config unchanged."""
    add_config_arguments(parser, Config)


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    """Apply the flags that were given onto ``base`` and validate."""
    return apply_flags(args, base, validate)


# ---------------------------------------------------------------------------------------------


class Simulation(NamedTuple):
    """One configuration's simulated arrays (chain-reduced trace plus per-chain outcomes)."""

    trace: dict[str, np.ndarray]
    absorbed_at: np.ndarray
    absorbed_state: np.ndarray
    generations: np.ndarray
    sizes: np.ndarray
    seconds: float
    state: object  # the final per-chain state of this configuration's chains
    # How every chain of the run was drawn: the method and compaction resolved from the largest
    # batch size of the whole computation (in a vmapped sweep, of every value, not this one's).
    method: str
    compacted: bool


#: Parameters a sweep can vary inside ONE vmapped computation (each chain carries its value).
VMAPPED_SWEEPS = ("samples", "fresh_fraction")


def sweep_is_vmappable(config: Config, field: str) -> bool:
    """Whether a sweep over ``field`` keeps every shape and static setting fixed."""
    policy = Policy.parse(config.policy, config.fresh_fraction)
    if field == "samples":
        return Schedule.parse(config.schedule).kind == "constant"
    if field == "fresh_fraction":
        return policy.mode != "mix"
    return False


@functools.lru_cache(maxsize=32)
def _group_reduce(n_values: int, chains: int):
    """Mean / stderr / finite fraction over each value's block of chains."""

    def reduce(info):
        return jax.tree.map(
            lambda leaf: chain_stats(leaf.reshape(n_values, chains), axis=1), info.metrics
        )

    return reduce


def simulate(
    config: Config,
    progress: bool | None = None,
    sweep: tuple[str, list] | None = None,
    checkpoint=None,
) -> list[Simulation]:
    """Run the chains of ``config`` — or of every value of a vmappable ``sweep`` at once, each
    value getting ``config.chains`` chains of one vmapped, sharded batch. One Simulation per value.
    """
    p0 = _p0(config)
    policy = Policy.parse(config.policy, config.fresh_fraction)
    sizes = Schedule.parse(config.schedule).sizes(config.samples, config.generations)
    field, values = sweep if sweep is not None else (None, [None])
    n_values, chains = len(values), config.chains
    samples = np.zeros(n_values, np.int32)
    gamma = np.full(n_values, policy.gamma, np.float32)
    if field == "samples":
        samples = np.asarray(values, np.int32)
    elif field == "fresh_fraction":
        gamma = np.asarray(values, np.float32)
    elif field is not None:
        raise ConfigError(f"a vmapped sweep cannot vary {field!r}; use one of {VMAPPED_SWEEPS}")
    max_size = int(max(sizes.max(), samples.max()))
    family_ops = _operators(config, p0.shape[0])
    method = resolve_method(config.method, max_size)
    compact = resolve_compact(config.compact, method, p0.shape[0], max_size)
    family = proc.make_family(
        policy,
        method,
        max_size=max_size,
        fresh_varies=field == "fresh_fraction",
        ops=family_ops,
    )
    family = family._replace(
        reduce=_group_reduce(n_values, chains),
        between_chunks=family.between_chunks if compact else None,
    )
    # every number the programs close over follows from the config and the sweep
    family = compilation.keyed(family, NAME, config, sweep)
    result = run_generations(
        family,
        seed_key(config.seed),
        n_values * chains,
        np.concatenate([sizes, sizes[-1:]]),  # M_G: the last batch is drawn but never fitted
        proc.discrete_params(
            p0, n_values * chains, np.repeat(samples, chains), np.repeat(gamma, chains)
        ),
        record_every=config.record_every,
        chunk_generations=proc.COMPACT_EVERY if compact else None,
        progress=progress,
        desc="discrete",
        checkpoint=checkpoint,
    )
    absorbed_at = np.asarray(result.state.absorbed_at).reshape(n_values, chains)
    absorbed_state = np.asarray(result.state.absorbed_state).reshape(n_values, chains)
    sims = []
    for v in range(n_values):
        trace = {}
        for name in metric_names(family_ops):
            st = getattr(result.trace, name)
            trace[f"{name}_mean"] = np.asarray(st.mean[:, v], np.float64)
            trace[f"{name}_stderr"] = np.asarray(st.stderr[:, v], np.float64)
            trace[f"{name}_finite_fraction"] = np.asarray(st.finite_fraction[:, v], np.float64)
            trace[f"{name}_quantiles"] = np.asarray(st.quantiles[:, v], np.float64)
        # P(the model has been a delta at some generation <= n): absorption "ever", which under
        # accumulate-subsample differs from is_delta (a delta there can gain states back).
        ever = (absorbed_at[v][None, :] >= 0) & (
            absorbed_at[v][None, :] <= result.generations[:, None]
        )
        trace["absorbed_ever_mean"] = ever.mean(1).astype(np.float64)
        trace["absorbed_ever_stderr"] = np.sqrt(
            trace["absorbed_ever_mean"] * (1 - trace["absorbed_ever_mean"]) / max(chains - 1, 1)
        )
        value_sizes = np.full_like(sizes, samples[v]) if samples[v] > 0 else sizes
        sims.append(
            Simulation(
                trace,
                absorbed_at[v],
                absorbed_state[v],
                result.generations,
                value_sizes,
                result.seconds,
                result.state  # one value: as it is (each reshape below is a program to load)
                if n_values == 1
                else jax.tree.map(
                    lambda a, v=v: a.reshape(n_values, chains, *a.shape[1:])[v], result.state
                ),
                method,
                compact,
            )
        )
    return sims


def run(config: Config, out_dir: str | Path, *, progress: bool | None = None) -> dict:
    """Run the study and write config.json, metrics.npz, summary.json, figures and report.md."""
    config = validate(config)
    run_dir = RunDir.start(out_dir, config, NAME)
    t0 = time.perf_counter()
    (sim,) = simulate(config, progress, checkpoint=run_dir.scan_checkpoint())
    return write_run(config, run_dir, sim, t0)


def run_sweep(
    config: Config, field: str, values: list, out_dir: str | Path, *, progress=None
) -> list[dict] | None:
    """Run a sweep as one vmapped computation when shapes allow (else return None), writing one
    run directory per value, ``OUT/FIELD=VALUE``."""
    config = validate(config)
    if not sweep_is_vmappable(config, field):
        return None
    configs = [validate(dataclasses.replace(config, **{field: v})) for v in values]
    t0 = time.perf_counter()
    sims = simulate(config, progress, sweep=(field, values))
    return [
        write_run(cfg, Path(out_dir) / f"{field}={v}", sim, t0)
        for cfg, v, sim in zip(configs, values, sims, strict=True)
    ]


def write_run(config: Config, out_dir, sim: Simulation, t0: float) -> dict:
    """Write one configuration's run directory from its simulated arrays."""
    run_dir = RunDir.start(out_dir, config, NAME)
    run_dir.final_state = sim.state
    p0 = _p0(config)
    policy = Policy.parse(config.policy, config.fresh_fraction)
    gens, sizes = sim.generations, sim.sizes
    theory = theory_curves(config, p0, policy, sizes, gens)
    run_dir.write_metrics(
        "metrics.npz",
        generation=gens,
        sizes=sizes,
        p0=p0,
        absorbed_at=sim.absorbed_at,
        absorbed_state=sim.absorbed_state,
        **sim.trace,
        **{f"theory_{k}": v for k, v in theory.items()},
    )
    summary = summarize(
        config, p0, policy, sizes, gens, sim.trace, theory, sim.absorbed_at, sim.absorbed_state,
        method=sim.method, compacted=sim.compacted,
    )  # fmt: skip
    summary["seconds"] = sim.seconds
    summary["chain_generations_per_second"] = config.chains * config.generations / sim.seconds
    run_dir.write_summary(summary)
    figures = run_dir.figures(make_figures)
    write_report(run_dir, config, summary, figures, time.perf_counter() - t0)
    return summary


def theory_curves(config: Config, p0, policy: Policy, sizes, gens) -> dict[str, np.ndarray]:
    """Closed forms evaluated at the recorded generations (only those that apply)."""
    out: dict[str, np.ndarray] = {}
    ops = _operators(config, len(p0))
    if ops.active():  # the Wright–Fisher forms assume no operator; two-class operators lump
        plain = policy.mode == "replace" and policy.gamma == 0 and policy.beta == 0
        if plain and Schedule.parse(config.schedule).kind == "constant":
            means = wf.lumped_operator_means(p0, ops, config.samples, config.generations)
            out.update({name: v[gens] for name, v in means.items()})
        return out
    if not policy.accumulates:
        out["heterozygosity"] = wf.expected_heterozygosity(p0, sizes, policy)[gens]
        if policy.beta == 0 and sizes.max() <= 20000:
            out["support_size"] = wf.expected_support(p0, sizes, policy)[gens]
    if (
        policy.mode == "replace"
        and policy.gamma == 0
        and Schedule.parse(config.schedule).kind == "constant"
    ):
        out["support_feller"] = wf.feller_survival_approximation(p0, config.samples, gens).sum(1)
        out["support_upper_bound"] = wf.heterozygosity_survival_bound(p0, config.samples, gens).sum(
            1
        )
    return out


def _chain_devices(chains: int) -> int:
    sharding = chain_sharding(chains)
    return 1 if sharding is None else int(sharding.mesh.size)


def summarize(
    config, p0, policy, sizes, gens, trace, theory, absorbed_at, absorbed_state, *, method: str,
    compacted: bool,
) -> dict:  # fmt: skip
    """summary.json: the required keys plus every metric series and the theory checks;
    ``method`` and ``compacted`` say how the chains were drawn (:class:`Simulation`)."""
    absorbed = absorbed_at >= 0
    n_abs = int(absorbed.sum())
    freq = np.bincount(absorbed_state[absorbed], minlength=len(p0)) / max(n_abs, 1)
    times = absorbed_at[absorbed].astype(np.float64)
    t_mean = float(times.mean()) if n_abs else float("nan")
    t_se = float(times.std(ddof=1) / np.sqrt(n_abs)) if n_abs > 1 else float("nan")
    # Censoring: chains not absorbed by generation G only tell T > G. The restricted mean
    # E[min(T, G)] and the median (when more than half are absorbed) are unbiased under it.
    g_end = float(config.generations)
    capped = np.where(absorbed, absorbed_at, g_end).astype(np.float64)
    n_all = len(capped)
    restricted_se = float(capped.std(ddof=1) / np.sqrt(n_all)) if n_all > 1 else float("nan")
    median = (
        float(np.quantile(capped, 0.5, method="inverted_cdf")) if absorbed.mean() > 0.5 else None
    )
    summary: dict = {
        "study": NAME,
        "operators": _operators(config, len(p0)).describe(),
        "p0": p0.tolist(),
        "states": len(p0),
        "method": method,
        "compacted": compacted,
        "policy": policy.describe(),
        "schedule": Schedule.parse(config.schedule).describe(),
        "sizes_first_last": [int(sizes[0]), int(sizes[-1])],
        "chains": config.chains,
        "devices": _chain_devices(config.chains),  # the chains were sharded over (1: not)
        "generations": config.generations,
        "absorbed_fraction": n_abs / len(absorbed_at),
        "absorbed_state_freq": freq.tolist(),
        "absorption_time_mean": t_mean,  # over the absorbed chains only (biased low if censored)
        "absorption_time_stderr": t_se,
        "censored_fraction": 1.0 - n_abs / len(absorbed_at),  # not absorbed by generation G
        "absorption_time_restricted_mean": float(capped.mean()),  # E[min(T, G)], all chains
        "absorption_time_restricted_stderr": restricted_se,
        "absorption_time_median": median,  # None when half or more are censored (median > G)
    }
    for name in metric_names(_operators(config, len(p0))):
        summary[name] = series(
            gens, trace[f"{name}_mean"], trace[f"{name}_stderr"], trace[f"{name}_quantiles"]
        )
    summary["kl_p0_model"]["finite_fraction"] = trace["kl_p0_model_finite_fraction"].tolist()
    summary["absorbed_ever"] = series(
        gens, trace["absorbed_ever_mean"], trace["absorbed_ever_stderr"]
    )
    summary["theory"] = {k: v.tolist() for k, v in theory.items()}
    summary["checks"] = [
        c.as_dict()
        for c in checks(config, p0, policy, gens, trace, theory, absorbed_at, absorbed_state)
    ]
    return summary


def checks(config, p0, policy, gens, trace, theory, absorbed_at, absorbed_state) -> list[rep.Check]:
    """Theory-vs-Monte-Carlo rows for the report."""
    rows: list[rep.Check] = []
    picks = _check_points(gens, theory.get("heterozygosity"))
    k = len(p0)
    for name, lo, hi, label in (
        ("heterozygosity", 0.0, 1.0, "E[Het_n] = E[1 − Σ p_n²]"),
        ("support_size", 1.0, float(k), "E[support_n] (exact marginal chains)"),
    ):
        if name not in theory:
            continue
        for i in picks:
            th = float(theory[name][i])
            rows.append(
                rep.Check(
                    f"{label}, n = {gens[i]}",
                    th,
                    float(trace[f"{name}_mean"][i]),
                    _stderr(trace[f"{name}_stderr"][i], th, lo, hi, config.chains),
                )
            )
    ops = _operators(config, k)
    for name, label in (("good_mass", "E[mass on correct states]"), ("reward", "E[E_{p_n} r]")):
        if name not in theory:
            continue
        # The chain's exact law gives the standard error of the mean over chains.
        for i in _operator_points(gens, theory[name], theory[f"{name}_sd"]):
            rows.append(
                rep.Check(
                    f"{label}, n = {gens[i]} (exact two-class chain)",
                    float(theory[name][i]),
                    float(trace[f"{name}_mean"][i]),
                    float(theory[f"{name}_sd"][i]) / np.sqrt(config.chains),
                )
            )
    absorbed = absorbed_at >= 0
    # Absorption probabilities need (nearly) every chain absorbed: among >= 99% absorbed chains the
    # unabsorbed few cannot move the frequencies by a standard error. Times need all of them.
    plain = not ops.active()  # the absorption law assumes no operator
    if plain and policy.mode == "replace" and policy.gamma == 0 and absorbed.mean() >= 0.99:
        n = absorbed.sum()
        freq = np.bincount(absorbed_state[absorbed], minlength=len(p0)) / n
        among = "" if absorbed.all() else f" (among the {absorbed.mean():.1%} absorbed chains)"
        order = np.argsort(-p0)
        for i in order[: min(3, len(p0))]:
            se = np.sqrt(p0[i] * (1 - p0[i]) / n)
            rows.append(
                rep.Check(
                    f"P(absorbed at state {i}) = p0({i}){among}",
                    float(p0[i]),
                    float(freq[i]),
                    float(se),
                )
            )
        if absorbed.all() and Schedule.parse(config.schedule).kind == "constant":
            times = absorbed_at.astype(np.float64)
            se = float(times.std(ddof=1) / np.sqrt(n))
            rows.append(
                rep.Check(
                    "mean absorption time ≈ −2M Σ(1−p)ln(1−p) (diffusion; 5% model error allowed)",
                    wf.diffusion_absorption_time(p0, config.samples),
                    float(times.mean()),
                    se,
                    rel_tol=0.05,
                )
            )
            if len(p0) == 2 and config.samples <= 2000:
                rows.append(
                    rep.Check(
                        "mean absorption time (exact Markov chain, K = 2)",
                        wf.exact_two_state_absorption_time(p0[0], config.samples),
                        float(times.mean()),
                        se,
                    )
                )
    return rows


def _check_points(gens, het) -> list[int]:
    """Recorded generations where a closed form is informative: n = 1 and where E[Het_n] has
    fallen to about 1/2 and 1/5 of H_0 (late generations are dominated by rare chains)."""
    picks = {1} if len(gens) > 1 else set()
    if het is not None and het[0] > 0:
        for frac in (0.5, 0.2):
            below = np.nonzero(het <= frac * het[0])[0]
            if below.size:
                picks.add(int(below[0]))
    else:
        picks.add(len(gens) // 2)
    return sorted(i for i in picks if 0 < i < len(gens))


def _operator_points(gens, curve, sd) -> list[int]:
    """Recorded generations for the operator rows: the first operated one (n = 2), where the
    exact curve has moved half way to its last value, and the last one where chains still
    differ (per-chain sd > 1e-4 of the scale: once nearly every chain is absorbed the row
    would compare float32 rounding)."""
    scale = max(float(np.max(np.abs(curve))), 1.0)
    later = np.nonzero((gens >= 2) & (sd > 1e-4 * scale))[0]
    if not later.size:
        return []
    first, last = int(later[0]), int(later[-1])
    curve = curve[: last + 1]
    moved = np.abs(curve[later] - curve[first])
    half = later[np.nonzero(moved >= 0.5 * abs(curve[last] - curve[first]))[0][0]]
    return sorted({first, int(half), last})


def _stderr(se: float, mean: float, lo: float, hi: float, n: int) -> float:
    """The Monte Carlo standard error, or, when every chain gave the same value (se = 0), the
    Bhatia–Davis bound sqrt((hi − μ)(μ − lo) / n) on it for a quantity confined to [lo, hi]."""
    se = float(se)
    if se > 0:
        return se
    return float(np.sqrt(max((hi - mean) * (mean - lo), 0.0) / n))
