"""Data policies and sample-size schedules, shared by every model family (a leaf module: it
imports nothing of the loop).

Generation numbering is the same everywhere: generation 0 is the original distribution D0 itself;
generation n >= 1 is the n-th fitted model. ``M_i`` (``sizes[i]``) is the size of the training set
that generation ``i + 1`` is fitted to, so ``M_0`` samples of D0 fit generation 1.

Each generation n >= 1 draws a new batch B_n of ``M_n`` points made of

* ``round(alpha M_n)`` samples of the newest model (generation n),
* ``round(beta M_n)`` points subsampled without replacement from the previous training set,
* ``round(gamma M_n)`` fresh samples of D0,

(the paper's general process, alpha + beta + gamma = 1), and the training set of generation n + 1 is

* ``replace`` / ``mix``: T_n = B_n,
* ``accumulate``: T_n = T_{n-1} ∪ B_n (everything ever generated is kept),
* ``accumulate-subsample``: pool P_n = P_{n-1} ∪ B_n and T_n = a uniform subsample of size M_n.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.core.errors import ConfigError, check_float, check_int

POLICY_MODES = ("replace", "mix", "accumulate", "accumulate-subsample")


# --------------------------------------------------------------------------------------------
# Policies


@dataclasses.dataclass(frozen=True)
class Policy:
    """How each generation's training data is made (see the module docstring)."""

    mode: str = "replace"  # replace | mix | accumulate | accumulate-subsample
    alpha: float = 1.0  # fraction of each new batch drawn from the newest model
    beta: float = 0.0  # fraction subsampled from the previous generation's training data
    gamma: float = 0.0  # fraction drawn fresh from the original data D0

    def __post_init__(self):
        if self.mode not in POLICY_MODES:
            raise ConfigError(
                f"unknown policy {self.mode!r}; choose one of {', '.join(POLICY_MODES)}"
            )
        for name in ("alpha", "beta", "gamma"):
            check_float(f"policy {name}", getattr(self, name), 0.0, 1.0)
        total = self.alpha + self.beta + self.gamma
        if abs(total - 1.0) > 1e-9:
            raise ConfigError(
                f"policy fractions alpha + beta + gamma must sum to 1, got "
                f"{self.alpha} + {self.beta} + {self.gamma} = {total:.6g}"
            )
        if self.mode.startswith("accumulate") and self.beta > 0:
            raise ConfigError(
                f"policy {self.mode!r} already keeps all previous data; beta must be 0, got {self.beta}"
            )

    @property
    def accumulates(self) -> bool:
        return self.mode.startswith("accumulate")

    @classmethod
    def parse(cls, spec: str, fresh_fraction: float = 0.0) -> Policy:
        """Parse ``replace``, ``accumulate``, ``accumulate-subsample`` or ``mix:ALPHA,BETA,GAMMA``.

        ``fresh_fraction`` (gamma) makes that fraction of every new batch fresh D0 data; it
        cannot be combined with an explicit ``mix`` (whose third number already is gamma).
        """
        gamma = check_float("fresh fraction", fresh_fraction, 0.0, 1.0)
        spec = spec.strip()
        if spec.startswith("mix"):
            _, _, rest = spec.partition(":")
            try:
                a, b, c = (float(v) for v in rest.split(","))
            except ValueError:
                raise ConfigError(
                    f"policy {spec!r} must look like mix:ALPHA,BETA,GAMMA, e.g. mix:0.8,0.1,0.1"
                ) from None
            if gamma > 0:
                raise ConfigError(
                    f"--fresh-fraction {gamma} conflicts with explicit policy {spec!r}; put gamma in the mix"
                )
            return cls("mix", a, b, c)
        if spec not in ("replace", "accumulate", "accumulate-subsample"):
            raise ConfigError(f"unknown policy {spec!r}; choose one of {', '.join(POLICY_MODES)}")
        return cls(spec, 1.0 - gamma, 0.0, gamma)

    def describe(self) -> str:
        if self.mode == "replace" and self.gamma == 0:
            return "replace"
        parts = f"alpha={self.alpha:g}, beta={self.beta:g}, gamma={self.gamma:g}"
        return f"{self.mode} ({parts})"


class BatchSplit(NamedTuple):
    """How many points of a new batch come from the model, the previous data and D0."""

    model: jax.Array
    previous: jax.Array
    original: jax.Array


def split_batch(size, policy: Policy) -> BatchSplit:
    """Split a batch of ``size`` points into (model, previous, original) counts summing to ``size``.

    Works on Python ints, NumPy or traced JAX integers (the schedule may be traced in a scan).
    """
    xp = jnp if isinstance(size, jax.Array) else np
    size = xp.asarray(size)
    n_orig = xp.round(size * policy.gamma).astype(size.dtype)
    n_prev = xp.round(size * policy.beta).astype(size.dtype)
    n_prev = xp.minimum(n_prev, size - n_orig)
    return BatchSplit(size - n_orig - n_prev, n_prev, n_orig)


