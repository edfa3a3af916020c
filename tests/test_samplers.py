"""Exactness tests for collapse_jax.numerics.samplers against scipy.stats (fixed keys, small sizes).

Goodness of fit uses Pearson's chi-square on cells with expected count >= 5 (the rest pooled
into one cell) and fails at significance 1e-4; moment checks use |mean - theory| < 4 stderr.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st

from collapse_jax.numerics import samplers
from collapse_jax.numerics.random import (
    argmax_by_comparisons,
    fold_in,
    jax_bernoulli,
    jax_categorical,
    jax_normal,
    jax_uniform,
    key_bits,
    seed_key,
    threefry2x32,
)

ALPHA = 1e-4


def chi_square_ok(samples: np.ndarray, pmf: np.ndarray) -> tuple[bool, float]:
    """Pearson chi-square of integer ``samples`` against ``pmf`` over 0..len(pmf)-1."""
    n = samples.size
    obs = np.bincount(samples, minlength=pmf.size)
    assert obs.size == pmf.size, "sample outside the support"
    exp = pmf * n
    big = exp >= 5
    stat = float((((obs[big] - exp[big]) ** 2) / exp[big]).sum())
    df = int(big.sum()) - 1
    rest_e, rest_o = exp[~big].sum(), obs[~big].sum()
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        df += 1
    pval = float(st.chi2.sf(stat, max(df, 1)))
    return pval > ALPHA, pval


# ------------------------------------------------------------------------------------------
# Random bits
# ------------------------------------------------------------------------------------------


#: Known answers of Threefry-2x32 with 20 rounds from the Random123 distribution (kat_vectors):
#: (key, counter, output), each as two words.
RANDOM123_KAT = (
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
)


def test_threefry_matches_random123_known_answers():
    """The block function against the reference implementation's published vectors (an
    independent reference: since this package lowers ``jax.random``'s Threefry on CPU with the
    same function, JAX's own outputs here are not one)."""
    for (k0, k1), (x0, x1), want in RANDOM123_KAT:
        got = threefry2x32(*(jnp.uint32(v) for v in (k0, k1, x0, x1)))
        assert tuple(int(w) for w in got) == want


_JAX_RANDOM_DRAWS = """
import sys
import jax, jax.extend.random, jax.numpy as jnp, numpy as np
import collapse_jax.numerics.random  # registers the unrolled lowering unless told not to
out = {}
keys = jax.random.split(jax.random.key(3), 16)
for part in (True, False):
    with jax.threefry_partitionable(part):
        draws = {
            "split": lambda k: jax.random.key_data(jax.random.split(k, 3)),
            "fold_in": lambda k: jax.random.key_data(jax.random.fold_in(k, 7)),
            "bits": lambda k: jax.random.bits(k, (5,), jnp.uint32),
            "normal": lambda k: jax.random.normal(k, (4, 3)),
            "uniform": lambda k: jax.random.uniform(k, (7,), minval=-1.0, maxval=2.0),
            "randint": lambda k: jax.random.randint(k, (6,), 0, 1000),
            "categorical": lambda k: jax.random.categorical(k, jnp.log(jnp.arange(1.0, 6.0)), shape=(9,)),
            "permutation": lambda k: jax.random.permutation(k, 10),
            "gamma": lambda k: jax.random.gamma(k, 0.7, (5,)),
            "t": lambda k: jax.random.t(k, 3.0, (5,)),
        }
        for name, draw in draws.items():
            out[f"{name}-{part}"] = np.asarray(jax.jit(jax.vmap(draw))(keys))
        out[f"one-{part}"] = np.asarray(jax.random.normal(jax.random.key(9), (3,)))
words = jnp.arange(16, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
out["threefry_2x32"] = np.asarray(
    jax.jit(jax.extend.random.threefry_2x32)(jnp.array([0x13198A2E, 0x03707344], jnp.uint32), words)
)
hlo = jax.jit(lambda k: jax.random.bits(k, (4,))).lower(jax.random.key(1)).as_text()
out["while_in_lowering"] = np.asarray("stablehlo.while" in hlo)
np.savez(sys.argv[1], **out)
"""


