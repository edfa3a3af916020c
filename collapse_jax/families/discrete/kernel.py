"""The discrete resampling process: a K-state distribution fitted exactly (F(p) = p) from M
samples, generation after generation (the neutral Wright–Fisher model with population M).

One chain's kernels follow the loop's contract (:class:`collapse_jax.core.loop.Family`); the
shared runner vmaps them over chains and scans generations.
The state axis may be *compacted* between chunks: states that can never come back are dropped
and summarised by the p0-mass they carried (see :func:`compact`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from collapse_jax.core import operators
from collapse_jax.core.errors import (
    ConfigError,
    check_float,
    check_int,
    check_probability_vector,
    load_array,
)
from collapse_jax.core.loop import Family, GenInput, supported_compiler_options
from collapse_jax.core.operators import Operators
from collapse_jax.core.policies import Policy, split_batch
from collapse_jax.families.discrete.metrics import DiscreteMetrics, discrete_metrics
from collapse_jax.numerics import samplers
from collapse_jax.numerics.random import uniforms

METHODS = ("counts", "samples")
#: The data operators the discrete family takes (exact on the categorical law).
OPERATORS = ("curate", "verify", "temperature", "top_k", "top_p")


class DiscreteState(NamedTuple):
    """One chain after generation n: the training set T_n that fits generation n + 1."""

    counts: Int[Array, " K"]  # counts of T_n per state
    pool: Int[Array, " K"]  # accumulated pool (accumulate-subsample); zeros otherwise
    p0: Float[Array, " K"]  # original probabilities of the states in this (compacted) axis
    index: Int[Array, " K"]  # original state id of each slot
    p0_dropped: Float[Array, ""]  # p0-mass of states dropped by compaction (all dead)
    absorbed_at: Int[Array, ""]  # first generation whose model is a delta, -1 if none yet
    absorbed_state: Int[Array, ""]  # original id of that delta's state, -1 if none yet


class DiscreteParams(NamedTuple):
    """One chain's numbers (vmapped: a sweep over them is one computation)."""

    p0: Float[Array, " K"]  # the original distribution
    samples: Int[Array, ""]  # this chain's constant batch size M, or 0 to follow the schedule
    gamma: Float[Array, ""]  # this chain's fresh fraction (used when the policy has beta = 0)


class DiscreteInfo(NamedTuple):
    """What one generation reports."""

    metrics: DiscreteMetrics


def _integer(text: str):
    """``text`` as an int when it spells one, else as is (for check_int to name it)."""
    try:
        return int(text)
    except ValueError:
        return text


def initial_distribution(spec: str | np.ndarray, states: int | None = None) -> np.ndarray:
    """Parse an initial distribution p0.

    ``spec`` is ``uniform``, ``zipf:S`` (p_i ∝ i^-S), ``dirichlet:A`` (symmetric; drawn with
    NumPy seed 0 unless ``dirichlet:A:SEED``), a comma-separated vector ``0.5,0.3,0.2``, a path to a
    ``.npy`` file, or an array. ``states`` (K) is required for the parametric families and
    checked against explicit vectors.
    """
    if isinstance(spec, np.ndarray | list | tuple):
        p = np.asarray(spec, dtype=np.float64)
    else:
        spec = str(spec).strip()
        head, _, rest = spec.partition(":")
        if spec == "uniform" or head in ("zipf", "dirichlet"):
            if states is None:
                raise ConfigError(f"p0 {spec!r} needs the number of states")
            k = check_int("states", states, 2)
            if spec == "uniform":
                p = np.full(k, 1.0 / k)
            elif head == "zipf":
                s = check_float("zipf exponent", rest or "1.0", 0.0)
                p = np.arange(1, k + 1, dtype=np.float64) ** -s
                p /= p.sum()
            else:
                a_str, _, seed_str = rest.partition(":")
                a = check_float("dirichlet concentration", a_str or "1.0", 0.0, open_min=True)
                seed = check_int("dirichlet seed", _integer(seed_str), 0) if seed_str else 0
                p = np.random.default_rng(seed).dirichlet(np.full(k, a))
        elif spec.endswith(".npy"):
            p = load_array("p0", spec, ndim=(1,))
        else:
            try:
                p = np.array([float(v) for v in spec.split(",")], dtype=np.float64)
            except ValueError:
                raise ConfigError(
                    f"cannot parse p0 {spec!r}; use uniform, zipf:S, dirichlet:A, a vector "
                    "like 0.5,0.3,0.2, or a .npy file"
                ) from None
    p = check_probability_vector("p0", p)
    if p.shape[0] < 2:
        raise ConfigError(f"p0 must have at least 2 states (K >= 2), got K = {p.shape[0]}")
    if states is not None and p.shape[0] != states:
        raise ConfigError(f"p0 has {p.shape[0]} entries but states = {states}")
    return p


