"""Statistics over chains: mean, standard error, finite fraction and quantiles of a metric,
the default ``reduce`` of the generational loop (:mod:`collapse_jax.core.loop`), and their
``metrics.npz`` layout."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: Quantile levels recorded beside every mean (heavy-tailed metrics: the median and the
#: 10–90 % band say more than the mean of a few thousand chains).
QUANTILES = (0.1, 0.5, 0.9)


class ChainStats(NamedTuple):
    """Mean and standard error over chains of one metric, over its finite entries only, and
    its quantiles (levels :data:`QUANTILES`, last axis) over the finite entries."""

    mean: jax.Array
    stderr: jax.Array
    finite_fraction: jax.Array
    quantiles: jax.Array


def chain_stats(x: jax.Array, axis: int = 0) -> ChainStats:
    """Mean, standard error, finite fraction and 10/50/90 % quantiles of ``x`` over the chain
    ``axis``.

    Non-finite entries (e.g. KL(p0‖p_n) once a state died) are excluded from the mean and the
    quantiles and counted in ``finite_fraction``; a metric with no finite entry gets NaN.
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
    levels = jnp.asarray(QUANTILES, x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else None)
    q = nanquantile(jnp.where(finite, x, jnp.nan), levels, axis=axis)
    return ChainStats(mean, stderr, n / x.shape[axis], jnp.moveaxis(q, 0, -1))


#: Order-preserving integer keys of float32 / float64 (see :func:`_sort_nan_last`).
_KEY_TYPES = {
    np.dtype(np.float32): (jnp.int32, 0x7FFFFFFF),
    np.dtype(np.float64): (jnp.int64, 0x7FFFFFFFFFFFFFFF),
}


def _sort_nan_last(a: jax.Array) -> jax.Array:
    """``a`` sorted along its last axis, NaNs last: the same values as ``jnp.sort``.

    XLA's CPU sort of floats calls a comparator that orders NaN and signed zeros, about 6x
    slower than its sort of integers, and this sort was most of a recorded generation's time
    (10,000 chains: 1.8 ms per metric). So the float bits are mapped to integers whose order is
    the floats' order (flip the magnitude bits of negative numbers: an involution), sorted as
    integers and mapped back. Every NaN becomes the positive NaN, which sorts after +inf; -0.0
    sorts before +0.0.
    """
    key_type, magnitude = _KEY_TYPES[np.dtype(a.dtype)]
    a = jnp.where(jnp.isnan(a), jnp.nan, a)  # one (positive) NaN, whatever the sign given
    bits = jax.lax.bitcast_convert_type(a, key_type)
    flip = jnp.asarray(magnitude, key_type)
    keys = bits ^ ((bits >> (bits.dtype.itemsize * 8 - 1)) & flip)
    keys = jax.lax.sort(keys, dimension=a.ndim - 1)
    return jax.lax.bitcast_convert_type(
        keys ^ ((keys >> (keys.dtype.itemsize * 8 - 1)) & flip), a.dtype
    )


def nanquantile(x: jax.Array, levels: jax.Array, axis: int = 0) -> jax.Array:
    """``jnp.nanquantile(x, levels, axis=axis)`` (linear interpolation), levels first, with the
    sort done on integer keys (:func:`_sort_nan_last`). The interpolation is jnp's, operation
    for operation; the values agree with it to the last bit, which can differ where XLA fuses a
    multiply-add into one FMA in one program and not in the other (tested)."""
    x, levels = jnp.asarray(x), jnp.asarray(levels)
    if np.dtype(x.dtype) not in _KEY_TYPES or np.dtype(levels.dtype) != np.dtype(x.dtype):
        return jnp.nanquantile(x, levels, axis=axis)
    a = _sort_nan_last(jnp.moveaxis(x, axis, -1))
    counts = jnp.sum(~jnp.isnan(a), axis=-1, dtype=levels.dtype)[None]
    pos = levels.reshape(levels.shape + (1,) * (counts.ndim - 1)) * (counts - 1)
    low, high = jnp.floor(pos), jnp.ceil(pos)
    high_weight = pos - low
    low_weight = 1 - high_weight
    low = jnp.maximum(0, jnp.minimum(low, counts - 1)).astype(int)
    high = jnp.maximum(0, jnp.minimum(high, counts - 1)).astype(int)
    rows = jnp.broadcast_to(a, levels.shape + a.shape)
    low_value = jnp.take_along_axis(rows, low[..., None], axis=-1)[..., 0]
    high_value = jnp.take_along_axis(rows, high[..., None], axis=-1)[..., 0]
    return low_value * low_weight + high_value * high_weight


#: :func:`chain_stats` as one program for host arrays: run op by op it was about 25 small
#: programs, each a trace, a lowering and a cache lookup at every start of a run.
_chain_stats_program = jax.jit(chain_stats, static_argnames="axis")


def chain_arrays(trace: dict, names) -> dict[str, np.ndarray]:
    """For each of ``names``, the per-chain trace ``trace[name]`` (records × chains) as
    ``NAME_chains`` with its :func:`chain_stats` over chains as ``NAME_mean`` / ``NAME_stderr``
    / ``NAME_quantiles`` (float64 host arrays, the run directory's ``metrics.npz`` layout)."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        x = np.asarray(trace[name]).astype(np.float64)
        out[f"{name}_chains"] = x
        out.update(stats_arrays(name, _chain_stats_program(x, axis=1)))
    return out


def stats_arrays(name: str, stats: ChainStats) -> dict[str, np.ndarray]:
    """``NAME_mean``, ``NAME_stderr``, ``NAME_finite_fraction`` and ``NAME_quantiles`` (levels
    :data:`QUANTILES` on the last axis) as float64 host arrays (``metrics.npz``'s layout)."""
    return {
        f"{name}_{field}": np.asarray(getattr(stats, field), np.float64)
        for field in ChainStats._fields
    }


def summarize_chains(info: Any) -> Any:
    """Apply :func:`chain_stats` over axis 0 to every leaf of a per-chain info pytree."""
    return jax.tree.map(
        lambda leaf: chain_stats(
            leaf.astype(jnp.float32) if not jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
        ),
        info,
    )