def test_jax_random_under_the_unrolled_lowering_equals_jax_own(tmp_path):
    """``jax.random`` lowered on CPU with the package's unrolled Threefry block gives JAX's own
    keys and draws bit for bit: the same script run with JAX's CPU lowering (a rolled loop,
    ``COLLAPSE_JAX_ROLLED_THREEFRY=1``) and with the package's, compared array by array, for
    the raw block, splits, fold-ins, bits and the draws built on them, with the partitionable
    setting on and off. The lowering really differs between the two (a while loop in one, none in the other)."""
    import os
    import subprocess
    import sys

    if jax.default_backend() != "cpu":
        pytest.skip("the unrolled lowering is registered for CPU only (JAX's own elsewhere)")
    script = tmp_path / "draws.py"
    script.write_text(_JAX_RANDOM_DRAWS)
    results = {}
    for rolled in ("1", ""):
        env = dict(os.environ, COLLAPSE_JAX_ROLLED_THREEFRY=rolled)
        path = tmp_path / f"draws-{rolled or 'unrolled'}.npz"
        subprocess.run([sys.executable, str(script), str(path)], env=env, check=True)
        results[rolled] = dict(np.load(path))
    jax_own, ours = results["1"], results[""]
    assert bool(jax_own.pop("while_in_lowering")) and not bool(ours.pop("while_in_lowering"))
    assert sorted(jax_own) == sorted(ours)
    for name in jax_own:
        np.testing.assert_array_equal(ours[name], jax_own[name], err_msg=name)


def test_seed_key_is_jax_random_key():
    """The host-built key of a run's seed is ``jax.random.key(seed)``, bit for bit: same key
    data, same implementation, so the same draws."""
    for seed in (0, 1, 7, 12345, 2**31 - 1):
        ours, ref = seed_key(seed), jax.random.key(seed)
        assert jax.random.key_impl(ours) == jax.random.key_impl(ref)
        np.testing.assert_array_equal(jax.random.key_data(ours), jax.random.key_data(ref))
        np.testing.assert_array_equal(jax.random.bits(ours, (4,)), jax.random.bits(ref, (4,)))


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_fold_in_and_key_bits_equal_jax(impl, partitionable):
    """The unrolled ``fold_in`` and ``key_bits`` give JAX's keys and words bit for bit, under
    vmap and jit as the run loop and the samplers call them (other implementations, and
    Threefry's non-partitionable bits, are JAX's own functions)."""
    keys = jax.random.split(jax.random.key(11, impl=impl), 257)
    with jax.threefry_partitionable(partitionable):
        for data in (0, 1, 800, 2**31 - 1):
            ref = jax.vmap(jax.random.fold_in, (0, None))(keys, data)
            ours = jax.jit(jax.vmap(fold_in, (0, None)))(keys, jnp.int32(data))
            assert jax.random.key_impl(ours) == jax.random.key_impl(ref)
            np.testing.assert_array_equal(jax.random.key_data(ours), jax.random.key_data(ref))
        ref = jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys)
        ours = jnp.stack(jax.jit(jax.vmap(key_bits))(keys), axis=1)
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flat_draws_equal_jax_random(dtype, partitionable):
    """``jax_normal`` / ``jax_uniform`` / ``jax_bernoulli`` / ``jax_categorical`` (drawn flat
    for a shorter compile) give ``jax.random``'s arrays bit for bit, under vmap and jit as the
    kernels call them, for 2-D and 3-D shapes, with Threefry's partitionable setting on and
    off, in float32 and float64."""
    keys = jax.random.split(jax.random.key(5), 9)
    with jax.threefry_partitionable(partitionable), jax.enable_x64(dtype == "float64"):
        logits = jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4], dtype))
        for shape in ((5, 3), (2, 3, 2)):
            pairs = [
                (
                    lambda k, shape=shape: jax.random.normal(k, shape, dtype),
                    lambda k, shape=shape: jax_normal(k, shape, dtype),
                ),
                (
                    lambda k, shape=shape: jax.random.uniform(k, shape, dtype, -1.0, 2.0),
                    lambda k, shape=shape: jax_uniform(k, shape, dtype, -1.0, 2.0),
                ),
                (
                    lambda k, shape=shape: jax.random.bernoulli(k, 0.3, shape),
                    lambda k, shape=shape: jax_bernoulli(k, 0.3, shape),
                ),
                (
                    lambda k, shape=shape: jax.random.categorical(k, logits, shape=shape),
                    lambda k, shape=shape: jax_categorical(k, logits, shape),
                ),
            ]
            for ref, ours in pairs:
                got, want = jax.jit(jax.vmap(ours))(keys), jax.jit(jax.vmap(ref))(keys)
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want)
        p = jax.random.uniform(jax.random.key(6), (9, 4, 3), dtype)  # one p per element
        np.testing.assert_array_equal(
            jax.vmap(jax_bernoulli)(keys, p), jax.vmap(jax.random.bernoulli)(keys, p)
        )
        batch = jnp.log(jax.random.uniform(jax.random.key(7), (9, 2, 4), dtype))  # (2,) batch
        np.testing.assert_array_equal(
            jax.vmap(lambda k, lg: jax_categorical(k, lg, (5, 2)))(keys, batch),
            jax.vmap(lambda k, lg: jax.random.categorical(k, lg, shape=(5, 2)))(keys, batch),
        )