# --------------------------------------------------------------------------------------------
# Sample-size schedules


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Sample sizes M_i, i = 0..G-1 (M_i fits generation i + 1)."""

    kind: str = "constant"  # constant | linear | poly | list
    rate: float = 0.0  # linear: slope (0 means M0 per generation); poly: exponent a
    values: tuple[int, ...] = ()  # explicit sizes for kind == "list"

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """``constant``, ``linear``, ``linear:SLOPE``, ``poly:A``, ``list:M0,M1,...`` or a file."""
        spec = spec.strip()
        head, _, rest = spec.partition(":")
        if spec == "constant":
            return cls("constant")
        if head == "linear":
            slope = check_float("linear schedule slope", rest, 0.0) if rest else 0.0
            return cls("linear", slope)
        if head == "poly":
            if not rest:
                raise ConfigError(f"schedule {spec!r} needs an exponent, e.g. poly:2")
            return cls("poly", check_float("polynomial schedule exponent", rest, 0.0))
        if head == "list":
            try:
                values = tuple(int(v) for v in rest.split(","))
            except ValueError:
                raise ConfigError(f"schedule {spec!r} must be list:M0,M1,... of integers") from None
            return cls("list", values=values)
        path = Path(spec)
        if path.suffix in (".npy", ".txt") and path.exists():
            arr = np.load(path) if path.suffix == ".npy" else np.loadtxt(path)
            arr = np.asarray(arr).ravel()
            if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
                raise ConfigError(f"schedule file {path} must hold finite integers")
            return cls("list", values=tuple(int(v) for v in arr))
        raise ConfigError(
            f"unknown schedule {spec!r}; use constant, linear[:SLOPE], poly:A, list:M0,M1,... or a .npy file"
        )

    def sizes(self, m0: int, generations: int) -> np.ndarray:
        """The sizes ``M_0 .. M_{G-1}`` as an int64 array; every entry must be >= 1."""
        m0 = check_int("samples", m0, 1)
        i = np.arange(generations, dtype=np.float64)
        if self.kind == "constant":
            out = np.full(generations, m0, dtype=np.float64)
        elif self.kind == "linear":
            out = m0 + (self.rate if self.rate > 0 else m0) * i
        elif self.kind == "poly":
            out = np.round(m0 * (i + 1.0) ** self.rate)
        elif self.kind == "list":
            if len(self.values) < generations:
                raise ConfigError(
                    f"schedule list has {len(self.values)} sizes but {generations} generations need one each"
                )
            out = np.asarray(self.values[:generations], dtype=np.float64)
        else:
            raise ConfigError(f"unknown schedule kind {self.kind!r}")
        if np.any(out < 1):
            raise ConfigError(f"schedule gives a sample size {int(out.min())} < 1")
        if np.any(out > 2**31 - 1):
            raise ConfigError(f"schedule gives a sample size {out.max():.3g} beyond int32")
        return out.astype(np.int64)

    def describe(self) -> str:
        if self.kind == "constant":
            return "constant"
        if self.kind == "linear":
            return f"linear (slope {self.rate:g})" if self.rate else "linear (M0·(i+1))"
        if self.kind == "poly":
            return f"M0·(i+1)^{self.rate:g}"
        return f"explicit list ({len(self.values)} sizes)"


# --------------------------------------------------------------------------------------------
# Host-side data mixing for neural models (one model at a time, arrays of examples)


def mix_training_data(
    rng: np.random.Generator,
    policy: Policy,
    size: int,
    sample_model: Callable[[int], np.ndarray],
    previous: np.ndarray | None,
    original: np.ndarray,
    pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Compose the next training set from arrays of examples (leading axis = example).

    ``sample_model(n)`` returns ``n`` examples of the newest model. Returns ``(train, pool)``
    where ``pool`` is the accumulated data (``None`` unless the policy accumulates). Fresh D0
    examples are sampled without replacement from ``original`` (with replacement only if more
    are asked for than exist).
    """
    size = check_int("sample size", size, 1)
    split = split_batch(size, policy)
    n_model, n_prev, n_orig = (int(v) for v in split)
    parts = []
    if n_model:
        parts.append(np.asarray(sample_model(n_model)))
    if n_prev:
        if previous is None or len(previous) == 0:
            raise ConfigError("policy beta > 0 needs previous training data")
        parts.append(previous[rng.choice(len(previous), n_prev, replace=n_prev > len(previous))])
    if n_orig:
        parts.append(original[rng.choice(len(original), n_orig, replace=n_orig > len(original))])
    batch = np.concatenate(parts, 0)
    if policy.mode in ("replace", "mix"):
        return batch, None
    base = pool if pool is not None else previous
    pooled = batch if base is None else np.concatenate([base, batch], 0)
    if policy.mode == "accumulate":
        return pooled, pooled
    idx = rng.choice(len(pooled), min(size, len(pooled)), replace=False)
    return pooled[idx], pooled
