"""Experiments: configs by name or TOML file (``study``, ``description``, ``[config]``),
resolved against a study's frozen config; ``--sweep NAME=v1,v2`` specifications."""

from __future__ import annotations

import dataclasses
import os
import time
import tomllib
import typing
from pathlib import Path

from collapse_jax.core.errors import ConfigError
from collapse_jax.core.flags import config_with
from collapse_jax.families import STUDIES, load_study

#: The experiments shipped with the project (next to the package in a checkout).
PROJECT_EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def experiment_dirs() -> list[Path]:
    """Where experiment configs are looked up by name."""
    dirs = []
    if os.environ.get("COLLAPSE_JAX_EXPERIMENTS"):
        dirs.append(Path(os.environ["COLLAPSE_JAX_EXPERIMENTS"]))
    dirs.append(Path.cwd() / "experiments")
    dirs.append(PROJECT_EXPERIMENTS)
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def find_experiment(name: str) -> Path | None:
    path = Path(name)
    if path.suffix == ".toml":
        if not path.exists():
            raise ConfigError(f"experiment file not found: {path}")
        return path
    for d in experiment_dirs():
        candidate = d / f"{name}.toml"
        if candidate.exists():
            return candidate
    return None


def load_experiment(path: Path):
    """Read an experiment TOML: ``study``, ``description`` and a ``[config]`` table."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"corrupt experiment file {path}: {e}") from None
    if "study" not in data:
        raise ConfigError(f"experiment file {path} has no 'study' key")
    module = load_study(data["study"])
    table = data.get("config", {})
    where = f"experiment {path.name} (study {data['study']!r})"
    config = config_with(module.Config(), table, where)
    return module, config, data.get("description", "")


def resolve_target(target: str):
    """A study name (its default config) or an experiment (name or .toml path)."""
    path = find_experiment(target) if target not in STUDIES else None
    if path is not None:
        module, config, _ = load_experiment(path)
        return module, config
    if target in STUDIES:
        module = load_study(target)
        return module, module.Config()
    raise ConfigError(
        f"unknown study or experiment {target!r}; `collapse-jax list` shows what exists"
    )


def default_out(name: str) -> Path:
    return Path("runs") / f"{Path(name).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _field_type(config_cls, name: str):
    hints = typing.get_type_hints(config_cls)
    return hints.get(name)


def parse_sweep(spec: str, config) -> tuple[str, list]:
    """``NAME=v1,v2,...`` on a numeric config field, or ``NAME=v1;v2;...`` on a text field (its
    values may hold commas) -> (field, typed values); errors name the whole specification."""
    try:
        return _parse_sweep(spec, config)
    except ConfigError as e:
        if repr(spec) in str(e):
            raise
        raise ConfigError(f"--sweep {spec!r}: {str(e).removeprefix('--sweep: ')}") from None


def _parse_sweep(spec: str, config) -> tuple[str, list]:
    name, sep, values = spec.partition("=")
    field = name.strip().lstrip("-").replace("-", "_")
    if not sep or not values:
        raise ConfigError(f"--sweep {spec!r} must look like NAME=v1,v2,...")
    names = {f.name for f in dataclasses.fields(config)}
    if field not in names:
        raise ConfigError(f"--sweep: unknown parameter {name!r}")
    typ = _field_type(type(config), field)
    if typ is str:  # text values may hold commas (e.g. verify=TPR,FPR): ';' separates them
        out = [v.strip() for v in values.split(";")]
        if any(not v for v in out):
            raise ConfigError(f"--sweep: empty value in {values!r} for {name!r} (';' separates)")
        return field, out
    if typ not in (int, float):
        raise ConfigError(f"--sweep: parameter {name!r} is neither numeric nor text")
    try:
        out = [typ(float(v)) if typ is int else typ(v) for v in values.split(",")]
    except ValueError:
        raise ConfigError(f"--sweep: cannot parse values {values!r} for {name!r}") from None
    if typ is int and any(float(v) != int(float(v)) for v in values.split(",")):
        raise ConfigError(f"--sweep: {name!r} takes integers, got {values!r}")
    return field, out
