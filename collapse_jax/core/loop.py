"""The one generational loop of the vectorised families: the kernel contract (:class:`Family`,
:class:`GenInput`), the pure :func:`scan_generations` and the host driver
:func:`run_generations` (chunks, sharding of the chain axis, compaction, progress).

The contract. A family is a :class:`Family` of pure functions written for ONE chain:

* ``init(key, params, gen) -> (state, info)`` builds generation 0: the state holds the data that
  fits generation 1 (``gen.size`` = M_0 points of D0, or their sufficient statistics), ``info``
  describes D0 itself;
* ``step(key, state, params, gen) -> (state, info)`` is generation n = ``gen.generation``: fit
  model n to the data in ``state``, report ``info`` (its metrics, the expensive ones only when
  ``gen.record``), then make the data of generation n + 1 from ``gen.size`` = M_n samples of
  model n by the family's data policy (:mod:`collapse_jax.core.policies`);
* ``reduce(info) -> stats`` turns the info of all chains into what is recorded (default:
  mean / stderr / finite fraction over chains);
* ``between_chunks(state, params) -> state`` (optional, host side) may reshape the state between
  chunks, e.g. drop dead states;
* ``host_reduce(records) -> records`` (optional, host side, :func:`run_generations` only) finishes
  each chunk's reduced records on the host, for work a compiled program should not hold: a host
  callback keeps a program out of JAX's persistent compilation cache, so it would be compiled
  again at every start (the exact W₂² by optimal assignment of the GMM and KDE studies).

The state convention: after ``init`` or ``step`` of generation n the state holds what generation
n + 1 is fitted to (the training set, its pool, or exact sufficient statistics of it) and nothing
the runner owns: no generation counter, no sizes, no sweep values. ``params`` is a pytree of one
chain's numbers (vmapped with the chains: a sweep over a number is one computation); the runner
supplies the generation number, M_n and the recording flag in :class:`GenInput`, and the key
``fold_in(chain_key, n)`` (``n = 0`` for ``init``), so results do not depend on chunking or on
``record_every``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from collapse_jax.core import compilation
from collapse_jax.core.errors import ConfigError, check_int
from collapse_jax.core.runs import ScanCheckpoint, read_arrays, write_arrays
from collapse_jax.core.statistics import summarize_chains
from collapse_jax.numerics.random import fold_in


class GenInput(NamedTuple):
    """What the runner gives a kernel for generation n (never kept in the state)."""

    generation: jax.Array  # int32: n, the model being fitted (0 in ``init``: D0)
    size: jax.Array  # int32: M_n, the number of points drawn for generation n + 1's data
    record: jax.Array  # bool: whether generation n is recorded (compute expensive metrics?)


class Family(NamedTuple):
    """A model family for the vectorised loop (see the module docstring for the contract)."""

    init: Callable[..., tuple[Any, Any]]  # (key, params, gen) -> (state, info)
    step: Callable[..., tuple[Any, Any]]  # (key, state, params, gen) -> (state, info)
    reduce: Callable[[Any], Any] | None = None  # info over chains -> recorded stats
    between_chunks: Callable[[Any, Any], Any] | None = None  # host: (state, params) -> state
    # host: the reduced records of a chunk (leading record axis) -> what the trace keeps, for
    # work that cannot run in the compiled program (run_generations only; see the module doc)
    host_reduce: Callable[[Any], Any] | None = None
    # XLA options for the family's programs (start and chunk), as (name, value) pairs: e.g. an
    # emitter that compiles a large sampler faster at the same speed (see the discrete kernel)
    compiler_options: tuple[tuple[str, Any], ...] = ()
    # set by ``compilation.keyed`` (never by hand): the key of the family's compiled programs
    # in the program store, so a warm start loads them without tracing (core/compilation.py)
    cache_key: tuple[str, tuple[int, ...]] | None = None


@functools.lru_cache(maxsize=16)
def supported_compiler_options(options: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """``options`` if this XLA knows every one of them, else none: an XLA that has dropped a
    flag (XLA:CPU's ``xla_cpu_use_fusion_emitters`` in JAX 0.11) refuses to compile with it,
    and a family's options only ever trade compile time, never results. Asked once per process
    by compiling an empty program (a few milliseconds)."""
    if not options:
        return ()
    try:
        jax.jit(lambda x: x, compiler_options=dict(options)).lower(np.int32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return ()
    return options


def _jit(family: Family, fn):
    """``jax.jit(fn)`` with the family's compiler options."""
    return jax.jit(fn, compiler_options=dict(family.compiler_options) or None)


@contextlib.contextmanager
def precision(x64: bool):
    """Set ``jax_enable_x64`` for the duration of a run and restore it afterwards."""
    old = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", bool(x64))
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


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
    """Place every leaf (leading axis = chains) with ``sharding``; a no-op when it is ``None``.

    In a multi-process run every process passes the same whole value (computed from the same
    key and settings) and keeps the rows of its own devices; a leaf already placed with
    ``sharding`` stays as it is.
    """
    if sharding is None:
        return tree
    return place(tree, sharding)


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` (one sharding, or a tree of them matching ``tree``)
    that also works when the devices span several processes: there every process passes the
    same whole value and keeps the parts of its own devices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _global_array(x, shardings), tree)
    return jax.tree.map(_global_array, tree, shardings)


def _global_array(x, sharding) -> jax.Array:
    """A global array with ``sharding`` from a value that every process holds whole."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _global_array(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = to_host(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """One array as a whole host array, in every process: an array spread over the devices of
    several processes is gathered (a collective: every process must call it, in the same
    order); typed PRNG keys are not accepted (take their ``key_data`` first)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def tree_to_host(tree: Any) -> Any:
    """:func:`to_host` of every leaf (``jax.device_get`` for a run over several processes)."""
    return jax.tree.map(to_host, tree)


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


# --------------------------------------------------------------------------------------------
# The generational loop


class ScanResult(NamedTuple):
    """What :func:`run_generations` returns."""

    state: Any  # final per-chain state (leading axis = chains)
    generations: np.ndarray  # recorded generation numbers, starting with 0
    trace: Any  # reduced info per recorded generation (leading axis = recorded generation)
    seconds: float  # wall time of the generational loop (compilation included)
    final_info: Any = None  # every chain's info of generation G, unreduced (device arrays)


def recorded_generations(n_generations: int, record_every: int) -> np.ndarray:
    """Generations that are recorded: 0, k, 2k, ... and always the last one."""
    gens = np.arange(0, n_generations + 1, record_every)
    if gens[-1] != n_generations:
        gens = np.append(gens, n_generations)
    return gens


def record_flags(n_generations: int, record_every: int) -> np.ndarray:
    """``flags[n]`` says whether generation n (0..G) is recorded."""
    gens = np.arange(n_generations + 1)
    return (gens % record_every == 0) | (gens == n_generations)


def gen_inputs(sizes, record_every: int) -> GenInput:
    """The per-generation inputs 0..G of a run with sizes ``M_0 .. M_G``."""
    sizes = np.asarray(sizes)
    g = sizes.shape[0] - 1
    # Built on the host and transferred: jnp.asarray of a host array runs a small program
    # (traced, lowered and looked up in the compilation cache at every start).
    return jax.device_put(
        GenInput(
            np.arange(g + 1, dtype=np.int32),
            sizes.astype(np.int32),
            np.asarray(record_flags(g, record_every)),
        )
    )


def _reduce_of(family: Family) -> Callable[[Any], Any]:
    return family.reduce if family.reduce is not None else summarize_chains


def _at(inputs: GenInput, n) -> GenInput:
    return jax.tree.map(lambda a: a[n], inputs)


def _vmapped(family: Family, sharding):
    """``init`` and ``step`` vmapped over chains (keys, states, params; inputs shared), each
    run per device under the chain sharding (:func:`per_device`)."""
    vinit = jax.vmap(family.init, (0, 0, None))
    vstep = jax.vmap(family.step, (0, 0, 0, None))
    return per_device(vinit, sharding, n_replicated=1), per_device(vstep, sharding, n_replicated=1)


def _records(family, vstep, state, gen, chain_keys, params, inputs, record_every, n_records):
    """Advance ``n_records`` records of ``record_every`` generations from generation ``gen``,
    keeping the reduced info of the last generation of each. Generations past the horizon G
    (``inputs`` holds 0..G) are skipped by a ``lax.cond`` on the (unbatched) generation number:
    the state stays as it is and the record reports generation G. Only the latest info is
    carried, so a record costs no more memory than one generation."""
    n_generations = inputs.size.shape[0] - 1
    reduce = _reduce_of(family)

    def run(state, gen):
        keys = jax.vmap(fold_in, (0, None))(chain_keys, gen)
        return vstep(keys, state, params, _at(inputs, jnp.minimum(gen, n_generations)))

    info0 = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, state, jnp.int32(1))[1]
    )

    def one_generation(carry, _):
        state, gen, info = carry  # gen = generation being fitted (1-based)
        state, info = jax.lax.cond(
            gen <= n_generations, lambda: run(state, gen), lambda: (state, info)
        )
        return (state, gen + 1, info), None

    def one_record(carry, _):
        carry, _ = jax.lax.scan(one_generation, carry, None, length=record_every)
        return carry, reduce(carry[2])

    (state, gen, info), trace = jax.lax.scan(
        one_record, (state, gen, info0), None, length=n_records
    )
    return (state, gen), trace, info


def scan_generations(
    family: Family,
    key: jax.Array,
    params: Any,
    sizes,
    *,
    n_chains: int,
    record_every: int = 1,
    sharding=None,
) -> tuple[Any, Any]:
    """The whole loop as one pure function: ``n_chains`` chains for G = len(sizes) − 1
    generations, jittable (call it inside your own ``jit``; ``n_chains`` and ``record_every``
    are static).

    Args:
        family: the kernels (:class:`Family`).
        key: the run's key; chain c uses ``split(key, n_chains)[c]``.
        params: one pytree per chain (leading axis = chains), or ``None``.
        sizes: M_0 .. M_G (int array of G + 1 entries; M_n is drawn at generation n).
        n_chains: the number of chains.
        record_every: keep generations 0, k, 2k, ... and G.
        sharding: optional chain sharding (:func:`chain_sharding`): the kernels then run per
            device under ``shard_map``, as in :func:`run_generations`.

    Returns:
        ``(state, trace)``: the final state of every chain and the reduced info of the recorded
        generations (leading axis, see :func:`recorded_generations`).
    """
    inputs = gen_inputs(sizes, record_every) if not isinstance(sizes, GenInput) else sizes
    n_generations = inputs.size.shape[0] - 1
    chain_keys = jax.random.split(key, n_chains)
    params = _chain_params(params, n_chains)
    vinit, vstep = _vmapped(family, sharding)
    state, info0 = vinit(_fold(chain_keys, 0), params, _at(inputs, 0))
    n_records = -(-n_generations // record_every)
    (state, _), trace, _ = _records(
        family, vstep, state, jnp.int32(1), chain_keys, params, inputs, record_every, n_records
    )
    trace0 = _reduce_of(family)(info0)
    trace = jax.tree.map(lambda a0, a: jnp.concatenate([a0[None], a], 0), trace0, trace)
    return state, trace


def _fold(chain_keys, n):
    return jax.vmap(fold_in, (0, None))(chain_keys, n)


def _host_reduce(family: Family, records: Any, one: bool = False) -> Any:
    """``family.host_reduce`` of host records (leading record axis; ``one``: a single record,
    given without that axis and returned with it)."""
    if one:
        records = jax.tree.map(lambda a: np.asarray(a)[None], records)
    return records if family.host_reduce is None else family.host_reduce(records)


def _chain_params(params, n_chains: int):
    """Per-chain params; ``None`` becomes an empty array per chain (vmappable)."""
    if params is None:
        return jax.device_put(np.zeros((n_chains, 0), np.int32))
    return jax.device_put(params)  # no program per leaf, unlike jnp.asarray (see gen_inputs)


@functools.lru_cache(maxsize=64)
def _compiled_start(family: Family, sharding, n_chains: int):
    """Generation 0 as one jitted program (cached per family): the chains' keys split from
    the run's key, the keys of generation 0, the vmapped ``init`` and the reduced info,
    ``(key, params, inputs) -> (state, trace0, chain_keys)`` (one program instead of one per
    step: each costs a trace, a lowering and a cache lookup at every start)."""
    vinit, _ = _vmapped(family, sharding)
    reduce = _reduce_of(family)

    @functools.partial(_jit, family)
    def start(key, params, inputs):
        chain_keys = jax.random.split(key, n_chains)
        if sharding is not None:
            chain_keys = jax.lax.with_sharding_constraint(chain_keys, sharding)
        state, info0 = vinit(_fold(chain_keys, 0), params, _at(inputs, 0))
        return state, reduce(info0), chain_keys

    return start


@functools.lru_cache(maxsize=64)
def _compiled_chunk(family: Family, record_every: int, records_per_chunk: int, sharding):
    """The jitted chunk of generations, cached so that repeated runs of the same family
    (benchmarks, sweeps, tests) reuse compilations. Everything that varies between runs of one
    configuration (keys, params, inputs, horizon) is an argument, not a closure."""
    _, vstep = _vmapped(family, sharding)

    def constrain(state):
        if sharding is None:
            return state
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), state)

    @functools.partial(_jit, family)
    def chunk(state, gen, chain_keys, params, inputs):
        (state, gen), trace, info = _records(
            family,
            vstep,
            constrain(state),
            gen,
            chain_keys,
            params,
            inputs,
            record_every,
            records_per_chunk,
        )
        return (constrain(state), gen), trace, info

    return chunk


# --------------------------------------------------------------------------------------------
# Checkpoints of the scan runner (chunk boundaries)


def _leaves_to_arrays(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    """Host arrays of every leaf (typed PRNG keys as their key data)."""
    out = {}
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[f"{prefix}_{i:05d}"] = to_host(leaf)
    return out


def _arrays_to_leaves(template: Any, arrays, prefix: str) -> Any:
    """Inverse of :func:`_leaves_to_arrays` for a tree with ``template``'s structure (leaf shapes
    may differ: ``between_chunks`` can reshape the state)."""
    leaves, treedef = jax.tree.flatten(template)
    out = []
    for i, leaf in enumerate(leaves):
        name = f"{prefix}_{i:05d}"
        if name not in arrays:
            raise ConfigError(f"checkpoint lacks {name!r}: written by a different configuration?")
        value = arrays[name]
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            value = jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(leaf))
        elif value.dtype != leaf.dtype:
            raise ConfigError(
                f"checkpoint array {name!r} is {value.dtype}, expected {leaf.dtype} "
                "(written by a different configuration?)"
            )
        out.append(value)
    return jax.tree.unflatten(treedef, out)


def _fingerprint(n_chains, sizes, record_every, records_per_chunk) -> str:
    import hashlib

    h = hashlib.sha256(np.asarray(sizes, np.int64).tobytes()).hexdigest()[:16]
    return f"chains={n_chains} sizes={h} record_every={record_every} chunk={records_per_chunk}"


def _save_checkpoint(ckpt: ScanCheckpoint, state, traces, gen, done, fingerprint) -> None:
    """Every process gathers the state; the first one writes the file."""
    trace = jax.tree.map(lambda *parts: np.concatenate(parts, 0), *traces)
    meta = {"generation": int(gen), "records": int(done), "fingerprint": fingerprint}
    state_arrays = _leaves_to_arrays(state, "state")
    if jax.process_index() != 0:
        return
    write_arrays(
        ckpt.path,
        meta=np.asarray(json.dumps(meta)),
        **state_arrays,
        **_leaves_to_arrays(trace, "trace"),
    )


def _agreed(flag: bool) -> bool:
    """The first process's ``flag`` in every process (a decision that leads to a collective
    must be the same everywhere, and clocks differ)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def _load_checkpoint(ckpt: ScanCheckpoint, state, trace0, fingerprint):
    """(state, trace, generation, records done) from the checkpoint file, or None."""
    if not ckpt.resume or not ckpt.path.exists():
        return None
    arrays = read_arrays(ckpt.path)
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, ValueError):
        raise ConfigError(f"corrupt checkpoint {ckpt.path}: no readable metadata") from None
    if meta.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"checkpoint {ckpt.path} was written by another run ({meta.get('fingerprint')}); "
            f"this run is {fingerprint}"
        )
    state = _arrays_to_leaves(state, arrays, "state")
    trace = _arrays_to_leaves(jax.tree.map(lambda a: np.asarray(a)[None], trace0), arrays, "trace")
    return state, trace, int(meta["generation"]), int(meta["records"])


def run_generations(
    family: Family,
    key: jax.Array,
    n_chains: int,
    sizes,
    params: Any = None,
    *,
    record_every: int = 1,
    chunk_generations: int | None = None,
    progress: bool | None = None,
    desc: str = "generations",
    checkpoint: ScanCheckpoint | None = None,
) -> ScanResult:
    """Run ``n_chains`` independent chains of ``family`` for G = len(sizes) − 1 generations.

    The host driver around the same loop as :func:`scan_generations` (identical results for
    the same arguments): it vmaps the one-chain kernels, shards the chain axis over all devices,
    ``lax.scan``s generations in jitted chunks (one progress update per chunk), may reshape the
    state between chunks (``family.between_chunks``; chunks are recompiled only when shapes
    change), and keeps only every ``record_every``-th generation (and the last) after
    ``family.reduce``, so 10^5 generations fit in memory.

    ``sizes`` holds M_0 .. M_G (see :class:`GenInput`); ``params`` (leading axis = chains)
    gives each chain its own numbers. With a ``checkpoint`` the state and the trace so far are
    saved at chunk boundaries (atomically, at most every ``checkpoint.every_seconds``), and a
    ``resume`` continues from the file: the chunks are the same, so the results are bit for bit
    those of an uninterrupted run.
    """
    n_chains = check_int("chains", n_chains, 1)
    record_every = check_int("record_every", record_every, 1)
    sizes = np.asarray(sizes)
    if sizes.ndim != 1 or sizes.shape[0] < 2:
        raise ConfigError(f"sizes must list M_0 .. M_G for G >= 1 generations, got {sizes!r}")
    n_generations = sizes.shape[0] - 1
    inputs = gen_inputs(sizes, record_every)
    n_records = -(-n_generations // record_every)  # recorded points after generation 0
    if chunk_generations is None:
        chunk_generations = max(record_every, min(n_generations, 200))
    records_per_chunk = max(1, chunk_generations // record_every)

    sharding = chain_sharding(n_chains)
    params = shard_chains(_chain_params(params, n_chains), sharding)

    t0 = time.perf_counter()
    start = _compiled_start(family, sharding, n_chains)
    chunk = _compiled_chunk(family, record_every, records_per_chunk, sharding)
    start = compilation.program(family, "start", start, (n_chains, sharding), (key, params, inputs))
    state, trace0, chain_keys = start(key, params, inputs)
    trace0 = jax.tree.map(lambda a: a[0], _host_reduce(family, tree_to_host(trace0), one=True))

    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_generations, desc=desc, unit="gen", leave=False)

    traces = []
    gen = 1
    done_records = 0
    fingerprint = _fingerprint(n_chains, sizes, record_every, records_per_chunk)
    restored = _load_checkpoint(checkpoint, state, trace0, fingerprint) if checkpoint else None
    if restored is not None:
        state, trace_done, gen, done_records = restored
        state = shard_chains(jax.tree.map(jnp.asarray, state), sharding)
        traces.append(trace_done)
    last_save = time.perf_counter()
    while done_records < n_records:
        if family.between_chunks is not None and done_records:
            state = family.between_chunks(state, params)
        # The generation as NumPy: jnp.asarray(gen, jnp.int32) would run a program to convert it.
        args = (state, np.int32(gen), chain_keys, params, inputs)
        static = (record_every, records_per_chunk, sharding)
        (state, next_gen), tr, last_info = compilation.program(
            family, "chunk", chunk, static, args
        )(*args)
        take = min(records_per_chunk, n_records - done_records)
        part = jax.tree.map(lambda a, take=take: a[:take], tree_to_host(tr))
        traces.append(_host_reduce(family, part))
        done_records += take
        advanced = min(take * record_every, n_generations - gen + 1)
        gen = int(next_gen)
        # The last chunk is never saved: a run killed after it recomputes it from the previous
        # checkpoint (deterministically), so the final per-chain info is always at hand.
        if (
            checkpoint is not None
            and done_records < n_records
            and _agreed(time.perf_counter() - last_save >= checkpoint.every_seconds)
        ):
            _save_checkpoint(checkpoint, state, traces, gen, done_records, fingerprint)
            last_save = time.perf_counter()
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
    gens = recorded_generations(n_generations, record_every)
    return ScanResult(state, gens, trace, seconds, last_info)
