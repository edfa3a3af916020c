"""The generational loop shared by every model family: data policies, sample-size schedules,
the chunked ``lax.scan`` runner for cheap vectorised processes and the data mixer for the host
loop of neural models.

Generation numbering is the same everywhere: generation 0 is the original distribution D0 itself;
generation n >= 1 is the n-th fitted model. ``M_i`` (``sizes[i]``) is the size of the training set
that generation ``i + 1`` is fitted to, so ``M_0`` samples of D0 fit generation 1.

Each generation n >= 1 draws a new batch B_n of ``M_n`` points made of

* ``round(alpha M_n)`` samples of the newest model (generation n),
* ``round(beta M_n)`` points subsampled without replacement from the previous training set,
* ``round(gamma M_n)`` fresh samples of D0,

(the paper's general process, alpha + beta + gamma = 1), and the training set of generation n + 1 is

* ``replace`` / ``mix``: T_n = B_n,
* ``accumulate``: T_n = T_{n-1} ∪ B_n (everything ever generated is kept),
* ``accumulate-subsample``: pool P_n = P_{n-1} ∪ B_n and T_n = a uniform subsample of size M_n.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.errors import ConfigError, check_float, check_int

POLICY_MODES = ("replace", "mix", "accumulate", "accumulate-subsample")


# --------------------------------------------------------------------------------------------
# Policies


@dataclasses.dataclass(frozen=True)
class Policy:
    """How each generation's training data is made (see the module docstring)."""

    mode: str = "replace"  # replace | mix | accumulate | accumulate-subsample
    alpha: float = 1.0  # fraction of each new batch drawn from the newest model
    beta: float = 0.0  # fraction subsampled from the previous generation's training data
    gamma: float = 0.0  # fraction drawn fresh from the original data D0

    def __post_init__(self):
        if self.mode not in POLICY_MODES:
            raise ConfigError(
                f"unknown policy {self.mode!r}; choose one of {', '.join(POLICY_MODES)}"
            )
        for name in ("alpha", "beta", "gamma"):
            check_float(f"policy {name}", getattr(self, name), 0.0, 1.0)
        total = self.alpha + self.beta + self.gamma
        if abs(total - 1.0) > 1e-9:
            raise ConfigError(
                f"policy fractions alpha + beta + gamma must sum to 1, got "
                f"{self.alpha} + {self.beta} + {self.gamma} = {total:.6g}"
            )
        if self.mode.startswith("accumulate") and self.beta > 0:
            raise ConfigError(
                f"policy {self.mode!r} already keeps all previous data; beta must be 0, got {self.beta}"
            )

    @property
    def accumulates(self) -> bool:
        return self.mode.startswith("accumulate")

    @classmethod
    def parse(cls, spec: str, fresh_fraction: float = 0.0) -> Policy:
        """Parse ``replace``, ``accumulate``, ``accumulate-subsample`` or ``mix:ALPHA,BETA,GAMMA``.

        ``fresh_fraction`` (gamma) makes that fraction of every new batch fresh D0 data; it
        cannot be combined with an explicit ``mix`` (whose third number already is gamma).
        """
        gamma = check_float("fresh fraction", fresh_fraction, 0.0, 1.0)
        spec = spec.strip()
        if spec.startswith("mix"):
            _, _, rest = spec.partition(":")
            try:
                a, b, c = (float(v) for v in rest.split(","))
            except ValueError:
                raise ConfigError(
                    f"policy {spec!r} must look like mix:ALPHA,BETA,GAMMA, e.g. mix:0.8,0.1,0.1"
                ) from None
            if gamma > 0:
                raise ConfigError(
                    f"--fresh-fraction {gamma} conflicts with explicit policy {spec!r}; put gamma in the mix"
                )
            return cls("mix", a, b, c)
        if spec not in ("replace", "accumulate", "accumulate-subsample"):
            raise ConfigError(f"unknown policy {spec!r}; choose one of {', '.join(POLICY_MODES)}")
        return cls(spec, 1.0 - gamma, 0.0, gamma)

    def describe(self) -> str:
        if self.mode == "replace" and self.gamma == 0:
            return "replace"
        parts = f"alpha={self.alpha:g}, beta={self.beta:g}, gamma={self.gamma:g}"
        return f"{self.mode} ({parts})"