def test_argmax_by_comparisons_equals_numpy_argmax():
    """The comparison chain that ``jax_categorical`` uses for up to 16 classes gives NumPy's
    ``argmax`` index (the first of tied maxima, the first NaN) and ``jnp.argmax``'s integer
    type, with -inf entries, for 1 to 17 classes (the last beyond the chain: its categorical
    takes ``argmax``). NumPy is the reference, not ``jnp.argmax``: on an H200, XLA's argmax
    returned a later NaN than the first in rows holding several (seen in 14 of 200 rows);
    the chain matched NumPy there in every row."""
    rng = np.random.default_rng(3)
    for x64 in (False, True):
        with jax.enable_x64(x64):
            for k in (1, 2, 4, 16, 17):
                v = rng.integers(0, 3, size=(200, k)).astype(np.float64)  # many ties
                v[rng.random((200, k)) < 0.1] = -np.inf
                v[rng.random((200, k)) < 0.05] = np.nan
                v[:3] = -np.inf  # every entry -inf: index 0
                vj = jnp.asarray(v, jnp.float64 if x64 else jnp.float32)
                got = jax.jit(argmax_by_comparisons)(vj)
                assert got.dtype == jnp.argmax(vj, axis=-1).dtype
                np.testing.assert_array_equal(got, np.argmax(v, axis=-1))
            logits = jnp.log(jnp.linspace(1.0, 2.0, 17))
            keys = jax.random.split(jax.random.key(8), 5)
            np.testing.assert_array_equal(
                jax.vmap(lambda k, lg=logits: jax_categorical(k, lg, (30,)))(keys),
                jax.vmap(lambda k, lg=logits: jax.random.categorical(k, lg, shape=(30,)))(keys),
            )


# ------------------------------------------------------------------------------------------
# Binomial
# ------------------------------------------------------------------------------------------


def test_binomial_edge_cases():
    key = jax.random.key(0)
    n = jnp.array([0, 0, 7, 7, 2**31 - 1, 2**31 - 1, 2**31 - 1, 5], jnp.int32)
    p = jnp.array([0.0, 0.7, 0.0, 1.0, 0.0, 1.0, 0.5, 1.0], jnp.float32)
    x = np.asarray(samplers.binomial(key, n, p))
    assert x.dtype == np.int32
    np.testing.assert_array_equal(x[[0, 1, 2, 3, 4, 5, 7]], [0, 0, 0, 7, 0, 2**31 - 1, 5])
    # n = 2^31 - 1, p = 1/2: within 10 standard deviations of the mean.
    assert abs(int(x[6]) - 2**30) < 10 * np.sqrt(2**31 / 4)


