"""The persistent compilation cache: on by default, results identical with it (cold and warm)
and without it, and switched off by the flag or the environment variable."""

import os
import subprocess
import sys

import numpy as np

from collapse_jax.core import compilation
from collapse_jax.core.runs import read_arrays

RUN = [
    sys.executable,
    "-m",
    "collapse_jax.cli",
    "run",
    "discrete",
    "--states",
    "4",
    "--samples",
    "20",
    "--chains",
    "8",
    "--generations",
    "20",
    "--no-progress",
]


def _run(out, env, *extra):
    proc = subprocess.run(
        [*RUN, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return read_arrays(out / "metrics.npz")


def test_cache_gives_identical_results_cold_warm_and_off(tmp_path):
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k != "COLLAPSE_JAX_NO_CACHE"}
    env["COLLAPSE_JAX_CACHE_DIR"] = str(cache)
    cold = _run(tmp_path / "cold", env)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run wrote no compiled program to the cache"
    warm = _run(tmp_path / "warm", env)
    assert sorted(p.name for p in cache.iterdir()) == entries  # all reused, none added
    off = _run(tmp_path / "off", env, "--no-cache")
    for name in cold:
        np.testing.assert_array_equal(cold[name], warm[name], err_msg=name)
        np.testing.assert_array_equal(cold[name], off[name], err_msg=name)


def test_cache_location_and_switch(monkeypatch, tmp_path):
    monkeypatch.delenv("COLLAPSE_JAX_NO_CACHE", raising=False)
    monkeypatch.setenv("COLLAPSE_JAX_CACHE_DIR", str(tmp_path / "c"))
    assert compilation.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("COLLAPSE_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.cache_dir().parent == tmp_path / "xdg" / "collapse_jax" / "xla"
    monkeypatch.setenv("COLLAPSE_JAX_NO_CACHE", "1")
    enable = getattr(compilation.enable, "real", compilation.enable)  # conftest patches it
    assert compilation.cache_dir() is None and enable() is None


def test_shared_cache_is_locked(tmp_path):
    """JAX writes a cache entry in place; with the size budget `enable` sets, it takes a file
    lock around every read and write, so concurrent runs never read a half-written entry. A
    process that compiles through the enabled cache holds the budget and leaves the lock file."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from collapse_jax.core import compilation\n"
        "path = compilation.enable()\n"
        "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n"
        "print(jax.config.jax_compilation_cache_max_size, path)\n"
    )
    env = {**os.environ, "COLLAPSE_JAX_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("COLLAPSE_JAX_NO_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    size, path = out.stdout.split()
    assert int(size) == compilation.MAX_CACHE_BYTES and path == str(tmp_path / "cache")
    assert (tmp_path / "cache" / ".lockfile").exists()
    assert any(p.name.endswith("-cache") for p in (tmp_path / "cache").iterdir())


def test_entries_without_access_time_are_repaired(tmp_path):
    """A cache written without a size budget (earlier versions) or by a process killed between
    JAX's two writes holds entries with no ``-atime`` record; JAX's eviction then fails on
    every write ("Error writing persistent compilation cache entry") and caches nothing more.
    `enable` gives each such entry a record, and a process compiling afterwards writes its
    programs without a warning."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "jit_old-0123abcd-cache").write_bytes(b"an old entry")
    code = (
        "import jax, jax.numpy as jnp\n"
        "from collapse_jax.core import compilation\n"
        "compilation.enable()\n"
        "jax.jit(lambda x: jnp.cos(x) + 1)(jnp.ones(3)).block_until_ready()\n"
    )
    env = {**os.environ, "COLLAPSE_JAX_CACHE_DIR": str(cache)}
    env.pop("COLLAPSE_JAX_NO_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "Error writing persistent compilation cache entry" not in out.stderr, out.stderr
    assert (cache / "jit_old-0123abcd-atime").exists()
    new = [p for p in cache.glob("*-cache") if not p.name.startswith("jit_old")]
    assert new and all((cache / (p.name[: -len("-cache")] + "-atime")).exists() for p in new)
    assert compilation.repair(cache) == 0  # nothing left to repair