#: XLA options of the ``counts`` method's programs on CPU. XLA:CPU's loop emitters compile the
#: exact samplers (nested while loops of rejection steps) about a quarter faster than its
#: default fusion emitters and run them as fast: on K = 50, M = 1000, 8,192 chains the start
#: compiled in 4.1 s instead of 5.8 s and each chunk in 4.5 s instead of 6.1 s, at the same
#: steady-state speed, with bit-identical counts (only metric logarithms may differ in the last
#: bit). Not for ``samples``: its draw-and-recount ran twice as slow that way.
COUNTS_CPU_OPTIONS = (("xla_cpu_use_fusion_emitters", False),)

#: The ``samples`` method compares each uniform with every CDF entry up to this many states.
_COMPARE_ALL_MAX = 64


def _sample_model(key, n, p, method: str, max_size: int, once: bool = False):
    """Counts of ``n`` draws from ``p``: directly (``counts``) or draw-and-recount (``samples``).

    ``once``: a draw made once per run (generation 0); with ``counts`` it is taken from the
    multinomial's small program: the same counts, a fraction of the compile time (K = 50, 8,192 chains: 1.95
    against 6.7 s), a few tenths of a second slower, once."""
    if method == "counts":
        return samplers.multinomial(key, n, p, small_program=once)
    # The paper's literal procedure: M categorical draws by inverse CDF, then recount. The
    # uniforms come from the project's fused Threefry (numerics/random.py: about 7x cheaper per
    # word on CPU than jax.random.uniform); a short CDF is searched by comparing every entry
    # (the same indices as the default binary search, and faster up to a few dozen states).
    cdf = jnp.cumsum(p)
    u = uniforms(key, max_size, cdf.dtype) * cdf[-1]
    search = "compare_all" if p.shape[0] <= _COMPARE_ALL_MAX else "scan"
    draws = jnp.minimum(jnp.searchsorted(cdf, u, side="right", method=search), p.shape[0] - 1)
    # Never pick a zero-probability state (guards the u == cdf boundary in floating point).
    draws = jnp.where(p[draws] > 0, draws, jnp.argmax(p))
    valid = jnp.arange(max_size) < n
    return jnp.zeros(p.shape[0], jnp.int32).at[draws].add(valid.astype(jnp.int32))