@pytest.mark.parametrize("p", [1.5, -0.1, float("nan")])
def test_binomial_refuses_probability_outside_unit_interval(p):
    with pytest.raises(ValueError, match="binomial p must be in"):
        samplers.binomial(jax.random.key(0), jnp.array([5, 5]), jnp.array([0.5, p]))


def test_binomial_refuses_negative_trials():
    with pytest.raises(ValueError, match="binomial n must be >= 0"):
        samplers.binomial(jax.random.key(0), jnp.array([-1, 5]), 0.5)


# (n, p) grid: inversion (n p < 10), BTRS (n p >= 10), p > 1/2 by symmetry, tiny p, n = 1.
BINOMIAL_GRID = [
    (1, 0.3),
    (4, 0.5),
    (30, 0.1),
    (100, 0.095),
    (25, 0.45),
    (40, 0.5),
    (200, 0.07),
    (1000, 0.5),
    (1000, 0.97),
    (60, 0.8),
    (100000, 0.0001),
]


@pytest.mark.parametrize(("n", "p"), BINOMIAL_GRID)
def test_binomial_chi_square(n, p):
    size = 20000
    key = jax.random.fold_in(jax.random.key(1), n)
    x = np.asarray(samplers.binomial(key, jnp.full((size,), n, jnp.int32), p))
    assert x.min() >= 0 and x.max() <= n
    support = np.arange(n + 1) if n <= 2000 else np.arange(int(n * p + 40 * np.sqrt(n * p) + 50))
    pmf = st.binom(n, p).pmf(support)
    pmf[-1] += 1.0 - pmf.sum()
    ok, pval = chi_square_ok(x, pmf)
    assert ok, f"Binomial({n}, {p}) chi-square p-value {pval:.2g}"


@pytest.mark.parametrize(("n", "p"), [(10**6, 0.3), (2**24, 0.01), (10**9, 2e-8)])
def test_binomial_large_n_moments(n, p):
    size = 20000
    x = np.asarray(samplers.binomial(jax.random.key(2), jnp.full((size,), n, jnp.int32), p))
    mean, var = n * p, n * p * (1 - p)
    assert abs(x.mean() - mean) < 4 * np.sqrt(var / size)
    # The standard error of a sample variance, √((μ₄ − σ⁴) / size), from the draws' own
    # fourth central moment.
    dev2 = (x - x.mean()) ** 2
    assert abs(x.var() - var) < 4 * dev2.std() / np.sqrt(size)


def test_binomial_mixed_lanes_and_broadcast():
    # Lanes of every regime in one call (rejection, inversion, trivial, flipped).
    key = jax.random.key(3)
    n = jnp.array([[0], [5], [50], [5000]], jnp.int32)
    p = jnp.array([0.0, 0.02, 0.5, 0.9, 1.0], jnp.float32)
    x = samplers.binomial(key, n, p)
    assert x.shape == (4, 5)
    assert bool(jnp.all((x >= 0) & (x <= n)))
    assert bool(jnp.all(x[:, 0] == 0)) and bool(jnp.all(x[:, 4] == n[:, 0]))


def test_binomial_jit_vmap_and_key_impls():
    n = jnp.array([3, 40, 700, 0], jnp.int32)
    p = jnp.array([0.2, 0.5, 0.3, 0.5], jnp.float32)
    keys = jax.random.split(jax.random.key(4), 6)
    loop = np.stack([np.asarray(samplers.binomial(k, n, p)) for k in keys])
    vm = np.asarray(jax.jit(jax.vmap(samplers.binomial, in_axes=(0, None, None)))(keys, n, p))
    np.testing.assert_array_equal(loop, vm)
    jitted = np.asarray(jax.jit(samplers.binomial)(keys[0], n, p))
    np.testing.assert_array_equal(jitted, loop[0])
    for impl in ("rbg", "unsafe_rbg"):
        x = samplers.binomial(jax.random.key(0, impl=impl), n, p)
        assert bool(jnp.all((x >= 0) & (x <= n)))
    legacy = samplers.binomial(jax.random.PRNGKey(0), n, p)
    assert legacy.shape == n.shape


