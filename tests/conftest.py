"""Test configuration: CPU only, 8 host devices for sharding tests, offline hub, data directory."""

import os
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
# Runs started by the tests keep their compiled programs in a private cache, not the user's.
os.environ.setdefault("COLLAPSE_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="collapse-jax-xla-"))

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "COLLAPSE_JAX_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["COLLAPSE_JAX_DATA_DIR"] = str(_SHARED)

import jax  # noqa: E402
import pytest  # noqa: E402

from collapse_jax.core import compilation  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# The pytest workers themselves never switch the persistent compilation cache on (the runs the
# tests start as subprocesses still do, and tests/test_compilation.py checks the cache there):
# twice in CI a long-lived worker, after an in-process CLI test had enabled it, crashed inside
# XLA's executable serialisation (segfault in serialize / deserialize_executable while running
# tests/test_samplers.py), which no single run has shown. In-process runs compile as before.
def _no_cache(enabled: bool = True):
    return None


_no_cache.real = compilation.enable  # the unpatched function, for tests/test_compilation.py
compilation.enable = _no_cache


@pytest.fixture
def shared_data() -> Path:
    """The shared data directory (MNIST, WikiText-2, tokenizers), or skip when it is absent."""
    root = os.environ.get("COLLAPSE_JAX_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("shared data directory not available (set COLLAPSE_JAX_DATA_DIR)")
    return Path(root)
