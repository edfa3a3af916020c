"""Test configuration: CPU only, 8 host devices for sharding tests, offline hub, data directory."""

import atexit
import gc
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Exactly 8 host devices, whatever XLA_FLAGS held before (a different count would make the
# sharding tests fail or skip depending on the value).
_flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
]
os.environ["XLA_FLAGS"] = " ".join([*_flags, "--xla_force_host_platform_device_count=8"])
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# Runs started by the tests keep their compiled programs in a private cache, not the user's,
# removed when the process that made it exits (pytest's, and each xdist worker's own).
if "COLLAPSE_JAX_CACHE_DIR" not in os.environ:
    os.environ["COLLAPSE_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="collapse-jax-xla-")
    atexit.register(shutil.rmtree, os.environ["COLLAPSE_JAX_CACHE_DIR"], ignore_errors=True)

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "COLLAPSE_JAX_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["COLLAPSE_JAX_DATA_DIR"] = str(_SHARED)

import jax  # noqa: E402
import pytest  # noqa: E402

from collapse_jax.core import compilation  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# The pytest workers themselves never switch the persistent compilation cache on (the runs the
# tests start as subprocesses still do, and tests/test_compilation.py checks the cache there): a
# worker's in-process tests then compile exactly as a user's process would, and its own cache
# traffic cannot mask or cause a failure.
def _no_cache(enabled: bool = True):
    return None


_no_cache.real = compilation.enable  # the unpatched function, for tests/test_compilation.py
compilation.enable = _no_cache

#: A long-lived pytest worker compiles thousands of programs, and XLA's CPU backend maps each
#: one's code and data into memory (3 to 8 mappings per executable). Past Linux's limit on a
#: process's mappings (vm.max_map_count, 65,530 by default) the next compilation aborts the
#: worker, which is how CI lost a worker in tests/test_samplers.py, 20 minutes in, three times.
#: Dropping JAX's compiled programs once a worker nears a third of the limit frees them; the
#: tests after it recompile what they need.
_MAP_BUDGET = 20_000


def _mapping_count() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to respect
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    if _mapping_count() > _MAP_BUDGET:
        jax.clear_caches()
        gc.collect()


@pytest.fixture
def shared_data() -> Path:
    """The shared data directory (MNIST, WikiText-2, tokenizers), or skip when it is absent."""
    root = os.environ.get("COLLAPSE_JAX_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("shared data directory not available (set COLLAPSE_JAX_DATA_DIR)")
    return Path(root)