def test_binomial_float64():
    with jax.enable_x64(True):
        n, p, size = 60, 0.3, 20000
        x = np.asarray(samplers.binomial(jax.random.key(5), jnp.full((size,), n), p))
        ok, pval = chi_square_ok(x, st.binom(n, p).pmf(np.arange(n + 1)))
        assert ok, pval
        big = np.asarray(samplers.binomial(jax.random.key(6), jnp.full((size,), 2**31 - 1), 0.4))
        mean, var = (2**31 - 1) * 0.4, (2**31 - 1) * 0.24
        assert abs(big.mean() - mean) < 4 * np.sqrt(var / size)


# ------------------------------------------------------------------------------------------
# Multinomial
# ------------------------------------------------------------------------------------------


def test_multinomial_exact_joint_small():
    # All compositions of n = 4 into K = 3 states against scipy's multinomial pmf.
    n, p, size = 4, np.array([0.2, 0.5, 0.3]), 20000
    keys = jax.random.split(jax.random.key(7), size)
    x = np.asarray(jax.vmap(samplers.multinomial, in_axes=(0, None, None))(keys, n, p))
    assert np.all(x.sum(1) == n)
    comps = [c for c in itertools.product(range(n + 1), repeat=3) if sum(c) == n]
    index = {c: i for i, c in enumerate(comps)}
    cells = np.array([index[tuple(row)] for row in x])
    pmf = np.array([st.multinomial(n, p).pmf(c) for c in comps])
    ok, pval = chi_square_ok(cells, pmf)
    assert ok, pval


@pytest.mark.parametrize("k_states", [1, 2, 5, 50])
def test_multinomial_moments_and_dead_states(k_states):
    m, size = 1000, 4000
    rng = np.random.default_rng(k_states)
    w = rng.random(k_states)
    w[rng.random(k_states) < 0.3] = 0.0
    w[0] = max(w[0], 0.05)
    p = w / w.sum()
    keys = jax.random.split(jax.random.key(8), size)
    draw = jax.jit(jax.vmap(samplers.multinomial, in_axes=(0, None, None)))
    x = np.asarray(draw(keys, m, jnp.asarray(p, jnp.float32)))
    assert x.shape == (size, k_states) and x.dtype == np.int32
    assert np.all(x.sum(1) == m)
    assert np.all(x[:, p == 0] == 0)
    live = p > 0
    mean, var = m * p[live], m * p[live] * (1 - p[live])
    se = np.sqrt(np.maximum(var, 1e-12) / size)
    assert np.all(np.abs(x[:, live].mean(0) - mean) <= 4 * se + 1e-9)
    if k_states >= 2:
        # Covariance of the first two states: -m p0 p1.
        c = np.cov(x[:, 0], x[:, 1])[0, 1]
        prod = (x[:, 0] - x[:, 0].mean()) * (x[:, 1] - x[:, 1].mean())
        sd = prod.std() / np.sqrt(size)  # standard error of the sample covariance
        assert abs(c - (-m * p[0] * p[1])) <= 4 * sd + 1e-9


def test_multinomial_jit_vmap_unnormalised():
    p = jnp.array([2.0, 0.0, 1.0, 1.0, 0.0], jnp.float32)  # weights, normalised internally
    keys = jax.random.split(jax.random.key(9), 5)
    loop = np.stack([np.asarray(samplers.multinomial(k, 100, p)) for k in keys])
    vm = np.asarray(jax.jit(jax.vmap(samplers.multinomial, in_axes=(0, None, None)))(keys, 100, p))
    np.testing.assert_array_equal(loop, vm)
    assert np.all(loop.sum(1) == 100) and np.all(loop[:, [1, 4]] == 0)
    assert np.all(np.asarray(samplers.multinomial(keys[0], 0, p)) == 0)


