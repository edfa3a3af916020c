"""Data policies and sample-size schedules, shared by every model family (a leaf module: it
imports nothing of the loop).

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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.core.errors import (
    MAX_GENERATIONS,
    ConfigError,
    check_float,
    check_int,
    load_array,
)
from collapse_jax.numerics.random import jax_uniform

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
            try:
                return cls("mix", a, b, c)
            except ConfigError as e:
                raise ConfigError(f"policy {spec!r}: {e}") from None
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
# The policies on a weighted point buffer (every family whose data are points)


class PointBuffer(NamedTuple):
    """One chain's data as fixed-shape buffers (weight 0 = padding, so schedules keep static
    shapes). ``x``/``w`` is the training set T_n; accumulate keeps everything in ``x`` (sized
    for all points ever drawn), accumulate-subsample keeps the pool P_n in ``pool_x``/``pool_w``
    (empty otherwise); ``count`` is the number of points in the pool (accumulating policies),
    else |T_n|."""

    x: jax.Array  # (T, ...) training points
    w: jax.Array  # (T,) 1 for points of T_n, 0 for padding
    pool_x: jax.Array  # (P, ...) accumulate-subsample pool
    pool_w: jax.Array  # (P,)
    count: jax.Array  # int32


def buffer_shapes(policy: Policy, max_batch: int, pool_capacity: int) -> tuple[int, int]:
    """(T, P): rows of the training and pool buffers for batches of at most ``max_batch``
    points; ``pool_capacity`` must hold every point an accumulating run ever draws."""
    if policy.mode == "accumulate":
        return pool_capacity, 0
    if policy.mode == "accumulate-subsample":
        return max_batch, pool_capacity
    return max_batch, 0


def _pad_rows(a: jax.Array, rows: int) -> jax.Array:
    if a.shape[0] == rows:
        return a
    return jnp.zeros((rows, *a.shape[1:]), a.dtype).at[: a.shape[0]].set(a)


def initial_buffer(x0, w0, policy: Policy, max_batch: int, pool_capacity: int) -> PointBuffer:
    """T_0 (and P_0 = T_0) from a batch ``x0`` of ``max_batch`` rows with weights ``w0``."""
    t_rows, p_rows = buffer_shapes(policy, max_batch, pool_capacity)
    count = jnp.sum(w0 > 0).astype(jnp.int32)
    return PointBuffer(
        _pad_rows(x0, t_rows),
        _pad_rows(w0, t_rows),
        _pad_rows(x0, p_rows) if p_rows else jnp.zeros((0, *x0.shape[1:]), x0.dtype),
        _pad_rows(w0, p_rows) if p_rows else jnp.zeros((0,), w0.dtype),
        count,
    )


def subsample(key: jax.Array, x: jax.Array, w: jax.Array, k: int) -> jax.Array:
    """``k`` of the valid points (w > 0) of ``x`` uniformly without replacement (top-k of
    uniform keys). With fewer than ``k`` valid points the trailing rows are padding; callers
    use only as many rows as there are valid points."""
    u = jax_uniform(key, w.shape)
    _, idx = jax.lax.top_k(jnp.where(w > 0, u, -1.0), k)
    return x[idx]


def new_batch(
    k_prev: jax.Array,
    k_orig: jax.Array,
    model_points: jax.Array,
    draw_original: Callable[[jax.Array, int], jax.Array],
    buffer: PointBuffer,
    size,
    policy: Policy,
    model_w: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The batch B_n of ``size`` points (rows of ``model_points``, B = its length): the first
    round(α M) rows are samples of the model, the next round(β M) points of T_{n-1} without
    replacement, the next round(γ M) fresh D0 points (:func:`split_batch`); returns
    (points, weights). ``model_w`` (B,) weighs the model rows (0: a sample the data operators
    dropped, :mod:`collapse_jax.core.operators`); ``None`` weighs them all 1."""
    rows = model_points.shape[0]
    n_model, n_prev, _ = split_batch(size, policy)
    j = jnp.arange(rows)
    batch = model_points
    take = lambda m: m.reshape(m.shape + (1,) * (batch.ndim - 1))  # noqa: E731
    if policy.beta > 0:
        prev = subsample(k_prev, buffer.x, buffer.w, rows)
        batch = jnp.where(take(j >= n_model), prev[jnp.clip(j - n_model, 0, rows - 1)], batch)
    if policy.gamma > 0:
        fresh = draw_original(k_orig, rows)
        start = n_model + n_prev
        batch = jnp.where(take(j >= start), fresh[jnp.clip(j - start, 0, rows - 1)], batch)
    w = (j < size).astype(buffer.w.dtype)
    if model_w is not None:
        w = w * jnp.where(j < n_model, model_w.astype(w.dtype), 1.0)
    return batch, w


