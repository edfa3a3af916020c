"""Random numbers for the per-chain kernels: one unrolled Threefry-2x32 block function, words
and open-interval uniforms from a key, normals by inverse CDF, exact log-Gamma draws, and
``jax.random``'s own normal / uniform / Bernoulli / categorical draws made flat (the same
numbers, a shorter compile).

Every kernel that draws its bulk randomness itself uses :func:`threefry2x32` from here (the
count samplers in :mod:`collapse_jax.numerics.samplers`, the Gaussian family's sufficient
statistics), so there is one copy of the generator.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from collapse_jax.numerics.lanes import lanewise

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def seed_key(seed: int) -> jax.Array:
    """``jax.random.key(seed)``, built on the host: the same key (Threefry's seed words are
    ``[seed >> 32, seed & 0xFFFFFFFF]``) without the two small programs that function runs,
    each a trace, a lowering and a cache lookup at every start of a run. Other seeds, or
    another default PRNG implementation, go to ``jax.random.key``."""
    if jax.config.jax_default_prng_impl != "threefry2x32" or not 0 <= seed < 2**31:
        return jax.random.key(seed)
    return jax.random.wrap_key_data(np.array([0, seed], np.uint32), impl="threefry2x32")


def _rotl(x: Array, r: int) -> Array:
    return lax.bitwise_or(
        lax.shift_left(x, lax.full(x.shape, r, jnp.uint32)),
        lax.shift_right_logical(x, lax.full(x.shape, 32 - r, jnp.uint32)),
    )


def threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 block function with 20 rounds (Salmon et al. 2011, the Random123
    reference; the same function as ``jax.random``'s ``threefry2x32_p``), unrolled.

    Written out so that XLA fuses it with the arithmetic that consumes the words: JAX lowers
    Threefry on CPU as a rolled loop (one small kernel per iteration), which dominates the cost
    of a cheap generation. The arguments are broadcast to one uint32 shape.
    """
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in (k0, k1, x0, x1)))
    k0, k1, x0, x1 = (jnp.broadcast_to(jnp.asarray(a, jnp.uint32), shape) for a in (k0, k1, x0, x1))
    return _block(k0, k1, x0, x1)