def test_multinomial_packed_levels_do_not_depend_on_the_batch():
    """Wide tree levels pack live lanes into blocks of ``_BLOCK``: a chain's draw must be the same
    whether it is sampled alone or among 300 chains (9,600 lanes per wide level, 3 blocks)."""
    rng = np.random.default_rng(11)
    chains, k_states = 300, 64
    w = rng.random((chains, k_states))
    w[rng.random((chains, k_states)) < 0.8] = 0.0  # mostly dead states: most lanes are trivial
    w[:, 5] += 0.01
    p = jnp.asarray(w / w.sum(1, keepdims=True), jnp.float32)
    keys = jax.random.split(jax.random.key(12), chains)
    assert chains * k_states // 2 > samplers._BLOCK
    vm = np.asarray(jax.jit(jax.vmap(samplers.multinomial, in_axes=(0, None, 0)))(keys, 1000, p))
    one = jax.jit(samplers.multinomial)
    loop = np.stack([np.asarray(one(keys[c], 1000, p[c])) for c in range(0, chains, 37)])
    np.testing.assert_array_equal(vm[::37], loop)
    assert np.all(vm.sum(1) == 1000) and np.all(vm[np.asarray(p) == 0] == 0)


def test_multinomial_dense_levels_match_sparse_levels():
    """A wide level with mostly live lanes is sampled block by block in place (the last block
    moved back to end at the last lane), one with mostly trivial lanes after packing: either
    way a chain's draw must be the one it gets alone. 300 chains x 50 live states: every wide
    level is dense and spans 3 blocks of ``_BLOCK`` lanes, the last one partial."""
    rng = np.random.default_rng(13)
    chains, k_states = 300, 50
    p = jnp.asarray(rng.dirichlet(np.full(k_states, 5.0), chains), jnp.float32)
    keys = jax.random.split(jax.random.key(14), chains)
    lanes = chains * 32  # the widest level of a 64-leaf tree
    assert 2 * samplers._BLOCK < lanes < 3 * samplers._BLOCK
    vm = np.asarray(jax.jit(jax.vmap(samplers.multinomial, in_axes=(0, None, 0)))(keys, 1000, p))
    one = jax.jit(samplers.multinomial)
    picks = [0, 1, 127, 128, 255, 256, 299]  # chains at block edges and in the last block
    loop = np.stack([np.asarray(one(keys[c], 1000, p[c])) for c in picks])
    np.testing.assert_array_equal(vm[picks], loop)
    assert np.all(vm.sum(1) == 1000)


@pytest.mark.parametrize(
    "chains, k_states, m, dead",
    [(300, 50, 1000, 0.0), (300, 64, 1000, 0.8), (40, 20, 100, 0.3), (7, 2, 5000, 0.0)],
)
def test_multinomial_small_program_gives_the_same_counts(chains, k_states, m, dead):
    """``small_program`` (one lockstep copy of the binomial sampler for every level: what a
    study's generation 0 uses) must give exactly the counts of the staged, packed program, on
    dense and sparse levels, inversion and BTRS lanes, several blocks wide, and for n = 0."""
    rng = np.random.default_rng(k_states + chains)
    w = rng.dirichlet(np.full(k_states, 2.0), chains)
    w[rng.random((chains, k_states)) < dead] = 0.0
    w[:, 0] += 0.01
    p = jnp.asarray(w / w.sum(1, keepdims=True), jnp.float32)
    keys = jax.random.split(jax.random.key(k_states), chains)
    n = rng.integers(m // 2, m + 1, chains)
    n[0] = 0
    n = jnp.asarray(n, jnp.int32)

    def draws(small):
        return np.asarray(
            jax.jit(jax.vmap(lambda k, c, q: samplers.multinomial(k, c, q, small_program=small)))(
                keys, n, p
            )
        )

    full, small = draws(False), draws(True)
    np.testing.assert_array_equal(small, full)
    np.testing.assert_array_equal(small.sum(1), np.asarray(n))
    assert np.all(small[np.asarray(p) == 0] == 0)


def test_multinomial_in_scan():
    # The Wright–Fisher use: counts -> Multinomial(M, counts / M), vmapped, inside lax.scan.
    m, chains, k_states = 200, 64, 7

    def step(counts, gen):
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
            jax.random.fold_in(jax.random.key(10), gen), jnp.arange(chains)
        )
        new = jax.vmap(samplers.multinomial, in_axes=(0, None, 0))(keys, m, counts / m)
        return new, new

    counts0 = jnp.full((chains, k_states), m // k_states, jnp.int32).at[:, 0].add(m % k_states)
    _, trace = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(20)))(counts0)
    trace = np.asarray(trace)
    assert np.all(trace.sum(-1) == m)
    # A dead state stays dead.
    dead = trace[:-1] == 0
    assert np.all(trace[1:][dead] == 0)