@functools.lru_cache(maxsize=64)
def make_family(
    policy: Policy,
    method: str = "counts",
    max_size: int = 1,
    fresh_varies: bool = False,
    ops: Operators = operators.NONE,
) -> Family:
    """The discrete family for one chain (see :class:`collapse_jax.core.loop.Family`).

    ``init(key, params, gen)`` draws T_0 (``gen.size`` = M_0 samples of ``params.p0``);
    ``step(key, state, params, gen)`` fits p_n = T_{n-1} / |T_{n-1}| (F(p) = p), reports its
    metrics (K logarithms per chain, only when ``gen.record``: under a ``lax.cond``), then draws
    T_n of ``gen.size`` = M_n points by the policy. ``params.samples`` > 0 fixes a chain's M
    (overriding the schedule) and ``params.gamma`` its fresh fraction: per-chain values for
    vmapped sweeps (``fresh_varies`` says that chains may carry their own fresh fraction).
    ``max_size`` bounds every batch size (needed by the ``samples`` method, whose draws have
    static shape). ``between_chunks`` drops dead states (:func:`compact`).

    ``ops`` (:class:`collapse_jax.core.operators.Operators`) transform the fitted p before the
    model part of the batch is drawn (temperature, top-k / top-p, curation, verification: the
    sample law is again categorical, so the draw stays exact); with every operator off the step
    is exactly the plain one. Rewards and correct states follow a compacted axis through
    ``state.index``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    operators.check_supported("discrete", ops, OPERATORS)
    reward = jnp.asarray(ops.curate.reward) if ops.curate is not None else None
    good = jnp.asarray(ops.verify.good) if ops.verify is not None else None
    reward_max = float(max(ops.curate.reward)) if ops.curate is not None else 0.0

    def model_law(p, state: DiscreteState):
        """The law the model part of the batch is drawn from (p itself with no operator)."""
        if not ops.on_categorical:
            return p
        return operators.categorical(
            p,
            ops,
            None if reward is None else reward[state.index].astype(p.dtype),
            None if good is None else good[state.index],
        )

    def draw(key, n, p, once: bool = False):
        return _sample_model(key, n, p, method, max_size, once)

    def fresh_fraction(params: DiscreteParams):
        """γ of a chain: its own value in a vmapped sweep over it, else the policy's."""
        return params.gamma if fresh_varies else jnp.asarray(policy.gamma, params.p0.dtype)

    def init(key, params: DiscreteParams, gen: GenInput) -> tuple[DiscreteState, DiscreteInfo]:
        """Generation 0 of one chain: T_0 drawn from p0 with the key of generation 0."""
        p0 = params.p0
        k = p0.shape[0]
        samples = jnp.asarray(params.samples, jnp.int32)
        counts = draw(key, jnp.where(samples > 0, samples, gen.size), p0, once=True)
        pool = counts if policy.mode == "accumulate-subsample" else jnp.zeros_like(counts)
        state = DiscreteState(
            counts=counts,
            pool=pool,
            p0=p0,
            index=jnp.arange(k, dtype=jnp.int32),
            p0_dropped=jnp.zeros((), p0.dtype),
            absorbed_at=jnp.where(jnp.sum(p0 > 0) == 1, 0, -1).astype(jnp.int32),
            absorbed_state=jnp.where(jnp.sum(p0 > 0) == 1, jnp.argmax(p0), -1).astype(jnp.int32),
        )
        info = discrete_metrics(
            p0, p0, 0.0, None if reward is None else reward.astype(p0.dtype), reward_max, good
        )
        return state, DiscreteInfo(info)

    def step(
        key, state: DiscreteState, params: DiscreteParams, gen: GenInput
    ) -> tuple[DiscreteState, DiscreteInfo]:
        size = jnp.where(params.samples > 0, params.samples, gen.size)
        k_model, k_prev, k_orig, k_sub = jax.random.split(key, 4)
        total = state.counts.sum()
        p = state.counts.astype(state.p0.dtype) / jnp.maximum(total, 1).astype(state.p0.dtype)

        def metrics_now():
            return discrete_metrics(
                p,
                state.p0,
                state.p0_dropped,
                None if reward is None else reward[state.index].astype(p.dtype),
                reward_max,
                None if good is None else good[state.index],
            )

        metrics = jax.lax.cond(
            gen.record,
            metrics_now,
            lambda: jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(metrics_now)
            ),
        )

        newly = (state.absorbed_at < 0) & (jnp.sum(state.counts > 0) == 1)
        absorbed_at = jnp.where(newly, gen.generation, state.absorbed_at)
        absorbed_state = jnp.where(newly, state.index[jnp.argmax(p)], state.absorbed_state)

        if policy.beta > 0:
            n_model, n_prev, n_orig = split_batch(size, policy)
        else:  # gamma may differ per chain (vmapped sweeps); same rounding as split_batch
            n_orig = jnp.round(size * fresh_fraction(params)).astype(size.dtype)
            n_model, n_prev = size - n_orig, 0
        batch = draw(k_model, n_model, model_law(p, state))
        if policy.beta > 0:
            batch = batch + samplers.multivariate_hypergeometric(
                k_prev, jnp.minimum(n_prev, total), state.counts
            )
        if policy.gamma > 0 or fresh_varies:
            # Fresh D0 data; dropped states never have p0 > 0 when gamma > 0 (see `alive_mask`).
            batch = batch + draw(k_orig, n_orig, state.p0)

        if policy.mode == "accumulate":
            counts, pool = state.counts + batch, state.pool
        elif policy.mode == "accumulate-subsample":
            pool = state.pool + batch
            counts = samplers.multivariate_hypergeometric(k_sub, size, pool)
        else:
            counts, pool = batch, state.pool
        new_state = state._replace(
            counts=counts, pool=pool, absorbed_at=absorbed_at, absorbed_state=absorbed_state
        )
        return new_state, DiscreteInfo(metrics)

    def between_chunks(state: DiscreteState, params: DiscreteParams) -> DiscreteState:
        return compact(state, fresh_fraction(params), policy)

    cpu = jax.default_backend() == "cpu"
    options = supported_compiler_options(COUNTS_CPU_OPTIONS) if method == "counts" and cpu else ()
    return Family(init, step, None, between_chunks, compiler_options=options)