@jax.jit
def _block(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    """:func:`threefry2x32` on four uint32 arrays of one shape, in ``lax`` operations.

    A jitted function of its own, in ``lax`` rather than ``jnp`` operations: a study's program
    holds dozens of blocks, and each was traced op by op (over a hundred operations) at every
    call site and again at every lowering of ``jax.random``'s primitive; now a shape is traced
    once per process, and XLA inlines the call (the same operations after optimisation, the
    same words). The Gaussian run's chunk (10,000 chains) traced in 0.48-0.59 s instead of
    0.85-0.91 s and lowered in 0.27 s instead of 0.40-0.44 s."""

    def const(v):
        return lax.full(k0.shape, v, jnp.uint32)

    k2 = lax.bitwise_xor(lax.bitwise_xor(k0, k1), const(0x1BD11BDA))
    ks = (k0, k1, k2)
    x0 = lax.add(x0, k0)
    x1 = lax.add(x1, k1)
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = lax.add(x0, x1)
            x1 = lax.bitwise_xor(_rotl(x1, r), x0)
        x0 = lax.add(x0, ks[(i + 1) % 3])
        x1 = lax.add(lax.add(x1, ks[(i + 2) % 3]), const(i + 1))
    return x0, x1


def _materialized(words):
    """``words`` (a key's words), computed before the Threefry block that reads them.

    XLA:CPU expands the barrier before it fuses, so in a small program (10,000 keys split,
    folded and drawn from) the optimised program is the same with or without it. In a study's
    program it is not: the Gaussian run's start (10,000 chains) compiled in 0.75-0.78 s with
    the barrier and 1.30-1.60 s without, to a different optimised program. A key is a few words
    per chain, so keeping it in memory costs nothing measurable."""
    return jax.lax.optimization_barrier(words)


def _unrolled_lowering_on_cpu() -> None:
    """Make ``jax.random`` lower its Threefry block on CPU with :func:`threefry2x32` (unrolled)
    instead of JAX's CPU rule, a rolled loop of five iterations.

    The block function is the same, so every key and every draw is the same bit for bit
    (tested against JAX's own lowering); only the compiled program changes. A rolled loop is a
    while loop that XLA can neither fuse with the ops around it nor compile away; a study's
    programs hold one per key split and per ``jax.random`` draw. 10,000 chains drawing 1,000
    normals each: 60 instead of 214 ms to run, 0.16 instead of 0.37 s to compile (uniforms: 35
    against 211 ms); a split into 4 keys per chain: 0.3 against 1.3 ms, 0.32 against 0.58 s.
    JAX itself lowers Threefry unrolled on every other platform. ``COLLAPSE_JAX_ROLLED_THREEFRY=1``
    keeps JAX's rule (for comparisons). The primitive and the registration are JAX's public
    ``jax.extend`` / ``jax.interpreters.mlir`` API; should they move, JAX's rule stays."""
    if os.environ.get("COLLAPSE_JAX_ROLLED_THREEFRY", "") not in ("", "0"):
        return
    try:
        from jax.extend.random import threefry2x32_p
        from jax.interpreters import mlir
    except ImportError:  # pragma: no cover - another JAX: its own lowering, the same numbers
        return

    def block(k0, k1, x0, x1):
        return threefry2x32(*_materialized((k0, k1)), x0, x1)

    mlir.register_lowering(
        threefry2x32_p, mlir.lower_fun(block, multiple_results=True), platform="cpu"
    )


_unrolled_lowering_on_cpu()


def _is_threefry(key) -> bool:
    """Whether ``key`` is a typed Threefry-2x32 key (the default implementation)."""
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and (
        str(jax.random.key_impl(key)) == "threefry2x32"
    )


def fold_in(key: jax.Array, data) -> jax.Array:
    """``jax.random.fold_in(key, data)`` for one key and a scalar ``data``, the same key.

    For a Threefry key, folding in ``data`` is one Threefry-2x32 block at the counter
    (0, uint32(data)); written out here because JAX lowers Threefry on CPU as a rolled loop
    that XLA cannot fuse with anything: the run loop folds the generation into every chain's
    key at every generation, and this took 17.6 ns per chain against 4.0 ns unrolled (10,000
    keys, 2-core CPU). Other key implementations go to ``jax.random.fold_in``. (Since the
    lowering of :func:`_unrolled_lowering_on_cpu`, JAX's own function is unrolled on CPU too;
    this one predates it and keeps JAX's rule out of the run loop when that is switched off.)
    """
    if not _is_threefry(key) or key.shape:
        return jax.random.fold_in(key, data)
    kd = _materialized(jax.random.key_data(key))
    y0, y1 = threefry2x32(kd[0], kd[1], jnp.uint32(0), jnp.asarray(data).astype(jnp.uint32))
    return jax.random.wrap_key_data(jnp.stack([y0, y1]), impl="threefry2x32")


def key_bits(key: jax.Array) -> tuple[Array, Array]:
    """``jax.random.bits(key, (2,), jnp.uint32)`` as two words, for one key of any kind.

    For a Threefry key with ``jax_threefry_partitionable`` on (JAX's default), word i is
    ``y0 ^ y1`` of the block at counter (0, i), written out for the reason given in
    :func:`fold_in`; otherwise JAX's own function.
    """
    if not _is_threefry(key) or key.shape or not jax.config.jax_threefry_partitionable:
        w = jax.random.bits(key, (2,), jnp.uint32)
        return w[0], w[1]
    kd = _materialized(jax.random.key_data(key))
    y0, y1 = threefry2x32(kd[0], kd[1], jnp.zeros(2, jnp.uint32), jnp.arange(2, dtype=jnp.uint32))
    w = y0 ^ y1
    return w[0], w[1]


def _key_words(key: jax.Array) -> tuple[Array, Array]:
    """The two Threefry seed words of a key (other implementations fold their extra words in)."""
    kd = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    k0, k1 = kd[0], kd[1]
    for j in range(2, kd.shape[0]):
        k0, k1 = (k1, k0 ^ kd[j]) if j % 2 else (k0 ^ kd[j], k1)
    return k0, k1


def random_words(key: jax.Array, n: int, stream=0) -> Int[Array, " n"]:
    """``n`` random uint32 words: Threefry-2x32 keyed by ``key`` at counters (j, stream).

    Different ``stream`` values give independent words (distinct counter blocks under the same
    key); the step uses stream 0 for its draws and stream i + 1 for the i-th rejection round.
    """
    k0, k1 = _key_words(key)
    blocks = (n + 1) // 2
    x0 = jnp.arange(blocks, dtype=jnp.uint32)
    x1 = jnp.full((blocks,), stream, jnp.uint32)
    y0, y1 = threefry2x32(k0, k1, x0, x1)
    return jnp.concatenate([y0, y1])[:n]


def uniforms(key: jax.Array, n: int, dtype, stream=0) -> Float[Array, " n"]:
    """``n`` uniforms on the open interval (0, 1) from :func:`random_words`.

    Uniforms take the top mantissa bits of each word (23 for float32 from one 32-bit word, 52
    for float64 from two) plus half a unit in the last place, so 0 and 1 never occur.
    """
    if _wide(dtype):
        w = random_words(key, 2 * n, stream)
        return _unit64(w[:n], w[n:])
    return _unit32(random_words(key, n, stream)).astype(dtype)


def _wide(dtype) -> bool:
    """Whether uniforms of ``dtype`` take 52 bits from two words (float64 under x64)."""
    return jnp.dtype(dtype) == jnp.float64 and bool(jax.config.jax_enable_x64)


def _unit64(hi: Array, lo: Array) -> Array:
    """A float64 uniform on (0, 1) from the top 52 bits of the 64-bit word (hi, lo)."""
    bits = (hi.astype(jnp.uint64) << np.uint64(32)) | lo.astype(jnp.uint64)
    mant = (bits >> np.uint64(12)) | np.uint64(0x3FF0000000000000)
    return jax.lax.bitcast_convert_type(mant, jnp.float64) - (1.0 - 2.0**-53)


def _unit32(w: Array) -> Array:
    """A float32 uniform on (0, 1) from the top 23 bits of a word."""
    mant = (w >> np.uint32(9)) | np.uint32(0x3F800000)
    return jax.lax.bitcast_convert_type(mant, jnp.float32) - (1.0 - 2.0**-24)


def normal_from_uniform(u: Float[Array, "..."]) -> Float[Array, "..."]:
    """Φ⁻¹(u) = √2 erf⁻¹(2u − 1) (inverse-CDF transform, as ``jax.random.normal`` does)."""
    return jnp.sqrt(jnp.asarray(2.0, u.dtype)) * jax.lax.erf_inv(2.0 * u - 1.0)


def _mt_propose(u_norm, u_acc, d, c):
    """One Marsaglia–Tsang proposal: (accepted?, log v)."""
    x = normal_from_uniform(u_norm)
    v = 1.0 + c * x
    v = v * v * v
    pos = v > 0
    lv = jnp.log(jnp.where(pos, v, 1.0))
    x2 = x * x
    ok = pos & ((u_acc < 1.0 - 0.0331 * x2 * x2) | (jnp.log(u_acc) < 0.5 * x2 + d * (1.0 - v + lv)))
    return ok, lv


def _accepted_or_nan(ok, lv):
    return jnp.where(ok, lv, jnp.nan)


@lanewise
def _retry_lanes(k0, k1, c_norm, c_acc, d, c, lv):
    """Lanes holding NaN (a rejected first proposal) propose again until accepted, one lane at
    a time (lane i's r-th retry uses stream r of its key, so the draws are those of a loop over
    every lane). Under ``vmap`` the batch is flattened first: at 10,000 chains and shape 500 a
    generation has 0.6 rejected lanes on average, and the retry round over the whole batch that
    ran in about half of all generations made the vmapped Gaussian draw-and-update 49.3 ns per
    chain-generation against 41.9 ns this way.
    """

    def one_lane(lv):
        i = jnp.argmax(jnp.isnan(lv))
        kk0, kk1, cn, ca, dd, cc = (x[i] for x in (k0, k1, c_norm, c_acc, d, c))

        def retry(carry):
            _, stream = carry
            if dd.dtype == jnp.float64:
                u_norm = _unit64(*threefry2x32(kk0, kk1, cn, stream))
                u_acc = _unit64(*threefry2x32(kk0, kk1, ca, stream))
            else:  # both words of one block
                w0, w1 = threefry2x32(kk0, kk1, cn, stream)
                u_norm, u_acc = _unit32(w0).astype(dd.dtype), _unit32(w1).astype(dd.dtype)
            return _accepted_or_nan(*_mt_propose(u_norm, u_acc, dd, cc)), stream + jnp.uint32(1)

        start = (jnp.asarray(jnp.nan, lv.dtype), jnp.uint32(1))
        value, _ = jax.lax.while_loop(lambda carry: jnp.isnan(carry[0]), retry, start)
        return lv.at[i].set(value)

    return jax.lax.while_loop(lambda lv: jnp.any(jnp.isnan(lv)), one_lane, lv)


def log_gamma_from_uniforms(
    u: Float[Array, "k n"], key: jax.Array, a: Float[Array, " n"], *, boost: bool = True
) -> Float[Array, " n"]:
    """log of Gamma(a, 1) draws (a > 0), exact, given the first proposal's uniforms.

    Marsaglia & Tsang (2000) rejection sampling: with d = a − 1/3, c = 1/√(9d), x ~ N(0, 1),
    v = (1 + c x)³ and u ~ U(0, 1), accept d·v when v > 0 and log u < x²/2 + d − d v + d log v
    (the squeeze u < 1 − 0.0331 x⁴ skips the logarithms). ``u[0]``, ``u[1]`` drive the first
    proposal (drawn from ``uniforms(key, ·)``, stream 0); rejected lanes (rate ≈ 6e-5 at a = 500,
    ≈ 5% at a = 1) draw again in a loop from streams 1, 2, ... of the same key. Shapes a < 1 use Gamma(a) = Gamma(a + 1) · U^{1/a} with ``u[2]`` (``boost``, static;
    leave it on unless every a >= 1); the result is a logarithm so tiny shapes do not underflow.

    Written here rather than calling ``jax.random.gamma``/``loggamma``, which split keys inside
    their rejection loop: drawing the first proposal together with the generation's other
    words is several times faster under vmap, and the distribution is exactly the same.
    """
    a = jnp.asarray(a)
    dtype = a.dtype
    aa = jnp.where(a < 1, a + 1, a) if boost else a
    d = aa - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    # A rejected lane carries NaN in place of its value (log v of an accepted proposal is
    # finite), so the first proposal is one elementwise computation feeding both the loop's test
    # and the result: with a separate accept flag XLA computed the proposal twice (once per
    # consumer): 64.6 against 49.3 ns per chain-generation for the vmapped Gaussian draw-and-
    # update at 10,000 chains.
    lv = _accepted_or_nan(*_mt_propose(u[0], u[1], d, c))
    # Rejected lanes propose again from streams 1, 2, ... of their key: shape j's proposal uses
    # uniforms j and n + j of ``uniforms(key, 2 n, stream)``, the words of counter (j, stream)
    # (float32: both words of that block; float64: blocks j and n + j).
    n = a.shape[0]
    k0, k1 = _key_words(key)
    j = jnp.arange(n, dtype=jnp.uint32)
    seed = (jnp.broadcast_to(k0, (n,)), jnp.broadcast_to(k1, (n,)))
    lv = _retry_lanes(*seed, j, j + jnp.uint32(n) if _wide(dtype) else j, d, c, lv)
    out = jnp.log(d) + lv
    if boost:
        out = out + jnp.where(a < 1, jnp.log(u[2]) / jnp.where(a < 1, a, 1.0), 0.0)
    return out


def log_gamma(key: jax.Array, a: Float[Array, " n"], *, boost: bool = True) -> Float[Array, " n"]:
    """log of Gamma(a, 1) draws for a vector of shapes a > 0 (see :func:`log_gamma_from_uniforms`)."""
    a = jnp.atleast_1d(jnp.asarray(a))
    n = a.shape[0]
    u = uniforms(key, 3 * n, a.dtype)
    return log_gamma_from_uniforms(u.reshape(3, n), key, a, boost=boost)


# --------------------------------------------------------------------------------------------
# jax.random's own draws, made flat: the same numbers, a fraction of the compile time
# --------------------------------------------------------------------------------------------
#
# ``jax.random`` numbers an array's Threefry counters by the element's flat (row-major) index,
# with the partitionable setting on or off, and ``normal``, ``uniform``, ``bernoulli`` and the
# Gumbel noise of ``categorical`` are elementwise functions of those bits; so a flat draw
# reshaped is the same array, bit for bit (tested). But XLA:CPU compiles the counter arithmetic
# JAX emits for a three-dimensional draw (a two-dimensional one under ``vmap`` over chains) in
# about 3 s, against 0.4 s flat, and runs it slower: 2,048 chains of 40 × 10 normals, 3.2
# against 0.44 s to compile, 27 against 23 ms to run. A study's start and chunk programs held
# several such draws.


def _flat_shape(shape) -> tuple[int, ...]:
    return (int(np.prod(shape, dtype=np.int64)),)


def jax_normal(key: jax.Array, shape, dtype=float) -> Array:
    """``jax.random.normal(key, shape, dtype)``, drawn flat."""
    shape = tuple(shape)
    return jax.random.normal(key, _flat_shape(shape), dtype).reshape(shape)


def jax_uniform(key: jax.Array, shape, dtype=float, minval=0.0, maxval=1.0) -> Array:
    """``jax.random.uniform(key, shape, dtype, minval, maxval)`` (scalar bounds), drawn flat."""
    shape = tuple(shape)
    return jax.random.uniform(key, _flat_shape(shape), dtype, minval, maxval).reshape(shape)


def jax_bernoulli(key: jax.Array, p, shape=None) -> Array:
    """``jax.random.bernoulli(key, p, shape)``, drawn flat (``p`` broadcast to ``shape``)."""
    p = jnp.asarray(p)
    shape = p.shape if shape is None else tuple(shape)
    p = jnp.broadcast_to(p, shape).reshape(_flat_shape(shape))
    return jax.random.bernoulli(key, p).reshape(shape)


def jax_categorical(key: jax.Array, logits, shape) -> Array:
    """``jax.random.categorical(key, logits, shape=shape)`` (last axis, with replacement, the
    default mode): the argmax of ``logits`` plus Gumbel noise of shape ``shape + (K,)``, that
    noise drawn flat."""
    logits = jnp.asarray(logits)
    shape = tuple(shape)
    batch = logits.shape[:-1]
    if shape[len(shape) - len(batch) :] != batch:
        raise ValueError(f"shape {shape} must end with the logits' batch shape {batch}")
    full = (*shape, logits.shape[-1])
    noise = jax.random.gumbel(key, _flat_shape(full), logits.dtype).reshape(full)
    prefix = tuple(range(len(shape) - len(batch)))
    scores = noise + jax.lax.expand_dims(logits, prefix)
    if logits.shape[-1] <= _COMPARE_ARGMAX_MAX:
        return argmax_by_comparisons(scores)
    return jnp.argmax(scores, axis=-1)


#: :func:`jax_categorical` takes the argmax of up to this many classes by comparisons.
_COMPARE_ARGMAX_MAX = 16


def argmax_by_comparisons(v: Array) -> Array:
    """``argmax(v, axis=-1)`` (the first maximum; the first NaN if there is one, as NumPy's: on
    an H200 ``jnp.argmax`` returned a later NaN in rows holding several) as a chain of
    elementwise comparisons, one per class, in ``jnp.argmax``'s integer type.

    With the Threefry block unrolled on CPU, XLA fuses the random bits, the Gumbel noise and
    ``argmax``'s reduction into one reduce loop, which it does not vectorise: 512 chains x 200
    draws from 4 classes took 14 ms, against 3.3 ms under JAX's rolled rule. The comparisons
    fuse into an elementwise loop instead: 1.2 ms, the same indices (tested)."""
    best = v[..., 0]
    index = jnp.zeros(best.shape, int)  # argmax's integer type (int64 under x64)
    for j in range(1, v.shape[-1]):
        take = (v[..., j] > best) | (jnp.isnan(v[..., j]) & ~jnp.isnan(best))
        best = jnp.where(take, v[..., j], best)
        index = jnp.where(take, j, index)
    return index
