"""Lockstep-aware drivers for per-lane rejection and search loops (the exact samplers' engine).

Under ``vmap`` a data-dependent ``while_loop`` costs the maximum number of iterations over all
lanes, each iteration over every lane. :func:`solve` runs a per-lane step until every lane is
done, moving the unfinished lanes into ever smaller buffers so that late rounds cost only what
is left; :func:`lanewise` makes a lane-wise function flatten a ``vmap`` batch into its lane axis
(one compaction over all chains instead of a lockstep loop per chain). Used by the exact count
samplers (``samplers.py``) and the Gamma draws' retries (``random.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

__all__ = ["compact_indices", "lanewise", "solve", "stage_sizes"]


def stage_sizes(length: int) -> tuple[int, ...]:
    """Static buffer sizes: the full width, then ~1/4 and ~1/32 of it for wide batches.

    Few stages keep the compiled program small (each stage inlines the step); the last buffer
    runs in lockstep until its lanes are done.
    """
    sizes = [length]
    for frac, min_len in ((4, 512), (32, 4096)):
        if length >= min_len:
            sizes.append(length // frac + 32)
    return tuple(sizes)


def solve(step, params, state, done, sizes):
    """Iterate ``state, finished = step(params, state, done)`` on lanes until all are done.

    At each width the step runs on every lane (finished lanes keep their state) until at most
    ``sizes[1]`` lanes remain; those are gathered into a buffer of that size and solved
    recursively, then scattered back. Each lane sees the same sequence of steps whatever the
    buffer it sits in, so results do not depend on the batch (vmap == loop over chains).
    """

    def advance(carry):
        st, dn = carry
        new, fin = step(params, st, dn)
        st = jax.tree.map(lambda old, nw: jnp.where(dn, old, nw), st, new)
        return st, dn | fin

    if len(sizes) == 1:
        state, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[1]), advance, (state, done))
        return state
    length, nxt = sizes[0], sizes[1]
    state, done = jax.lax.while_loop(
        lambda c: jnp.sum((~c[1]).astype(jnp.int32)) > nxt, advance, (state, done)
    )

    def compact_and_solve(state):
        idx = compact_indices(~done, nxt)

        def take(a):
            return jnp.take(a, idx, mode="clip")

        sub = solve(
            step, jax.tree.map(take, params), jax.tree.map(take, state), idx >= length, sizes[1:]
        )
        return jax.tree.map(lambda a, s: a.at[idx].set(s, mode="drop"), state, sub)

    # A real branch when not vmapped (the usual case: under vmap the batch is flattened first).
    return jax.lax.cond(jnp.any(~done), compact_and_solve, lambda st: st, state)


def compact_indices(active: Array, size: int) -> Array:
    """Indices of the first ``size`` active lanes, padded with ``len(active)`` (stream compaction
    by an inclusive prefix sum and a scatter; cheaper than ``jnp.nonzero`` on CPU)."""
    length = active.shape[0]
    pos = jax.lax.associative_scan(jnp.add, active.astype(jnp.int32)) - 1
    target = jnp.where(active & (pos < size), pos, size)
    return (
        jnp.full((size,), length, jnp.int32)
        .at[target]
        .set(jax.lax.iota(jnp.int32, length), mode="drop", unique_indices=True)
    )


def lanewise(fn):
    """Wrap a lane-wise sampler ``fn(*arrays of shape (L,)) -> (L,)`` so that under ``vmap`` the
    batch is flattened into one lane axis (one compaction over all chains) instead of running
    the while loops in lockstep over the batch. Results are identical either way."""
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = [
            a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b in zip(args, in_batched, strict=True)
        ]
        shape = args[0].shape
        out = wrapped(*[a.reshape(-1) for a in args])
        return out.reshape(shape), True

    return wrapped