# ------------------------------------------------------------------------------------------
# Hypergeometric
# ------------------------------------------------------------------------------------------

HYPER_GRID = [  # (sample, good, bad): item-by-item, HRUA, symmetric flips, large population
    (3, 5, 9),
    (9, 30, 20),
    (20, 30, 50),
    (60, 30, 50),
    (500, 300, 700),
    (2000, 10**6, 9 * 10**6),
]


@pytest.mark.parametrize(("n", "good", "bad"), HYPER_GRID)
def test_hypergeometric_chi_square(n, good, bad):
    size = 20000
    key = jax.random.fold_in(jax.random.key(11), n)
    x = np.asarray(samplers.hypergeometric(key, jnp.full((size,), n, jnp.int32), good, bad))
    dist = st.hypergeom(good + bad, good, n)
    assert x.min() >= max(0, n - bad) and x.max() <= min(n, good)
    ok, pval = chi_square_ok(x, dist.pmf(np.arange(min(n, good) + 1)))
    assert ok, f"Hypergeometric({n}; {good}, {bad}) chi-square p-value {pval:.2g}"


def test_hypergeometric_edge_cases():
    key = jax.random.key(12)
    n = jnp.array([0, 5, 5, 10, 12], jnp.int32)
    good = jnp.array([3, 0, 5, 4, 4], jnp.int32)
    bad = jnp.array([3, 7, 0, 6, 6], jnp.int32)
    x = np.asarray(samplers.hypergeometric(key, n, good, bad))
    np.testing.assert_array_equal(x, [0, 0, 5, 4, 4])  # n clipped to the population


def test_multivariate_hypergeometric_exact_small():
    counts, n, size = np.array([3, 0, 2, 4]), 4, 20000
    keys = jax.random.split(jax.random.key(13), size)
    draw = jax.jit(jax.vmap(samplers.multivariate_hypergeometric, in_axes=(0, None, None)))
    x = np.asarray(draw(keys, n, jnp.asarray(counts, jnp.int32)))
    assert np.all(x.sum(1) == n) and np.all(x <= counts) and np.all(x[:, 1] == 0)
    comps = sorted(
        {tuple(c) for c in itertools.product(*[range(c + 1) for c in counts]) if sum(c) == n}
    )
    index = {c: i for i, c in enumerate(comps)}
    cells = np.array([index[tuple(row)] for row in x])
    pmf = st.multivariate_hypergeom(counts, n).pmf(np.array(comps))
    ok, pval = chi_square_ok(cells, pmf)
    assert ok, pval


def test_multivariate_hypergeometric_large_moments():
    counts = np.array([4 * 10**6, 10**6, 0, 3 * 10**6, 2 * 10**6, 17])
    n, size = 10**4, 2000
    keys = jax.random.split(jax.random.key(14), size)
    draw = jax.jit(jax.vmap(samplers.multivariate_hypergeometric, in_axes=(0, None, None)))
    x = np.asarray(draw(keys, n, jnp.asarray(counts, jnp.int32)))
    assert np.all(x.sum(1) == n) and np.all(x <= counts)
    dist = st.multivariate_hypergeom(counts, n)
    se = np.sqrt(np.maximum(dist.var(), 1e-12) / size)
    assert np.all(np.abs(x.mean(0) - dist.mean()) <= 4 * se + 1e-9)
    # Over-request: n larger than the population takes everything.
    allx = samplers.multivariate_hypergeometric(keys[0], 10**8, jnp.asarray([5, 0, 7], jnp.int32))
    np.testing.assert_array_equal(np.asarray(allx), [5, 0, 7])