def discrete_params(p0, n_chains: int, samples=0, gamma=0.0) -> DiscreteParams:
    """Per-chain parameters: ``p0`` for every chain, ``samples`` and ``gamma`` scalars or one
    value per chain (``gamma`` is read only by a family built with ``fresh_varies``)."""
    p0 = np.asarray(p0, np.float32)
    return DiscreteParams(
        np.broadcast_to(p0, (n_chains, p0.shape[-1])),
        np.broadcast_to(np.asarray(samples, np.int32), (n_chains,)),
        np.broadcast_to(np.asarray(gamma, np.float32), (n_chains,)),
    )


SHRINK = 2  # compact the state axis when it can shrink by at least this factor
COMPACT_EVERY = 50  # generations per chunk of the runner when compacting (a compaction check each)


def alive_mask(state: DiscreteState, gamma, policy: Policy) -> Int[Array, "... K"]:
    """States that can still have positive probability at some later generation (``gamma``:
    each chain's fresh fraction, or one for all)."""
    alive = (state.counts > 0) | (state.pool > 0)
    fresh = jnp.asarray(gamma) > 0 if policy.beta == 0 else jnp.asarray(policy.gamma > 0)
    fresh = fresh[..., None] if fresh.ndim else fresh  # one value per chain: over its states
    alive = alive | (fresh & (state.p0 > 0))
    return alive


@functools.partial(jax.jit, static_argnames=("policy",))
def _alive(state: DiscreteState, gamma, policy: Policy):
    """The live states and the most any chain holds (one program, not one per array op)."""
    alive = alive_mask(state, gamma, policy)
    return alive, alive.sum(-1).max()


@functools.partial(jax.jit, static_argnames=("width",))
def _compact(state: DiscreteState, alive, width: int) -> DiscreteState:
    order = jnp.argsort(~alive, axis=-1, stable=True)  # alive states first, order kept

    def take(a):
        return jnp.take_along_axis(a, order, axis=-1)[..., :width]

    p0_sorted = jnp.take_along_axis(state.p0, order, axis=-1)
    dropped = p0_sorted[..., width:].sum(-1)
    return state._replace(
        counts=take(state.counts),
        pool=take(state.pool),
        p0=p0_sorted[..., :width],
        index=take(state.index),
        p0_dropped=state.p0_dropped + dropped,
    )


def compact(state: DiscreteState, gamma, policy: Policy, min_width: int = 2) -> DiscreteState:
    """Drop dead states from a batch of chains (leading axis = chains).

    The state axis is shrunk to the smallest power of two (at least ``min_width``) that holds
    the largest number of live states of any chain; each chain's live states move to the front
    in their original order. Exact: dropped states are dead forever (zero count, zero pool and,
    when fresh data is mixed in, zero p0), and their p0-mass is kept in ``p0_dropped`` for the
    metrics. Shrinking only to powers of two, by a factor of at least ``SHRINK``, bounds the
    number of recompilations by log2 K (each width compiles the chunk once).
    """
    alive, most = _alive(state, gamma, policy)
    k = state.counts.shape[-1]
    n_alive = int(jax.device_get(most))
    width = max(min_width, 1 << max(0, n_alive - 1).bit_length())
    # Each new width compiles the chunk again: shrink only by a factor of SHRINK or more.
    if SHRINK * width > k:
        return state
    return _compact(state, alive, width)