def next_buffer(
    k_sub: jax.Array, buffer: PointBuffer, batch: jax.Array, batch_w: jax.Array, size, policy
) -> PointBuffer:
    """T_n from B_n by the policy: replace / mix: T_n = B_n; accumulate: T_n = T_{n-1} ∪ B_n;
    accumulate-subsample: P_n = P_{n-1} ∪ B_n and T_n = M_n points of P_n uniformly without
    replacement."""
    size = jnp.asarray(size, jnp.int32)
    zero = jnp.zeros((), buffer.count.dtype)  # one index dtype, also under jax_enable_x64
    start = (buffer.count,) + (zero,) * (batch.ndim - 1)
    if policy.mode == "accumulate":
        x = jax.lax.dynamic_update_slice(buffer.x, batch, start)
        w = jax.lax.dynamic_update_slice(buffer.w, batch_w, (buffer.count,))
        return buffer._replace(x=x, w=w, count=buffer.count + size)
    if policy.mode == "accumulate-subsample":
        pool_x = jax.lax.dynamic_update_slice(buffer.pool_x, batch, start)
        pool_w = jax.lax.dynamic_update_slice(buffer.pool_w, batch_w, (buffer.count,))
        x = subsample(k_sub, pool_x, pool_w, batch.shape[0])
        return PointBuffer(x, batch_w, pool_x, pool_w, buffer.count + size)
    return buffer._replace(x=batch, w=batch_w, count=size)


# --------------------------------------------------------------------------------------------
# Sample-size schedules


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Sample sizes M_i, i = 0..G-1 (M_i fits generation i + 1)."""

    kind: str = "constant"  # constant | linear | poly | list
    rate: float = 0.0  # linear: slope (0 means M0 per generation); poly: exponent a
    values: tuple[int, ...] = ()  # explicit sizes for kind == "list"
    source: str = dataclasses.field(default="", compare=False)  # the spec, named in errors

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """``constant``, ``linear``, ``linear:SLOPE``, ``poly:A``, ``list:M0,M1,...`` or a file."""
        spec = str(spec).strip()
        try:
            return dataclasses.replace(cls._parse(spec), source=spec)
        except ConfigError as e:
            if repr(spec) in str(e) or spec in str(e):
                raise
            raise ConfigError(f"schedule {spec!r}: {e}") from None

    @classmethod
    def _parse(cls, spec: str) -> Schedule:
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
            if path.suffix == ".npy":
                arr = load_array("schedule", path, ndim=(1,))
            else:
                arr = np.loadtxt(path).ravel()
            if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
                raise ConfigError(f"schedule file {path} must hold finite integers")
            return cls("list", values=tuple(int(v) for v in arr))
        raise ConfigError(
            f"unknown schedule {spec!r}; use constant, linear[:SLOPE], poly:A, list:M0,M1,... or a .npy file"
        )

    def sizes(self, m0: int, generations: int) -> np.ndarray:
        """The sizes ``M_0 .. M_{G-1}`` as an int64 array; every entry must be >= 1."""
        m0 = check_int("samples", m0, 1)
        generations = check_int("generations", generations, 0, MAX_GENERATIONS + 1)
        name = repr(self.source) if self.source else self.describe()
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
                    f"schedule {name} has {len(self.values)} sizes but {generations} generations "
                    "need one each"
                )
            out = np.asarray(self.values[:generations], dtype=np.float64)
        else:
            raise ConfigError(f"unknown schedule kind {self.kind!r}")
        if np.any(out < 1):
            raise ConfigError(
                f"schedule {name} with samples {m0} gives a sample size {int(out.min())} < 1"
            )
        if np.any(out > 2**31 - 1):
            raise ConfigError(
                f"schedule {name} with samples {m0} gives a sample size {out.max():.3g} beyond "
                "int32"
            )
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


def check_reuse(policy: Policy, sizes) -> None:
    """With beta > 0 a batch of M_n points reuses round(beta M_n) points of T_{n-1}; refuse a
    schedule where that is more than the M_{n-1} points T_{n-1} holds (ConfigError naming the
    generation)."""
    if policy.beta <= 0:
        return
    sizes = np.asarray(sizes)
    n_prev = np.round(sizes[1:] * policy.beta)
    bad = np.nonzero(n_prev > sizes[:-1])[0]
    if bad.size:
        i = int(bad[0]) + 1
        raise ConfigError(
            f"policy beta {policy.beta} asks {int(n_prev[i - 1])} previous points at generation "
            f"{i} but the previous training set has only {int(sizes[i - 1])}"
        )


def check_loop_fields(config) -> tuple[Policy, Schedule]:
    """Validate the fields every generational study shares (``samples``, ``chains``,
    ``generations``, ``record_every``, ``seed``, ``policy``, ``fresh_fraction``, ``schedule``)
    and return the parsed policy and schedule."""
    maxima = {"samples": 2**31 - 1, "generations": MAX_GENERATIONS}
    for name in ("samples", "chains", "generations", "record_every"):
        check_int(name, getattr(config, name), 1, maxima.get(name))
    check_int("seed", config.seed, 0)
    return Policy.parse(config.policy, config.fresh_fraction), Schedule.parse(config.schedule)
