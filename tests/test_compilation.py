"""The persistent compilation cache: on by default, results identical with it (cold and warm)
and without it, and switched off by the flag or the environment variable."""

import os
import subprocess
import sys

import numpy as np
import pytest

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


#: The discrete `counts` method: compiled with non-default XLA options (its emitters).
COUNTS = ("--method", "counts", "--states", "6", "--samples", "300")


def _cache_env(cache):
    """The environment of a run with the compilation cache on at ``cache``."""
    env = {k: v for k, v in os.environ.items() if k != "COLLAPSE_JAX_NO_CACHE"}
    env["COLLAPSE_JAX_CACHE_DIR"] = str(cache)
    return env


def _run(out, env, *extra):
    proc = subprocess.run(
        [*RUN, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return read_arrays(out / "metrics.npz")


def test_cache_gives_identical_results_cold_warm_and_off(tmp_path):
    cache = tmp_path / "xla"
    env = _cache_env(cache)
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


# --------------------------------------------------------------------------------------------
# The program store: compiled programs loaded without tracing


def test_program_store_cold_warm_off_identical_with_compiler_options(tmp_path):
    """The discrete `counts` method compiles with non-default XLA options (its emitters); a
    stored program loaded without them fails at its first call, so this is the case that
    checks the options travel with it. Cold, warm (every program loaded from the store, none
    compiled or added) and without any cache give the same arrays."""
    cache = tmp_path / "xla"
    env = _cache_env(cache)
    flags = COUNTS
    cold = _run(tmp_path / "cold", env, *flags)
    store = cache / compilation.PROGRAMS
    programs = sorted(store.iterdir())
    assert [p.name.split("-")[0] for p in programs] == ["chunk", "start"]
    stamps = {p: p.stat().st_mtime_ns for p in programs}
    os.utime(programs[0], ns=(0, 0)), os.utime(programs[1], ns=(0, 0))
    warm = _run(tmp_path / "warm", env, *flags)
    assert sorted(store.iterdir()) == programs  # nothing compiled anew
    assert all(p.stat().st_mtime_ns > 0 for p in programs)  # each was read and loaded
    off = _run(tmp_path / "off", env, *flags, "--no-cache")
    for name in cold:
        np.testing.assert_array_equal(cold[name], warm[name], err_msg=name)
        np.testing.assert_array_equal(cold[name], off[name], err_msg=name)
    assert stamps  # (the store held both programs after the cold run)


def test_program_store_filled_from_jax_cache(tmp_path):
    """A program missing from the store but held by JAX's own cache (the package's source
    changed, or the store's copy was evicted) is served by JAX's cache and then kept in the
    store. XLA:CPU serialises a program it loaded only in part (the copy is smaller and fails
    at its first call: "Function wrapped_iota not found"), so the store must keep the bytes
    JAX's cache holds: the next run loads that copy and gives the arrays of a run without any
    cache, and its files are the ones a cold run writes."""
    cache = tmp_path / "xla"
    env = _cache_env(cache)
    flags = COUNTS
    _run(tmp_path / "cold", env, *flags)
    store = cache / compilation.PROGRAMS
    cold = {p.name: p.read_bytes() for p in store.iterdir()}
    jax_entries = sorted(p.name for p in cache.iterdir() if p.is_file())
    for p in store.iterdir():
        p.unlink()
    _run(tmp_path / "from-jax-cache", env, *flags)  # JAX's cache serves both programs
    assert sorted(p.name for p in cache.iterdir() if p.is_file()) == jax_entries
    assert {p.name: p.read_bytes() for p in store.iterdir()} == cold
    warm = _run(tmp_path / "warm", env, *flags)  # loads the copies made from JAX's cache
    off = _run(tmp_path / "off", env, *flags, "--no-cache")
    for name in off:
        np.testing.assert_array_equal(warm[name], off[name], err_msg=name)


_RESERIALISE = """
import pickle, sys
from pathlib import Path
from collapse_jax.core import compilation
import jax
for name in sys.argv[1:]:
    path = Path(name)
    blob = path.read_bytes()
    options = pickle.loads(blob[len(compilation._MAGIC) + 64 :])[3]
    compilation._write(path, compilation._read(path), options)  # a loaded program, again
"""


def test_program_store_replaces_a_program_that_fails_to_run(tmp_path):
    """A stored program that loads but fails at its first call (here the incomplete copy XLA:CPU
    makes when it serialises a program it loaded, which failed with "Function wrapped_iota not
    found") is deleted, compiled again and kept; the run goes on and gives the arrays of a run
    without any cache, and the next run loads the new copy."""
    cache = tmp_path / "xla"
    env = _cache_env(cache)
    flags = COUNTS
    _run(tmp_path / "cold", env, *flags)
    store = cache / compilation.PROGRAMS
    cold = {p.name: p.stat().st_size for p in store.iterdir()}
    damage = [sys.executable, "-c", _RESERIALISE, *map(str, store.iterdir())]
    subprocess.run(damage, env=env, check=True, capture_output=True, timeout=600)
    damaged = {p.name: p.stat().st_size for p in store.iterdir()}
    assert damaged.keys() == cold.keys() and all(damaged[n] < cold[n] for n in cold), damaged
    warm = _run(tmp_path / "warm", env, *flags)
    kept = {p.name: p.read_bytes() for p in store.iterdir()}
    # compiled and kept again, whole (the payload's debug details may differ by a few bytes)
    assert kept.keys() == cold.keys() and all(len(kept[n]) > damaged[n] for n in cold)
    again = _run(tmp_path / "again", env, *flags)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == kept  # loaded and run as kept
    off = _run(tmp_path / "off", env, *flags, "--no-cache")
    for name in off:
        np.testing.assert_array_equal(warm[name], off[name], err_msg=name)
        np.testing.assert_array_equal(again[name], off[name], err_msg=name)


def _tiny_gaussian_family():
    import functools

    from collapse_jax.families.gaussian import d0 as gd0
    from collapse_jax.families.gaussian import kernel as proc

    d0 = gd0.make_d0("normal", 1)
    family = proc.make_family(d0, np.full(6, 30))
    reduce = functools.partial(proc.reduce_info, log_trace0=0.0)
    return family._replace(reduce=reduce)


def test_program_store_in_process(monkeypatch, tmp_path):
    """run_generations through the store: the first run compiles and keeps its programs, a
    second (in-process memo cleared) loads them and gives the same trace and state; a damaged
    file fails its checksum and is compiled again; an unkeyed family never touches the store."""
    import jax

    from collapse_jax.core.loop import run_generations

    monkeypatch.setattr(compilation, "_store_dir", lambda family: _store(family, tmp_path))
    monkeypatch.setattr(compilation, "_loaded", {})
    family = compilation.keyed(_tiny_gaussian_family(), "test", {"m": 30})
    assert family.cache_key is not None

    def run():
        compilation._loaded.clear()
        r = run_generations(family, jax.random.key(3), 16, np.full(6, 30), progress=False)
        return jax.tree.leaves((r.trace, r.state))

    before = dict(compilation.stats)
    first = run()
    assert compilation.stats["compiled"] - before["compiled"] == 2
    files = sorted(tmp_path.glob("*.bin"))
    assert len(files) == 2
    second = run()
    assert compilation.stats["loaded"] - before["loaded"] == 2
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    damaged = bytearray(files[0].read_bytes())
    damaged[-10] ^= 0xFF
    files[0].write_bytes(bytes(damaged))
    assert compilation._read(files[0]) is None  # fails its checksum
    third = run()
    assert compilation.stats["compiled"] - before["compiled"] == 3  # the damaged one again
    for a, b in zip(first, third, strict=True):
        np.testing.assert_array_equal(a, b)
    unkeyed = before["unkeyed"]
    r = run_generations(_tiny_gaussian_family(), jax.random.key(3), 16, np.full(6, 30))
    assert compilation.stats["unkeyed"] - unkeyed == 2 and len(list(tmp_path.glob("*.bin"))) == 2
    del r


def test_program_store_loads_the_next_program_ahead(monkeypatch, tmp_path):
    """Beside the store, a run notes which program it asked for after which; a warm run loads
    the noted one in a background thread while it runs the one before, and gives the same
    trace and state. A note naming a program the store does not hold, or not naming a program
    at all, is ignored (and a wrong note is corrected by the run that finds it wrong)."""
    import jax

    from collapse_jax.core.loop import run_generations

    store = tmp_path / "programs"
    monkeypatch.setattr(compilation, "_store_dir", lambda family: _store(family, store))
    monkeypatch.setattr(compilation, "_loaded", {})
    monkeypatch.setattr(compilation, "_pending", {})
    monkeypatch.setattr(compilation, "_last", [])
    family = compilation.keyed(_tiny_gaussian_family(), "test", {"m": 31})

    def run():  # as a new process would: nothing loaded, nothing asked for before
        compilation._loaded.clear()
        compilation._last.clear()
        r = run_generations(family, jax.random.key(3), 16, np.full(6, 30), progress=False)
        return jax.tree.leaves((r.trace, r.state))

    def counts():
        return compilation.stats["loaded"], compilation.stats["prefetched"]

    first = run()
    (start,), (chunk,) = store.glob("start-*.bin"), store.glob("chunk-*.bin")
    order = tmp_path / "programs-order"
    note = order / f"{start.stem}.next"
    assert [p.name for p in order.iterdir()] == [note.name]
    assert note.read_text() == chunk.name
    for text, ahead in [
        (chunk.name, 1),  # the chunk program loaded in the background
        ("chunk-" + "0" * 64 + ".bin", 0),  # not in the store
        ("../" + start.name, 0),  # not a program's name
    ]:
        note.write_text(text)
        loaded, prefetched = counts()
        again = run()
        assert counts() == (loaded + 2, prefetched + ahead), text
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)
        assert note.read_text() == chunk.name


def _store(family, root):
    """The store folder for a family that is (still) keyed, as `_store_dir` decides."""
    key = family.cache_key
    return root if key is not None and key[1] == compilation._field_ids(family) else None


def test_keyed_families(tmp_path):
    """What a key depends on: every part but the seed (runs with other seeds share programs),
    a file named by a part by its contents; a field replaced after keying unkeys the family,
    and a part that is not plain data (a function) leaves it unkeyed."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        p0: str = "uniform"
        samples: int = 10
        seed: int = 0

    family = _tiny_gaussian_family()

    def key(*parts):
        return compilation.keyed(family, "study", *parts).cache_key[0]

    assert key(Cfg()) == key(Cfg(seed=7))
    assert key(Cfg()) != key(Cfg(samples=11))
    assert key(Cfg(), ("samples", [1, 2])) != key(Cfg(), ("samples", [1, 3]))
    assert key(Cfg(), np.arange(3.0)) != key(Cfg(), np.arange(3.0) + 1e-12)
    path = tmp_path / "p0.npy"
    np.save(path, np.array([0.5, 0.5]))
    with_file = key(Cfg(p0=str(path)))
    np.save(path, np.array([0.4, 0.6]))
    assert key(Cfg(p0=str(path))) != with_file
    keyed = compilation.keyed(family, "study", Cfg())
    assert _store(keyed, tmp_path) == tmp_path
    assert _store(keyed._replace(reduce=lambda info: info), tmp_path) is None
    assert compilation.keyed(family, "study", Cfg(), print).cache_key is None


def _programs(cache):
    store = cache / compilation.PROGRAMS
    return {p.name: p.stat().st_mtime_ns for p in store.iterdir()} if store.is_dir() else {}


@pytest.mark.parametrize(
    "study, flags, shared",
    [
        ("discrete", ("--states", "4", "--samples", "20", "--chains", "8"), True),
        ("gaussian", ("--samples", "20", "--chains", "8", "--generations", "10"), True),
        # D0 a point set: its held-out split depends on the seed, so the programs (which close
        # over the training points) must not be shared between seeds
        ("gmm", ("--d0", "POINTS", "--samples", "40", "--chains", "4", "--generations", "3",
                 "--heldout", "20", "--w2-samples", "10", "--max-iter", "5"), False),
    ],
)  # fmt: skip
def test_program_store_across_seeds(tmp_path, study, flags, shared):
    """The seed is left out of a study's key: a run with another seed loads the programs of the
    first where they do not depend on it (and compiles its own where they do), and gives the
    arrays of that seed's run without any cache."""
    points = tmp_path / "points.npy"
    np.save(points, np.random.default_rng(0).normal(size=(120, 2)))
    flags = [str(points) if f == "POINTS" else f for f in flags]
    cache = tmp_path / "xla"
    env = _cache_env(cache)
    run = [sys.executable, "-m", "collapse_jax.cli", "run", study, *flags, "--no-progress"]

    def arrays(out, *extra):
        proc = subprocess.run(
            [*run, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr
        return read_arrays(out / "metrics.npz")

    arrays(tmp_path / "seed0", "--seed", "0")
    first = _programs(cache)
    assert first, "the first run kept no program"
    for name in first:
        os.utime(cache / compilation.PROGRAMS / name, ns=(0, 0))
    warm = arrays(tmp_path / "seed1", "--seed", "1")
    after = _programs(cache)
    if shared:
        assert after.keys() == first.keys() and all(after.values())  # all loaded, none added
    else:
        assert after.keys() > first.keys() and not any(after[n] for n in first)
    off = arrays(tmp_path / "off", "--seed", "1", "--no-cache")
    for name in off:
        np.testing.assert_array_equal(warm[name], off[name], err_msg=name)
