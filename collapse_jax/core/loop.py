"""The generational runner for vectorised families: chain statistics, sharding of the chain axis
and the chunked ``lax.scan`` over generations (see :mod:`collapse_jax.core.policies` for the
data policies and the numbering of generations and sample sizes).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.core.errors import check_int

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
