"""Exact count samplers for ONE chain: binomial, multinomial and multivariate hypergeometric.

All functions are pure, jittable and vmappable; counts are int32 vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def binomial(key: jax.Array, n: Int[Array, "..."], p: Float[Array, "..."]) -> Int[Array, "..."]:
    """Exact Binomial(n, p) draws (elementwise)."""
    n = jnp.asarray(n)
    p = jnp.clip(jnp.asarray(p, jnp.float32), 0.0, 1.0)
    x = jax.random.binomial(key, n.astype(jnp.float32), p)
    return jnp.clip(jnp.round(x), 0, n).astype(jnp.int32)


def multinomial(key: jax.Array, n: Int[Array, ""], p: Float[Array, " K"]) -> Int[Array, " K"]:
    """Exact Multinomial(n, p) counts by conditional binomials.

    State k gets Binomial(n - sum_{j<k} x_j, p_k / sum_{j>=k} p_j); states with p_k = 0 get 0.
    """
    p = jnp.asarray(p, jnp.float32)
    p = p / p.sum()
    rest = jnp.cumsum(p[::-1])[::-1]  # sum_{j>=k} p_j
    cond = jnp.where(rest > 0, p / jnp.where(rest > 0, rest, 1.0), 0.0)
    cond = jnp.clip(cond, 0.0, 1.0)
    keys = jax.random.split(key, p.shape[0])

    def body(remaining, inp):
        k, q = inp
        x = binomial(k, remaining, q)
        x = jnp.where(remaining > 0, x, 0)
        return remaining - x, x

    remaining, x = jax.lax.scan(body, jnp.asarray(n, jnp.int32), (keys, cond))
    # The last state with positive probability takes whatever remains (its conditional p is 1).
    return x.at[-1].add(remaining)


def multivariate_hypergeometric(
    key: jax.Array, n: Int[Array, ""], counts: Int[Array, " K"]
) -> Int[Array, " K"]:
    """Counts of a uniform subsample of size ``n`` drawn without replacement from a multiset.

    ``counts[k]`` items of state k; requires ``n <= counts.sum()``. Exact, draw by draw.
    """
    counts = jnp.asarray(counts, jnp.int32)

    def cond_fn(carry):
        i, _, _ = carry
        return i < n

    def body(carry):
        i, rem, out = carry
        u = jax.random.uniform(jax.random.fold_in(key, i))
        total = rem.sum()
        target = jnp.floor(u * total).astype(jnp.int32)
        k = jnp.searchsorted(jnp.cumsum(rem), target, side="right")
        return i + 1, rem.at[k].add(-1), out.at[k].add(1)

    _, _, out = jax.lax.while_loop(
        cond_fn, body, (jnp.asarray(0, jnp.int32), counts, jnp.zeros_like(counts))
    )
    return out
