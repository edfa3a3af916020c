"""Per-generation metrics of a discrete model p_n against the original distribution p0.

All functions act on ONE chain. They accept a *compacted* state axis: states that died and were
dropped from the arrays are summarised by ``p0_dropped``, the p0-mass of dropped states (each of
them has p_n = 0).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float


class DiscreteMetrics(NamedTuple):
    """What one generation reports (all scalars for one chain)."""

    entropy: Array  # H(p_n) in nats
    support_size: Array  # #{i : p_n(i) > 0}
    heterozygosity: Array  # 1 - sum_i p_n(i)^2
    total_variation: Array  # (1/2) sum_i |p_n(i) - p0(i)|
    kl_model_p0: Array  # KL(p_n || p0), always finite
    kl_p0_model: Array  # KL(p0 || p_n), +inf once a state with p0 > 0 died
    tail_mass_kept: Array  # sum of p0(i) over states still alive
    is_delta: Array  # 1.0 when p_n is a delta now (not absorbing under accumulate-subsample)
    # Data-operator metrics, None (absent from every trace) when the operator is off:
    reward: Array | None = None  # E_{p_n}[r] (curation)
    exp_reward: Array | None = None  # E_{p_n}[e^{r − max r}] (curation; a submartingale)
    good_mass: Array | None = None  # Σ_{i correct} p_n(i) (verification)


def xlogy(x, y):
    """x log y with 0 log 0 = 0."""
    return jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, y, 1.0)), 0.0)


def discrete_metrics(
    p: Float[Array, " K"],
    p0: Float[Array, " K"],
    p0_dropped: Float[Array, ""] | float = 0.0,
    reward: Float[Array, " K"] | None = None,
    reward_max: float = 0.0,
    good: Array | None = None,
) -> DiscreteMetrics:
    """Metrics of the model ``p`` (generation n) against ``p0`` (generation 0).

    Args:
      p: model probabilities over the (possibly compacted) states, shape (K,).
      p0: original probabilities of the same states, shape (K,).
      p0_dropped: total p0-mass of states no longer in the arrays (all dead).
      reward: the curation reward of each state, or None.
      reward_max: the largest reward over ALL states (a compacted axis may have lost it), the
        shift of ``exp_reward``.
      good: the verifier's correct states (bool), or None.
    """
    alive = p > 0
    entropy = -xlogy(p, p).sum()
    support = alive.sum().astype(p.dtype)
    het = 1.0 - (p * p).sum()
    tv = 0.5 * (jnp.abs(p - p0).sum() + p0_dropped)
    kl_fwd = (xlogy(p, p) - xlogy(p, p0)).sum()
    lost = jnp.any((p0 > 0) & ~alive) | (p0_dropped > 0)
    kl_rev = jnp.where(
        lost,
        jnp.inf,
        (xlogy(p0, p0) - jnp.where(p0 > 0, p0 * jnp.log(jnp.where(alive, p, 1.0)), 0.0)).sum(),
    )
    tail = jnp.where(alive, p0, 0.0).sum()
    return DiscreteMetrics(
        entropy=entropy,
        support_size=support,
        heterozygosity=het,
        total_variation=tv,
        kl_model_p0=jnp.maximum(kl_fwd, 0.0),
        kl_p0_model=jnp.maximum(kl_rev, 0.0),
        tail_mass_kept=tail,
        is_delta=(support == 1).astype(p.dtype),
        reward=None if reward is None else (p * reward).sum(),
        exp_reward=None if reward is None else (p * jnp.exp(reward - reward_max)).sum(),
        good_mass=None if good is None else jnp.where(good, p, 0.0).sum(),
    )
