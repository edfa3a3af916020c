"""Data operators (core/operators.py): curation, verification, temperature, top-k / top-p and
weighted real data against closed forms and independent NumPy / SciPy computations, with
tolerances of 4 Monte Carlo standard errors; operators off give the numbers of before;
families refuse what they cannot take."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import collapse_jax as cj
from collapse_jax.core import operators as op
from collapse_jax.core.errors import ConfigError
from collapse_jax.core.loop import GenInput, precision
from collapse_jax.core.policies import Policy
from collapse_jax.families.discrete import kernel as dk
from collapse_jax.families.discrete import study as dstudy

Z = 4.0  # tolerance in Monte Carlo standard errors


def assert_within(mc, se, theory, what):
    mc, se, theory = (np.asarray(v, np.float64) for v in (mc, se, theory))
    z = np.abs(mc - theory) / se
    assert np.all(z < Z), f"{what}: MC {mc} ± {se} vs theory {theory} (z = {z})"
    return float(np.max(z))


# --------------------------------------------------------------------------------------------
# Independent NumPy computations of the categorical laws


def np_curation_law(p, r, k):
    """Best-of-k by enumeration of all k-tuples of candidates: P(kept = i)."""
    p, r = np.asarray(p, np.float64), np.asarray(r, np.float64)
    out = np.zeros(len(p))
    for tup in itertools.product(range(len(p)), repeat=k):
        prob = np.prod(p[list(tup)])
        w = np.exp(r[list(tup)])
        for j, i in enumerate(tup):
            out[i] += prob * w[j] / w.sum()
    return out


def np_temper_truncate(p, tau=1.0, top_k=0, top_p=1.0):
    p = np.asarray(p, np.float64) ** (1.0 / tau)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.ones(len(p), bool)
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1:
        mass = 0.0
        for i in np.argsort(-q, kind="stable"):
            if mass >= top_p:
                keep[i] = False
            mass += q[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def discrete_state(counts, p0):
    k = len(counts)
    return dk.DiscreteState(
        counts=jnp.asarray(counts, jnp.int32),
        pool=jnp.zeros(k, jnp.int32),
        p0=jnp.asarray(p0, jnp.float32),
        index=jnp.arange(k, dtype=jnp.int32),
        p0_dropped=jnp.zeros((), jnp.float32),
        absorbed_at=jnp.asarray(-1, jnp.int32),
        absorbed_state=jnp.asarray(-1, jnp.int32),
    )


def one_step_counts(ops, counts, m, chains, seed=0):
    """Counts of T_n after one step of the discrete family from fixed counts (one vector for
    every chain, or one per chain), per chain."""
    counts = np.broadcast_to(np.asarray(counts), (chains, np.shape(counts)[-1]))
    p0 = counts[0] / counts[0].sum()
    state = jax.vmap(discrete_state, (0, None))(jnp.asarray(counts), p0)
    params = dk.DiscreteParams(
        jnp.asarray(p0, jnp.float32), jnp.asarray(0, jnp.int32), jnp.asarray(0.0, jnp.float32)
    )
    keys = jax.random.split(jax.random.key(seed), chains)
    return np.asarray(_stepper(ops, m)(keys, state, params).counts, np.float64)


@functools.lru_cache
def _stepper(ops, m):
    fam = dk.make_family(Policy(), "counts", max_size=m, ops=ops)
    gen = GenInput(jnp.int32(2), jnp.int32(m), jnp.asarray(False))
    return jax.jit(lambda k, s, p: jax.vmap(fam.step, (0, 0, None, None))(k, s, p, gen)[0])


def check_counts(counts, law, m, what):
    """Mean counts per state against m·law (multinomial standard errors)."""
    chains = counts.shape[0]
    se = np.sqrt(np.maximum(m * law * (1 - law), 1e-12) / chains)
    live = law > 0
    assert np.all(counts[:, ~live] == 0), f"{what}: a state outside the law's support was drawn"
    return assert_within(counts.mean(0)[live], se[live], m * law[live], what)


# --------------------------------------------------------------------------------------------
# Curation


def test_curation_factor_matches_enumeration():
    """H_K by quadrature (float64) equals the enumeration over all K-tuples."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    r = np.array([0.0, 1.5, -2.0, 3.0])
    with precision(True):
        for k in (1, 2, 3, 5):
            h = np.asarray(op.curation_factor(jnp.asarray(p), jnp.asarray(r), k))
            np.testing.assert_allclose(p * h, np_curation_law(p, r, k), rtol=1e-9, atol=1e-12)


def test_curation_limit_and_reward_growth():
    """K → ∞ gives p·e^r / E[e^r] and E_p̃[e^r] >= E_p[e^r] for every K (Chebyshev's sum
    inequality, theory/operators.md), on random p and r computed in NumPy."""
    rng = np.random.default_rng(0)
    with precision(True):
        for _ in range(5):
            p = rng.dirichlet(np.ones(4))
            r = rng.normal(0, 1.5, 4)
            base = p @ np.exp(r)
            prev = base
            for k in (2, 3, 4):
                law = np_curation_law(p, r, k)
                grown = law @ np.exp(r)
                assert grown >= prev - 1e-12  # grows with K too
                prev = grown
            tilted = p * np.exp(r) / base
            big = p * np.asarray(op.curation_factor(jnp.asarray(p), jnp.asarray(r), 20000))
            np.testing.assert_allclose(big, tilted, atol=2e-3)
            np.testing.assert_allclose(np.asarray(op.tilt(jnp.asarray(p), jnp.asarray(r))), tilted)


