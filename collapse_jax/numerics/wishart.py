"""Exact Wishart draws by Bartlett's decomposition (the Gaussian family's sufficient statistics,
the regression family's fresh designs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from collapse_jax.numerics.random import log_gamma_from_uniforms, normal_from_uniform, uniforms


def sufficient_draws(
    key: jax.Array, dof, d: int, dtype, *, boost: bool = True
) -> tuple[Float[Array, " d"], Float[Array, "d d"], Float[Array, " d"]]:
    """Everything one sufficient-statistic generation needs, from ONE random-bits call.

    Returns (z, lower, log_diag): z ~ N(0, I_d) for the mean, and the Bartlett factor A of
    W = A Aᵀ ~ Wishart(dof, I_d) (also for singular dof < d) as its strictly lower part and
    log diagonal: A_jj² ~ χ²_{dof−j}, A_ij ~ N(0, 1) for i > j, in columns j < dof; columns
    j >= dof are zero (log diagonal −inf).
    """
    n_low = d * (d - 1) // 2
    n_gam = 3 * d if boost else 2 * d
    u = uniforms(key, d + n_low + n_gam, dtype)
    z = normal_from_uniform(u[:d])
    j = jnp.arange(d)
    dof = jnp.asarray(dof, dtype)
    col_ok = j < dof
    shape = jnp.where(col_ok, dof - j, 1.0) / 2
    u_gam = jnp.concatenate([u[d + n_low :], jnp.ones(3 * d - n_gam, dtype)]).reshape(3, d)
    lg = jnp.log(jnp.asarray(2.0, dtype)) + log_gamma_from_uniforms(u_gam, key, shape, boost=boost)
    log_diag = jnp.where(col_ok, 0.5 * lg, -jnp.inf)
    if d == 1:
        return z, jnp.zeros((1, 1), dtype), log_diag
    rows, cols = np.tril_indices(d, -1)
    lower = jnp.zeros((d, d), dtype).at[rows, cols].set(normal_from_uniform(u[d : d + n_low]))
    return z, lower * col_ok[None, :], log_diag


def bartlett(
    key: jax.Array, dof, d: int, *, boost: bool = True
) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
    """The Bartlett factor of Wishart(dof, I_d) as (strict lower part, log diagonal)."""
    _, lower, log_diag = sufficient_draws(key, dof, d, jnp.zeros(()).dtype, boost=boost)
    return lower, log_diag
