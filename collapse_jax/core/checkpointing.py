"""Checkpoints of host-loop (neural) regimes: numbered Orbax checkpoints of named arrays plus a
JSON metadata record, written atomically, resumable, with clear errors for corrupt files.

A checkpoint is ``{arrays: {name: ndarray}, meta: {...}}``. Any pytree (Flax params, an Optax
state, a ``NamedTuple`` train state) goes in through :func:`tree_to_arrays` and comes back through
:func:`arrays_to_tree` with a template of the same structure, so the checkpoint format does not
depend on how Orbax would serialise a particular container. Orbax writes each step into a
temporary directory and renames it on commit, so a crash during a save leaves the previous steps
intact and the unfinished one invisible; the last ``max_to_keep`` steps are kept so that a step
damaged later on disk still leaves an older one to go back to.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from collapse_jax.core.errors import ConfigError


def tree_to_arrays(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    """Flatten ``tree`` into ``{f"{prefix}_{i:05d}": leaf}`` (leaves in ``jax.tree`` order)."""
    leaves = jax.tree.leaves(tree)
    return {f"{prefix}_{i:05d}": np.asarray(jax.device_get(leaf)) for i, leaf in enumerate(leaves)}


def arrays_to_tree(template: Any, arrays: Mapping[str, np.ndarray], prefix: str) -> Any:
    """Inverse of :func:`tree_to_arrays`: rebuild a tree shaped like ``template``.

    Raises :class:`ConfigError` when a leaf is missing or its shape or dtype differs.
    """
    leaves, treedef = jax.tree.flatten(template)
    out = []
    for i, leaf in enumerate(leaves):
        name = f"{prefix}_{i:05d}"
        if name not in arrays:
            raise ConfigError(
                f"checkpoint lacks array {name!r} ({len(leaves)} expected for {prefix!r})"
            )
        value = np.asarray(arrays[name])
        ref = np.asarray(jax.device_get(leaf)) if leaf is not None else value
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise ConfigError(
                f"checkpoint array {name!r} has shape {value.shape} {value.dtype}, "
                f"expected {ref.shape} {ref.dtype} (was it written by a different configuration?)"
            )
        out.append(value)
    n_saved = sum(1 for k in arrays if k.rsplit("_", 1)[0] == prefix)
    if n_saved != len(leaves):
        raise ConfigError(
            f"checkpoint has {n_saved} {prefix!r} arrays, the model expects {len(leaves)}"
        )
    return jax.tree.unflatten(treedef, out)


class Checkpointer:
    """Numbered checkpoints in ``directory`` (an Orbax ``CheckpointManager``, synchronous saves)."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        logging.getLogger("absl").setLevel(logging.WARNING)
        self.directory = Path(directory).absolute()
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:
            raise ConfigError(f"cannot open checkpoint directory {self.directory}: {e}") from None

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest(self) -> int | None:
        """The newest committed step, or ``None`` when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Write step ``step`` (atomic: committed only once complete)."""
        ocp = self._ocp
        arrays = {k: np.asarray(jax.device_get(v)) for k, v in arrays.items()}
        args = ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(dict(meta))
        )
        self._manager.save(int(step), args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """Read step ``step`` (default: the latest) as ``(arrays, meta)``.

        A missing or damaged checkpoint raises :class:`ConfigError` naming its directory and the
        other steps available; nothing on disk is changed.
        """
        ocp = self._ocp
        steps = self.steps()
        if step is None:
            if not steps:
                raise ConfigError(f"no checkpoint to resume from in {self.directory}")
            step = steps[-1]
        if step not in steps:
            raise ConfigError(
                f"checkpoint step {step} not found in {self.directory} (have {steps})"
            )
        args = ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        try:
            out = self._manager.restore(int(step), args=args)
            arrays = {k: np.asarray(v) for k, v in dict(out["arrays"]).items()}
            meta = dict(out["meta"])
        except Exception as e:
            others = [s for s in steps if s != step]
            raise ConfigError(
                f"corrupt checkpoint {self.directory / str(step)}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
                + (f" (other steps kept: {others})" if others else "")
            ) from None
        return arrays, meta

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