def test_best_of_k_tournament_simulation_matches_curation_law():
    """A direct NumPy simulation of Bradley–Terry best-of-K (K candidates, keep one ∝ e^r)
    against p·H_K from the quadrature."""
    rng = np.random.default_rng(1)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    r = np.array([0.0, -1.0, 1.0, 2.0])
    k, n = 4, 200_000
    cand = rng.choice(4, size=(n, k), p=p)
    w = np.exp(r[cand])
    pick = (rng.random(n)[:, None] > np.cumsum(w / w.sum(1, keepdims=True), 1)).sum(1)
    kept = cand[np.arange(n), pick]
    freq = np.bincount(kept, minlength=4) / n
    with precision(True):
        law = p * np.asarray(op.curation_factor(jnp.asarray(p), jnp.asarray(r), k))
    assert_within(freq, np.sqrt(law * (1 - law) / n), law, "best-of-4 tournament")


# --------------------------------------------------------------------------------------------
# The discrete family: one generation's counts are multinomial of the transformed law


def _ops(**fields):
    cfg = dstudy.Config(**{"states": 5, **fields})
    return op.parse(cfg, "discrete", dk.OPERATORS, states=5)


COUNTS = np.array([400, 300, 150, 100, 50])
REWARD = "0,-1,1,2,0.5"


@pytest.mark.parametrize(
    ("fields", "law"),
    [
        ({"curate": "3", "reward": REWARD}, lambda p: np_curation_law(p, [0, -1, 1, 2, 0.5], 3)),
        (
            {"curate": "inf", "reward": REWARD},
            lambda p: p * np.exp([0, -1, 1, 2, 0.5]) / (p @ np.exp([0, -1, 1, 2, 0.5])),
        ),
        (
            {"verify": "0.9,0.2", "good": "2-4"},
            lambda p: p * np.array([0.2, 0.2, 0.9, 0.9, 0.9]) / (p @ [0.2, 0.2, 0.9, 0.9, 0.9]),
        ),
        ({"temperature": 0.5}, lambda p: np_temper_truncate(p, tau=0.5)),
        ({"temperature": 2.0, "top_k": 3}, lambda p: np_temper_truncate(p, 2.0, top_k=3)),
        ({"top_p": 0.8}, lambda p: np_temper_truncate(p, top_p=0.8)),
        (
            {"temperature": 1.5, "top_p": 0.9, "curate": "2", "reward": REWARD},
            lambda p: np_curation_law(np_temper_truncate(p, 1.5, top_p=0.9), [0, -1, 1, 2, 0.5], 2),
        ),
    ],
    ids=["curate3", "curate-inf", "verify", "temperature", "temp-topk", "top-p", "composed"],
)
def test_categorical_law(fields, law):
    """The transformed law (float64) equals p̃ computed independently in NumPy."""
    p = COUNTS / COUNTS.sum()
    ops = _ops(**fields)
    with precision(True):
        reward = jnp.asarray([0, -1, 1, 2, 0.5], jnp.float64) if ops.curate else None
        good = jnp.asarray([False, False, True, True, True]) if ops.verify else None
        got = np.asarray(op.categorical(jnp.asarray(p), ops, reward, good))
    np.testing.assert_allclose(got, law(p), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1.5, "top_p": 0.9, "curate": "2", "reward": REWARD},
        {"curate": "3", "reward": REWARD, "verify": "0.9,0.2", "good": "2-4", "top_k": 4},
    ],
    ids=["temp-topp-curate2", "topk-curate3-verify"],
)
def test_discrete_one_generation_counts(fields):
    """E[counts of T_n | p_n] = M·p̃ (the family's exact multinomial of the operators' law),
    p̃ computed independently in NumPy."""
    m, chains = 200, 4096
    counts = one_step_counts(_ops(**fields), COUNTS, m, chains)
    p = COUNTS / COUNTS.sum()
    law = np_temper_truncate(p, fields.get("temperature", 1.0), fields.get("top_k", 0), fields.get("top_p", 1.0))
    law = np_curation_law(law, [0, -1, 1, 2, 0.5], int(fields["curate"]))
    if "verify" in fields:
        law = law * np.array([0.2, 0.2, 0.9, 0.9, 0.9])
        law /= law.sum()
    assert np.all(counts.sum(1) == m)
    check_counts(counts, law, m, str(fields))


def test_temperature_fixed_points():
    """The mean map p ↦ p^{1/τ}/Z iterates to p_n ∝ p_0^{τ^{-n}}: towards the mode for τ < 1 and
    towards uniform for τ > 1. Simulated with M = 10^6 (the finite-M bias is O(1/M), far below
    the standard error of 64 chains) for 3 generations from fixed counts."""
    p0 = COUNTS / COUNTS.sum()
    m, chains = 1_000_000, 64
    for tau in (0.6, 1.8):
        ops = _ops(temperature=tau)
        counts = np.tile(COUNTS, (chains, 1))
        for g in range(3):  # each chain continues from its own counts
            counts = one_step_counts(ops, counts.astype(np.int64), m, chains, seed=g)
        pn = counts / m
        theory = p0 ** (tau**-3) / np.sum(p0 ** (tau**-3))
        se = pn.std(0, ddof=1) / np.sqrt(chains)
        assert_within(pn.mean(0), np.maximum(se, 1e-7), theory, f"temperature {tau}")
        far = special.softmax(np.log(p0) * tau**-20)
        expected = np.eye(5)[0] if tau < 1 else np.full(5, 0.2)
        np.testing.assert_allclose(far, expected, atol=1e-3)
