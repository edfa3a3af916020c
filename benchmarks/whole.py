"""Whole-process timing shared by the benchmarks: what a user waits for, from typing the command
to the report, against the peer's own script doing the same work, each in a fresh interpreter.

* ``collapse-jax run …`` runs twice against a compilation cache made empty for this benchmark:
  "cold" (every program compiled) and "warm" (every program a cache hit), each into its own run
  directory (report and figures written).
* The peer is a script (source text) run by the same Python; it writes its result to a file.

The benchmark's own device settings (``XLA_FLAGS`` set to split the CPU for the steady-state
figures) are removed from the children's environment: they start as a user's shell would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["COLLAPSE_JAX_CACHE_DIR"] = str(cache)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def timed(args: Sequence[str], env: dict[str, str]) -> float:
    """Wall seconds of one child process (it must succeed)."""
    t = time.perf_counter()
    done = subprocess.run(list(args), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


class Whole:
    """One benchmark's whole-process measurements in a private temporary folder."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="collapse-jax-bench-")
        self.root = Path(self._tmp.name)
        self._runs = 0

    def __enter__(self) -> Whole:
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def cli(
        self, run_args: Sequence[str], env: dict[str, str] | None = None
    ) -> tuple[float, float]:
        """(cold, warm) seconds of ``collapse-jax run RUN_ARGS…`` with a cache of its own
        (``env``: variables set for both runs on top of a user's shell)."""
        self._runs += 1
        env = {**_env(self.root / f"xla-{self._runs}"), **(env or {})}
        base = [sys.executable, "-m", "collapse_jax.cli", "run", *run_args, "--no-progress"]
        cold = timed([*base, "--out", str(self.root / f"run-{self._runs}-cold")], env)
        warm = timed([*base, "--out", str(self.root / f"run-{self._runs}-warm")], env)
        return cold, warm

    def script(self, source: str) -> float:
        """Seconds of a peer script (``OUT`` names a file it may write its result to)."""
        self._runs += 1
        path = self.root / f"peer-{self._runs}.py"
        path.write_text(f"OUT = {str(self.root / f'peer-{self._runs}.npz')!r}\n{source}")
        return timed([sys.executable, str(path)], _env(self.root / "xla-peer"))


def extrapolate(x_a: float, t_a: float, x_b: float, t_b: float, x: float) -> float:
    """A peer's whole-process time at size ``x`` from whole runs at sizes ``x_a`` and ``x_b``
    (generations or chains, whose cost is constant per unit): T(x) = T(a) + slope (x − a)."""
    return t_a + (t_b - t_a) * (x - x_a) / (x_b - x_a)


def line(what: str, cold: float, warm: float, peer: float, peer_name: str) -> str:
    """One printed result: both of our figures, the peer's, and the ratios peer / ours."""
    return (
        f"whole process, {what}: collapse-jax cold {cold:.1f} s, warm {warm:.1f} s; "
        f"{peer_name} {peer:.1f} s -> ratio peer/ours cold {peer / cold:.2f}x, "
        f"warm {peer / warm:.2f}x"
    )
