"""The persistent XLA compilation cache, on by default for the CLI and the Python API.

A second run of the same study reuses the compiled programs of the first instead of compiling
them again. The cache lives under the user's cache directory (``$XDG_CACHE_HOME`` or
``~/.cache``), in a folder per machine type (compiled CPU code depends on the processor's
features), and is JAX's own persistent cache: entries are keyed by the program, the compiler
options and the JAX/XLA versions, and a cached program is the one XLA would compile (results are
identical with and without the cache; tested). JAX 0.10 writes an entry in place, not
atomically: without a size budget another process can read a half-written entry, and
deserialising it crashed a test worker (segmentation fault). With a budget
(:data:`MAX_CACHE_BYTES`) JAX takes a file lock around every read and write (and evicts the least
recently used entries beyond it), so runs that share the cache concurrently are safe. ``COLLAPSE_JAX_CACHE_DIR`` moves it; ``COLLAPSE_JAX_NO_CACHE=1`` or the CLI's
``--no-cache`` switches it off.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

#: Every compiled program is kept: with a time threshold, whether a program is cached would
#: depend on how long its compilation happened to take (the machine's load), so a warm run could
#: still compile programs that a cold run left out.
MIN_COMPILE_SECONDS = 0.0
#: Size budget of the cache; setting one also makes JAX lock the cache around reads and writes.
MAX_CACHE_BYTES = 8 * 2**30


def _machine_tag() -> str:
    """The processor type and a digest of its feature flags (Linux), e.g. ``x86_64-3fa2c1``."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:8]}"


def cache_dir() -> Path | None:
    """Where compiled programs are kept, or None when the cache is switched off."""
    if os.environ.get("COLLAPSE_JAX_NO_CACHE", "") not in ("", "0"):
        return None
    root = os.environ.get("COLLAPSE_JAX_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "collapse_jax" / "xla" / _machine_tag()


def enable(enabled: bool = True) -> Path | None:
    """Switch JAX's persistent compilation cache on at :func:`cache_dir` (before the first
    compilation of the process); returns the directory, or None when it stays off."""
    path = cache_dir() if enabled else None
    if path is None:
        return None
    import jax

    path.mkdir(parents=True, exist_ok=True)
    repair(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return path


def repair(path: Path) -> int:
    """Give every cached program without an access-time record one (its file's modification
    time); returns how many were repaired.

    With a size budget JAX keeps a ``KEY-atime`` file beside each ``KEY-cache`` entry and reads
    them all before every write: one entry without it (written by a version of this package
    that set no budget, or by a process killed between the two writes) makes every later write
    fail with a warning, so nothing new would be cached. Done under JAX's own lock file."""
    import filelock

    with filelock.FileLock(path / ".lockfile", timeout=60):
        missing = [
            p
            for p in path.glob("*-cache")
            if not (path / (p.name.removesuffix("-cache") + "-atime")).exists()
        ]
        for p in missing:
            stamp = p.stat().st_mtime_ns.to_bytes(8, "little")
            (path / (p.name.removesuffix("-cache") + "-atime")).write_bytes(stamp)
    return len(missing)
