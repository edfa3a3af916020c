"""Pure-XLA small linear algebra: agreement with LAPACK, and no LAPACK call in any chain kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax.core.loop import GenInput
from collapse_jax.core.policies import Policy
from collapse_jax.families.gaussian import d0 as gd0
from collapse_jax.families.gaussian import kernel as gproc
from collapse_jax.families.gmm import kernel as mproc
from collapse_jax.families.gmm import study as gmm_study
from collapse_jax.numerics import linalg

DIMS = [1, 2, 3, 7, 10, 17, 24]  # 17 and 24 take the fori_loop path (> 16)


def _rotation(rng, batch, d):
    return np.linalg.qr(rng.normal(size=(batch, d, d)))[0]


@pytest.mark.parametrize("d", DIMS)
def test_cholesky_and_solve_match_lapack(d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(6, d, d))
    spd = a @ np.swapaxes(a, -1, -2) + 1e-2 * np.eye(d)
    with jax.enable_x64(True):
        chol = np.asarray(jax.jit(linalg.cholesky)(spd))
        ref = np.linalg.cholesky(spd)
        np.testing.assert_allclose(chol, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
        b = rng.normal(size=(6, d, 3))
        x = np.asarray(jax.jit(linalg.solve_lower)(ref, b))
        np.testing.assert_allclose(x, np.linalg.solve(ref, b), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("d", DIMS)
def test_cho_solve_matches_lapack(d):
    rng = np.random.default_rng(100 + d)
    a = rng.normal(size=(4, d, d))
    spd = a @ np.swapaxes(a, -1, -2) + 1e-1 * np.eye(d)
    b = rng.normal(size=(4, d, 2))
    with jax.enable_x64(True):
        x = np.asarray(jax.jit(lambda m, v: linalg.cho_solve(linalg.cholesky(m), v))(spd, b))
    ref = np.linalg.solve(spd, b)
    # backward-stable solves: error ≲ cond(A)·ε relative to the solution's size
    cond = np.linalg.cond(spd).max()
    np.testing.assert_allclose(x, ref, rtol=0, atol=100 * cond * 2.2e-16 * np.abs(ref).max())


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("rows", ["tall", "short"])
def test_gram_eigh_matches_lapack(d, rows):
    """Eigenvalues of xᵀx within 1e-12 of the largest (float64) against LAPACK's ``eigh``;
    the eigenvectors orthonormal and reconstructing xᵀx; rank-deficient x (fewer rows than
    columns) gives the zero eigenvalues too."""
    rng = np.random.default_rng(200 + d)
    m = 3 * d + 2 if rows == "tall" else max(1, d // 2)
    x = rng.normal(size=(5, m, d)) * np.arange(1, d + 1) ** -1.0
    with jax.enable_x64(True):
        lam, vec = (np.asarray(v) for v in jax.jit(linalg.gram_eigh)(x))
    g = np.swapaxes(x, -1, -2) @ x
    ref = np.linalg.eigvalsh(g)
    top = ref.max(-1, keepdims=True)
    np.testing.assert_allclose(lam, ref, rtol=0, atol=1e-12 * top.max())
    eye = np.broadcast_to(np.eye(d), vec.shape)
    np.testing.assert_allclose(np.swapaxes(vec, -1, -2) @ vec, eye, atol=1e-12)
    np.testing.assert_allclose(
        (vec * lam[:, None, :]) @ np.swapaxes(vec, -1, -2), g, atol=1e-12 * top.max()
    )


def test_cholesky_of_indefinite_matrix_is_all_nan():
    bad = jnp.asarray([[1.0, 2.0], [2.0, 1.0]])
    assert np.isnan(np.asarray(linalg.cholesky(bad))).all()
    big = jnp.eye(20).at[19, 19].set(-1.0)  # fori_loop path
    assert np.isnan(np.asarray(linalg.cholesky(big))).all()


@pytest.mark.parametrize("d", DIMS)
def test_singular_values_within_machine_precision_of_the_largest(d):
    """Matrices U diag(s) Vᵀ with known s spread over 13 decades (odd d pads a zero column):
    every singular value within 1e-13 · s_max, the backward-stable bound for a general matrix
    (relative accuracy of the small ones holds only for graded matrices: next test)."""
    rng = np.random.default_rng(100 + d)
    s = np.exp(rng.uniform(-30.0, 0.0, size=(8, d)))
    a = (_rotation(rng, 8, d) * s[:, None, :]) @ np.swapaxes(_rotation(rng, 8, d), -1, -2)
    with jax.enable_x64(True):
        sv = np.sort(np.asarray(jax.jit(linalg.singular_values)(a)), -1)
        nuc = np.asarray(jax.jit(linalg.nuclear_norm)(a))
    want = np.sort(s, -1)
    np.testing.assert_allclose(sv, want, rtol=0, atol=1e-13 * want.max())
    np.testing.assert_allclose(nuc, s.sum(-1), rtol=1e-13)


def test_singular_values_of_graded_matrix_keep_relative_accuracy():
    """B·D with B well conditioned and D spanning 1 .. 1e-120 (a late, nearly collapsed chain).

    Π_i s_i = |det B| Π_i D_i exactly, so the log-sum of the computed singular values checks
    the tiny ones to relative precision (an absolute-accuracy SVD would miss by many decades).
    """
    rng = np.random.default_rng(7)
    for d in (2, 5, 6):
        b = np.eye(d) + 0.1 * rng.normal(size=(d, d))
        log_scales = -np.linspace(0.0, 120.0, d) * np.log(10.0)
        with jax.enable_x64(True):
            sv = np.asarray(linalg.singular_values(b * np.exp(log_scales)[None, :]))
        want = np.linalg.slogdet(b)[1] + log_scales.sum()
        assert abs(np.log(sv).sum() - want) < 1e-10 * d


def test_singular_values_of_zero_and_float32():
    assert np.all(np.asarray(linalg.singular_values(jnp.zeros((3, 4, 4)))) == 0)
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 5)).astype(np.float32)
    sv = np.sort(np.asarray(linalg.singular_values(jnp.asarray(a))))
    np.testing.assert_allclose(sv, np.sort(np.linalg.svd(a, compute_uv=False)), rtol=1e-5)


def _lowered_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize(
    "sampler,policy",
    [("sufficient", "replace"), ("samples", "replace"), ("sufficient", "accumulate")],
)
def test_gaussian_chain_kernels_have_no_lapack_call(sampler, policy):
    d0 = gd0.make_d0("normal", 4)
    family = gproc.make_family(d0, np.full(5, 20), sampler=sampler, policy=Policy.parse(policy))
    keys = jax.random.split(jax.random.key(0), 8)
    x0 = GenInput(jnp.int32(0), jnp.int32(20), jnp.bool_(True))
    vinit = jax.vmap(family.init, (0, None, None))
    state, _ = jax.eval_shape(vinit, keys, None, x0)
    x = GenInput(jnp.int32(1), jnp.int32(20), jnp.bool_(True))
    text = _lowered_text(jax.vmap(family.step, (0, 0, None, None)), keys, state, None, x)
    assert "lapack" not in text
    assert "lapack" not in _lowered_text(vinit, keys, None, x0)


def test_gmm_chain_kernels_have_no_lapack_call():
    config = gmm_study.Config(chains=8, generations=3, samples=50, components=2)
    d0, _, sizes, spec = gmm_study.setup(config)
    family = mproc.make_family(spec, d0)
    keys = jax.random.split(jax.random.key(0), 8)
    x0 = GenInput(jnp.int32(0), jnp.int32(sizes[0]), jnp.bool_(True))
    state, _ = jax.eval_shape(jax.vmap(family.init, (0, None, None)), keys, None, x0)
    x = GenInput(jnp.int32(1), jnp.int32(sizes[1]), jnp.bool_(True))
    text = _lowered_text(jax.vmap(family.step, (0, 0, None, None)), keys, state, None, x)
    assert "lapack" not in text


def _regression_family(**changes):
    from collapse_jax.families.regression import kernel as rproc
    from collapse_jax.families.regression import study as rstudy

    config = rstudy.Config(dim=5, samples=20, chains=8, generations=3, **changes)
    spec, sampler, sizes, _ = rstudy.setup(config)
    return rproc.make_family(spec, sampler), sizes


def _kde_family():
    from collapse_jax.families.kde import kernel as kproc
    from collapse_jax.families.kde import study as kstudy

    dataset, _, sizes, spec = kstudy.setup(kstudy.Config(chains=8, generations=3, samples=20))
    return kproc.make_family(spec, dataset), sizes


@pytest.mark.parametrize(
    "make",
    [
        lambda: _regression_family(sampler="sufficient", design="fixed"),
        lambda: _regression_family(sampler="sufficient", design="fresh"),
        lambda: _regression_family(sampler="samples", design="fixed"),
        lambda: _regression_family(sampler="samples", design="fresh", ridge=1.0),
        _kde_family,
    ],
    ids=[
        "regression-sufficient-fixed",
        "regression-sufficient-fresh",
        "regression-samples-fixed",
        "regression-samples-fresh-ridge",
        "kde",
    ],
)
def test_regression_and_kde_chain_kernels_have_no_lapack_call(make):
    """Batched LAPACK under chain sharding stalls (module docstring of numerics/linalg.py):
    the regression and KDE kernels, like the Gaussian and GMM ones, emit none."""
    family, sizes = make()
    keys = jax.random.split(jax.random.key(0), 8)
    x0 = GenInput(jnp.int32(0), jnp.int32(sizes[0]), jnp.bool_(True))
    vinit = jax.vmap(family.init, (0, None, None))
    state, _ = jax.eval_shape(vinit, keys, None, x0)
    x = GenInput(jnp.int32(1), jnp.int32(sizes[1]), jnp.bool_(True))
    assert "lapack" not in _lowered_text(vinit, keys, None, x0)
    assert "lapack" not in _lowered_text(
        jax.vmap(family.step, (0, 0, None, None)), keys, state, None, x
    )


def test_two_host_devices_gaussian_d10_finishes(tmp_path):
    """The run that used to stall (batched LAPACK on 2 host devices) now finishes."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [
        sys.executable,
        "-m",
        "collapse_jax.cli",
        "run",
        "gaussian",
        "--dim",
        "10",
        "--chains",
        "200",
        "--generations",
        "20",
        "--samples",
        "50",
        "--out",
        str(tmp_path / "run"),
    ]
    for _ in range(2):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "report.md").exists()
