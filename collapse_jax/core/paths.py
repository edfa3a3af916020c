"""Where data lives: the configurable data directory."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "COLLAPSE_JAX_DATA_DIR"


def data_dir(override: str | os.PathLike | None = None) -> Path | None:
    """The data directory: ``override``, else ``$COLLAPSE_JAX_DATA_DIR``, else ``None``.

    The directory is laid out like ``mnist/mnist_full_70k.npz``, ``wikitext-2/{valid,test}.txt``,
    ``tokenizers/opt-125m/``. Nothing in it is ever copied into a run directory or the repository.
    """
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return None


def data_file(relative: str, override: str | os.PathLike | None = None) -> Path | None:
    """``data_dir()/relative`` if it exists, else ``None``."""
    root = data_dir(override)
    if root is None:
        return None
    path = root / relative
    return path if path.exists() else None