class BatchSplit(NamedTuple):
    """How many points of a new batch come from the model, the previous data and D0."""

    model: jax.Array
    previous: jax.Array
    original: jax.Array


def split_batch(size, policy: Policy) -> BatchSplit:
    """Split a batch of ``size`` points into (model, previous, original) counts summing to ``size``.

    Works on Python ints, NumPy or traced JAX integers (the schedule may be traced in a scan).
    """
    xp = jnp if isinstance(size, jax.Array) else np
    size = xp.asarray(size)
    n_orig = xp.round(size * policy.gamma).astype(size.dtype)
    n_prev = xp.round(size * policy.beta).astype(size.dtype)
    n_prev = xp.minimum(n_prev, size - n_orig)
    return BatchSplit(size - n_orig - n_prev, n_prev, n_orig)


# --------------------------------------------------------------------------------------------
# Sample-size schedules


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Sample sizes M_i, i = 0..G-1 (M_i fits generation i + 1)."""

    kind: str = "constant"  # constant | linear | poly | list
    rate: float = 0.0  # linear: slope (0 means M0 per generation); poly: exponent a
    values: tuple[int, ...] = ()  # explicit sizes for kind == "list"

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """``constant``, ``linear``, ``linear:SLOPE``, ``poly:A``, ``list:M0,M1,...`` or a file."""
        spec = spec.strip()
        head, _, rest = spec.partition(":")
        if spec == "constant":
            return cls("constant")
        if head == "linear":
            slope = check_float("linear schedule slope", rest, 0.0) if rest else 0.0
            return cls("linear", slope)
        if head == "poly":
            if not rest:
                raise ConfigError(f"schedule {spec!r} needs an exponent, e.g. poly:2")
            return cls("poly", check_float("polynomial schedule exponent", rest, 0.0))
        if head == "list":
            try:
                values = tuple(int(v) for v in rest.split(","))
            except ValueError:
                raise ConfigError(f"schedule {spec!r} must be list:M0,M1,... of integers") from None
            return cls("list", values=values)
        path = Path(spec)
        if path.suffix in (".npy", ".txt") and path.exists():
            arr = np.load(path) if path.suffix == ".npy" else np.loadtxt(path)
            arr = np.asarray(arr).ravel()
            if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
                raise ConfigError(f"schedule file {path} must hold finite integers")
            return cls("list", values=tuple(int(v) for v in arr))
        raise ConfigError(
            f"unknown schedule {spec!r}; use constant, linear[:SLOPE], poly:A, list:M0,M1,... or a .npy file"
        )

    def sizes(self, m0: int, generations: int) -> np.ndarray:
        """The sizes ``M_0 .. M_{G-1}`` as an int64 array; every entry must be >= 1."""
        m0 = check_int("samples", m0, 1)
        i = np.arange(generations, dtype=np.float64)
        if self.kind == "constant":
            out = np.full(generations, m0, dtype=np.float64)
        elif self.kind == "linear":
            out = m0 + (self.rate if self.rate > 0 else m0) * i
        elif self.kind == "poly":
            out = np.round(m0 * (i + 1.0) ** self.rate)
        elif self.kind == "list":
            if len(self.values) < generations:
                raise ConfigError(
                    f"schedule list has {len(self.values)} sizes but {generations} generations need one each"
                )
            out = np.asarray(self.values[:generations], dtype=np.float64)
        else:
            raise ConfigError(f"unknown schedule kind {self.kind!r}")
        if np.any(out < 1):
            raise ConfigError(f"schedule gives a sample size {int(out.min())} < 1")
        if np.any(out > 2**31 - 1):
            raise ConfigError(f"schedule gives a sample size {out.max():.3g} beyond int32")
        return out.astype(np.int64)

    def describe(self) -> str:
        if self.kind == "constant":
            return "constant"
        if self.kind == "linear":
            return f"linear (slope {self.rate:g})" if self.rate else "linear (M0·(i+1))"
        if self.kind == "poly":
            return f"M0·(i+1)^{self.rate:g}"
        return f"explicit list ({len(self.values)} sizes)"


# --------------------------------------------------------------------------------------------
# Chain statistics


class ChainStats(NamedTuple):
    """Mean and standard error over chains of one metric, over its finite entries only."""

    mean: jax.Array
    stderr: jax.Array
    finite_fraction: jax.Array


def chain_stats(x: jax.Array, axis: int = 0) -> ChainStats:
    """Mean, standard error and finite fraction of ``x`` over the chain ``axis``.

    Non-finite entries (e.g. KL(p0‖p_n) once a state died) are excluded from the mean and
    counted in ``finite_fraction``; a metric with no finite entry gets mean = stderr = NaN.
    """
    x = jnp.asarray(x)
    finite = jnp.isfinite(x)
    n = finite.sum(axis)
    xf = jnp.where(finite, x, 0.0)
    mean = xf.sum(axis) / jnp.maximum(n, 1)
    dev = jnp.where(finite, x - jnp.expand_dims(mean, axis), 0.0)
    var = (dev**2).sum(axis) / jnp.maximum(n - 1, 1)
    stderr = jnp.sqrt(var / jnp.maximum(n, 1))
    mean = jnp.where(n > 0, mean, jnp.nan)
    stderr = jnp.where(n > 1, stderr, jnp.where(n == 1, 0.0, jnp.nan))
    return ChainStats(mean, stderr, n / x.shape[axis])


def summarize_chains(info: Any) -> Any:
    """Apply :func:`chain_stats` over axis 0 to every leaf of a per-chain info pytree."""
    return jax.tree.map(
        lambda leaf: chain_stats(
            leaf.astype(jnp.float32) if not jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
        ),
        info,
    )


# --------------------------------------------------------------------------------------------
# Sharding of the chain axis


def chain_sharding(n_chains: int):
    """A ``NamedSharding`` splitting a leading chain axis over all devices, or ``None``.

    Returns ``None`` (leave placement to JAX) with one device or when ``n_chains`` is not a
    multiple of the device count.
    """
    devices = jax.devices()
    if len(devices) <= 1 or n_chains % len(devices):
        return None
    mesh = jax.sharding.Mesh(np.array(devices), ("chains",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("chains"))


def shard_chains(tree: Any, sharding) -> Any:
    """Place every leaf (leading axis = chains) with ``sharding``; a no-op when it is ``None``."""
    if sharding is None:
        return tree
    return jax.device_put(tree, sharding)


# --------------------------------------------------------------------------------------------
# The scan runner for vectorised processes


class ScanResult(NamedTuple):
    """What :func:`run_generations` returns."""

    state: Any  # final per-chain state (leading axis = chains)
    generations: np.ndarray  # recorded generation numbers, starting with 0
    trace: Any  # reduced info per recorded generation (leading axis = recorded generation)
    seconds: float  # wall time of the generational loop (compilation included)


def recorded_generations(n_generations: int, record_every: int) -> np.ndarray:
    """Generations that are recorded: 0, k, 2k, ... and always the last one."""
    gens = np.arange(0, n_generations + 1, record_every)
    if gens[-1] != n_generations:
        gens = np.append(gens, n_generations)
    return gens


def record_flags(n_generations: int, record_every: int) -> np.ndarray:
    """``flags[i]`` says whether generation ``i + 1`` is recorded (aligned with per-generation
    ``inputs``): a kernel can compute expensive metrics under ``lax.cond`` on it."""
    gens = np.arange(1, n_generations + 1)
    return (gens % record_every == 0) | (gens == n_generations)


def per_device(fn: Callable, sharding, n_replicated: int = 0) -> Callable:
    """Run ``fn`` (already vmapped over a leading chain axis) on each device's own chains.

    The chain kernels are embarrassingly parallel, so with a chain sharding they run under
    ``jax.shard_map``: each device sees only its local block of chains and no collective is
    ever emitted inside a kernel. Left to the automatic (GSPMD) partitioner instead, a vmapped
    ``while_loop`` (rejection samplers) gets a cross-device all-reduce in its loop condition,
    which stalls on multi-device CPU hosts and keeps every device looping until the slowest
    lane of any device is done. The last ``n_replicated`` positional arguments are replicated
    (per-generation inputs); all others and every output have the chain axis leading.
    """
    if sharding is None:
        return fn
    spec = sharding.spec

    def wrapped(*args):
        n_sharded = len(args) - n_replicated
        in_specs = (spec,) * n_sharded + (jax.sharding.PartitionSpec(),) * n_replicated
        return jax.shard_map(
            fn, mesh=sharding.mesh, in_specs=in_specs, out_specs=spec, check_vma=False
        )(*args)

    return wrapped


@functools.lru_cache(maxsize=64)
def _compiled_init(init, reduce, sharding=None):
    """Jitted, vmapped ``init`` and jitted ``reduce`` (cached per function object)."""
    return jax.jit(per_device(jax.vmap(init), sharding)), jax.jit(reduce)


@functools.lru_cache(maxsize=64)
def _compiled_chunk(step, reduce, record_every, records_per_chunk, sharding):
    """The jitted chunk of generations, cached so that repeated runs of the same kernels
    (benchmarks, sweeps, tests) reuse compilations. Everything that varies between runs of one
    configuration (keys, inputs, horizon) is an argument, not a closure."""

    def constrain(state):
        if sharding is None:
            return state
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), state)

    vstep = per_device(jax.vmap(step, (0, 0, None)), sharding, n_replicated=1)

    @jax.jit
    def chunk(state, gen, chain_keys, inputs, n_generations):
        def one_generation(carry, _):
            state, gen = carry  # gen = generation being produced (1-based)
            x = jax.tree.map(lambda a: a[jnp.minimum(gen - 1, a.shape[0] - 1)], inputs)
            keys = jax.vmap(jax.random.fold_in, (0, None))(chain_keys, gen)
            active = gen <= n_generations
            new_state, info = vstep(keys, state, x)
            # Past the horizon (padding of the last record) keep the state unchanged.
            new_state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state)
            return (new_state, gen + 1), info

        def one_record(carry, _):
            gen0 = carry[1]
            carry, infos = jax.lax.scan(one_generation, carry, None, length=record_every)
            # The last record may be padded past the horizon: report the last real generation.
            last_real = jnp.clip(n_generations - gen0, 0, record_every - 1)
            last = jax.tree.map(lambda a: a[last_real], infos)
            return carry, reduce(last)

        (state, gen), trace = jax.lax.scan(
            one_record, (constrain(state), gen), None, length=records_per_chunk
        )
        return (constrain(state), gen), trace

    return chunk


def run_generations(
    key: jax.Array,
    init: Callable[[jax.Array], tuple[Any, Any]],
    step: Callable[[jax.Array, Any, Any], tuple[Any, Any]],
    n_chains: int,
    n_generations: int,
    inputs: Any = None,
    *,
    record_every: int = 1,
    chunk_generations: int | None = None,
    reduce: Callable[[Any], Any] = summarize_chains,
    between_chunks: Callable[[Any], Any] | None = None,
    progress: bool | None = None,
    desc: str = "generations",
    chain_params: Any = None,
) -> ScanResult:
    """Run ``n_chains`` independent chains for ``n_generations`` generations.

    ``init(key) -> (state, info)`` builds one chain at generation 0 (``info`` describes D0 itself)
    and ``step(key, state, x) -> (state, info)`` advances one chain by one generation, where ``x``
    is ``inputs`` indexed at the generation being produced minus one (so ``x = inputs[i]`` fits
    generation ``i + 1``; e.g. ``inputs = {"size": M}``). Both are written for ONE chain; this
    function vmaps them over chains, shards the chain axis over all devices, and ``lax.scan``s
    over generations in jitted chunks (one progress-bar update per chunk).

    Per-generation keys are ``fold_in(chain_key, generation)``, so results do not depend on the
    chunking or on ``record_every``. Only every ``record_every``-th generation (and the last) is
    kept, after ``reduce`` (default: mean / stderr / finite fraction over chains), so 10^5
    generations fit in memory. ``between_chunks(state) -> state`` may reshape the state between
    chunks (e.g. compact dead states); chunks are recompiled only when shapes change.

    ``chain_params`` (optional, leading axis = chains) gives each chain its own numeric
    parameters: ``init(key, params)`` is then called per chain and may store them in the state.
    This is how a sweep over a numeric parameter runs as one vmapped, sharded computation.
    """
    n_chains = check_int("chains", n_chains, 1)
    n_generations = check_int("generations", n_generations, 1)
    record_every = check_int("record_every", record_every, 1)
    if inputs is None:
        inputs = {"generation": np.arange(n_generations)}
    inputs = jax.tree.map(jnp.asarray, inputs)
    n_records = -(-n_generations // record_every)  # recorded points after generation 0
    if chunk_generations is None:
        chunk_generations = max(record_every, min(n_generations, 200))
    records_per_chunk = max(1, chunk_generations // record_every)

    sharding = chain_sharding(n_chains)
    chain_keys = jax.random.split(key, n_chains)
    chain_keys = shard_chains(chain_keys, sharding)

    t0 = time.perf_counter()
    init_fn, reduce_fn = _compiled_init(init, reduce, sharding)
    chunk = _compiled_chunk(step, reduce, record_every, records_per_chunk, sharding)
    if chain_params is None:
        state, info0 = init_fn(chain_keys)
    else:
        chain_params = shard_chains(jax.tree.map(jnp.asarray, chain_params), sharding)
        state, info0 = init_fn(chain_keys, chain_params)
    trace0 = jax.device_get(reduce_fn(info0))
    horizon = jnp.asarray(n_generations, jnp.int32)

    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_generations, desc=desc, unit="gen", leave=False)

    traces = []
    gen = 1
    done_records = 0
    while done_records < n_records:
        if between_chunks is not None and done_records:
            state = between_chunks(state)
        (state, next_gen), tr = chunk(
            state, jnp.asarray(gen, jnp.int32), chain_keys, inputs, horizon
        )
        tr = jax.device_get(tr)
        take = min(records_per_chunk, n_records - done_records)
        traces.append(jax.tree.map(lambda a, take=take: a[:take], tr))
        done_records += take
        advanced = min(take * record_every, n_generations - gen + 1)
        gen = int(next_gen)
        elapsed = time.perf_counter() - t0
        g_done = min(gen - 1, n_generations)
        rate = n_chains * g_done / max(elapsed, 1e-9)
        if bar is not None:
            bar.update(advanced)
            bar.set_postfix_str(f"{rate:.3g} chain-gen/s")
        elif progress is None and n_records > records_per_chunk:
            print(
                f"[{desc}] {g_done}/{n_generations} generations, {rate:.3g} chain-generations/s",
                file=sys.stderr,
                flush=True,
            )
    if bar is not None:
        bar.close()
    state = jax.block_until_ready(state)
    seconds = time.perf_counter() - t0

    trace = jax.tree.map(
        lambda a0, *rest: np.concatenate([np.asarray(a0)[None], *rest], 0), trace0, *traces
    )
    return ScanResult(state, recorded_generations(n_generations, record_every), trace, seconds)


# --------------------------------------------------------------------------------------------
# Host-side data mixing for neural models (one model at a time, arrays of examples)


def mix_training_data(
    rng: np.random.Generator,
    policy: Policy,
    size: int,
    sample_model: Callable[[int], np.ndarray],
    previous: np.ndarray | None,
    original: np.ndarray,
    pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Compose the next training set from arrays of examples (leading axis = example).

    ``sample_model(n)`` returns ``n`` examples of the newest model. Returns ``(train, pool)``
    where ``pool`` is the accumulated data (``None`` unless the policy accumulates). Fresh D0
    examples are sampled without replacement from ``original`` (with replacement only if more
    are asked for than exist).
    """
    size = check_int("sample size", size, 1)
    split = split_batch(size, policy)
    n_model, n_prev, n_orig = (int(v) for v in split)
    parts = []
    if n_model:
        parts.append(np.asarray(sample_model(n_model)))
    if n_prev:
        if previous is None or len(previous) == 0:
            raise ConfigError("policy beta > 0 needs previous training data")
        parts.append(previous[rng.choice(len(previous), n_prev, replace=n_prev > len(previous))])
    if n_orig:
        parts.append(original[rng.choice(len(original), n_orig, replace=n_orig > len(original))])
    batch = np.concatenate(parts, 0)
    if policy.mode in ("replace", "mix"):
        return batch, None
    base = pool if pool is not None else previous
    pooled = batch if base is None else np.concatenate([base, batch], 0)
    if policy.mode == "accumulate":
        return pooled, pooled
    idx = rng.choice(len(pooled), min(size, len(pooled)), replace=False)
    return pooled[idx], pooled


def log_every(n: int, total: int) -> bool:
    """Whether to print a plain log line at step ``n`` of ``total`` (about 10 lines per run)."""
    return n == total or n % max(1, math.ceil(total / 10)) == 0
