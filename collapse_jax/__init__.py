"""collapse_jax: a JAX toolkit for studying model collapse.

The public API (imported lazily, so that ``import collapse_jax`` and the CLI start fast):

* :func:`run`, :func:`sweep`, :class:`Result` — run a built-in study or your own family;
* :class:`PointFamily` — a user-defined family from ``fit``, ``sample`` and ``metrics``;
* :class:`Policy`, :class:`Schedule` — data policies and sample-size schedules;
* :class:`Family`, :class:`GenInput`, :func:`scan_generations`, :func:`run_generations` — the
  kernel contract, the pure loop (jittable) and its host driver.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "run": "collapse_jax.api",
    "sweep": "collapse_jax.api",
    "Result": "collapse_jax.api",
    "PointFamily": "collapse_jax.core.point_family",
    "PointConfig": "collapse_jax.core.point_family",
    "Policy": "collapse_jax.core.policies",
    "Schedule": "collapse_jax.core.policies",
    "Family": "collapse_jax.core.loop",
    "GenInput": "collapse_jax.core.loop",
    "scan_generations": "collapse_jax.core.loop",
    "run_generations": "collapse_jax.core.loop",
    "chain_stats": "collapse_jax.core.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'collapse_jax' has no attribute {name!r}")
