"""Validation at the boundary: one exception type whose message names the bad value."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np


class ConfigError(ValueError):
    """A configuration or input value is invalid. The CLI prints it as one line and exits 2."""


#: Memory a configuration may ask for (its own estimate) before it is refused at validation,
#: instead of failing to allocate after compiling: 256 GiB, beyond any one host or accelerator.
MAX_BYTES = 2**38

#: Generations of a generational run: per-generation host arrays (sizes, records) stay small.
MAX_GENERATIONS = 10**7


def check_memory(nbytes: float, what: str, hint: str = "") -> None:
    """Refuse a configuration whose estimated memory ``nbytes`` exceeds :data:`MAX_BYTES`;
    ``what`` names the values that make it (``"4096 chains of 10**9 states"``)."""
    if nbytes > MAX_BYTES:
        raise ConfigError(
            f"{what} need about {nbytes / 2**30:.3g} GiB, above {MAX_BYTES / 2**30:.0f} GiB"
            + (f"; {hint}" if hint else "")
        )


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an int, or raise naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_min: bool = False,
) -> float:
    """Return ``value`` as a finite float within bounds, or raise naming it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if minimum is not None and (value < minimum or (open_min and value == minimum)):
        op = ">" if open_min else ">="
        raise ConfigError(f"{name} must be {op} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_probability_vector(name: str, p, atol: float = 1e-6) -> np.ndarray:
    """Validate a probability vector: 1-D, finite, non-negative, summing to 1 within ``atol``."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D vector, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        bad = p[~np.isfinite(p)][0]
        raise ConfigError(f"{name} has a non-finite entry {bad}")
    if np.any(p < 0):
        i = int(np.argmax(p < 0))
        raise ConfigError(f"{name} has a negative entry {p[i]} at index {i}")
    s = float(p.sum())
    if abs(s - 1.0) > atol:
        raise ConfigError(f"{name} must sum to 1, sums to {s:.8g}")
    return p / s


def check_finite_array(name: str, x) -> np.ndarray:
    """Validate that an array has no NaN or inf; name the first bad position."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        idx = np.argwhere(~np.isfinite(x))[0]
        raise ConfigError(
            f"{name} has a non-finite value {x[tuple(idx)]} at index {tuple(int(i) for i in idx)}"
        )
    return x


def load_array(name: str, path, ndim: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """A numeric ``.npy`` array as float64, finite, with ``ndim`` in ``ndim``; every failure
    (missing, unreadable, not numeric, wrong rank, NaN/inf) is a ConfigError naming the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{name} file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ConfigError(f"cannot read {name} file {path}: {e}") from None
    if not np.issubdtype(arr.dtype, np.number) or arr.ndim not in ndim:
        raise ConfigError(
            f"{name} file {path} must hold a numeric array with {' or '.join(map(str, ndim))} "
            f"dimensions, got dtype {arr.dtype} and shape {arr.shape}"
        )
    return check_finite_array(f"{name} file {path}", arr.astype(np.float64))
