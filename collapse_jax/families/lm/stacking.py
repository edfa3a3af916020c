"""Decoder-layer parameters stored stacked, for ``OPTForCausalLM(scan_layers=True)``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

#: The key of the decoder layers' parameters stored stacked (leading axis: the layer); the
#: optimizer's weight-decay mask knows it (:data:`collapse_jax.core.training.STACKED_LAYERS`).
STACKED = "layers"


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """The parameter tree with ``layers_0`` … ``layers_{L-1}`` replaced by one subtree
    :data:`STACKED` whose leaves carry the layer as their leading axis (for
    ``OPTForCausalLM(scan_layers=True)``: no per-call stacking, and the optimizer sees one leaf
    per layer parameter instead of L). :func:`unstack_layers` inverts it exactly."""
    n = sum(1 for k in params if k.startswith("layers_"))
    if n == 0:
        return dict(params)
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out[STACKED] = jax.tree.map(
        lambda *ls: jnp.stack(ls), *[params[f"layers_{i}"] for i in range(n)]
    )
    return out


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`stack_layers` (a tree without :data:`STACKED` is returned as is)."""
    if STACKED not in params:
        return dict(params)
    out = {k: v for k, v in params.items() if k != STACKED}
    n = jax.tree.leaves(params[STACKED])[0].shape[0]
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params[STACKED])
    return out
