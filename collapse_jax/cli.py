"""The `collapse-jax` command line: run / demo / list, and `lm` for the language-model tools."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
import tomllib
import typing
from pathlib import Path

from collapse_jax.core.errors import ConfigError

#: Study name -> module implementing the study protocol (see ARCHITECTURE.md).
STUDIES = {
    "discrete": "collapse_jax.families.discrete.study",
    "gaussian": "collapse_jax.families.gaussian.study",
    "gmm": "collapse_jax.families.gmm.study",
    "vae": "collapse_jax.families.vae.study",
    "lm": "collapse_jax.families.lm.study",
}

#: Studies run by `collapse-jax demo`, in order (each with its module's demo_config()).
DEMO = ("discrete", "gaussian", "gmm")


def load_study(name: str):
    """Import a study module by name; a clear error for unknown names."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])


def experiment_dirs() -> list[Path]:
    """Where experiment configs are looked up by name."""
    dirs = []
    if os.environ.get("COLLAPSE_JAX_EXPERIMENTS"):
        dirs.append(Path(os.environ["COLLAPSE_JAX_EXPERIMENTS"]))
    dirs.append(Path.cwd() / "experiments")
    dirs.append(Path(__file__).resolve().parents[1] / "experiments")
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
    fields = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise ConfigError(
            f"experiment {path.name}: unknown config key(s) {', '.join(unknown)} for study "
            f"{data['study']!r}"
        )
    try:
        config = module.Config(**table)
    except TypeError as e:
        raise ConfigError(f"experiment {path.name}: {e}") from None
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
    """``NAME=v1,v2,...`` on a numeric config field -> (field, typed values)."""
    name, sep, values = spec.partition("=")
    field = name.strip().lstrip("-").replace("-", "_")
    if not sep or not values:
        raise ConfigError(f"--sweep {spec!r} must look like NAME=v1,v2,...")
    names = {f.name for f in dataclasses.fields(config)}
    if field not in names:
        raise ConfigError(f"--sweep: unknown parameter {name!r}")
    typ = _field_type(type(config), field)
    if typ not in (int, float):
        raise ConfigError(f"--sweep: parameter {name!r} is not numeric")
    try:
        out = [typ(float(v)) if typ is int else typ(v) for v in values.split(",")]
    except ValueError:
        raise ConfigError(f"--sweep: cannot parse values {values!r} for {name!r}") from None
    if typ is int and any(float(v) != int(float(v)) for v in values.split(",")):
        raise ConfigError(f"--sweep: {name!r} takes integers, got {values!r}")
    return field, out


def run_sweep(module, config, field: str, values: list, out: Path, progress=None) -> dict:
    """Run one study per value (each into OUT/FIELD=VALUE) and overlay their curves.

    A study may provide ``run_sweep(config, field, values, out)`` that runs every value in one
    vmapped computation when shapes allow (returning None otherwise); other sweeps loop, each
    value's chains still vmapped and sharded as usual.
    """
    from collapse_jax.core import report as rep
    from collapse_jax.core.runs import write_json, write_text

    summaries = {}
    vmapped = None
    if hasattr(module, "run_sweep"):
        vmapped = module.run_sweep(config, field, values, out, progress=progress)
    if vmapped is not None:
        summaries = dict(zip(values, vmapped, strict=True))
    else:
        for v in values:
            cfg = module.validate(dataclasses.replace(config, **{field: v}))
            summaries[v] = module.run(cfg, out / f"{field}={v}", progress=progress)
    common = None
    for s in summaries.values():
        keys = {
            k
            for k, val in s.items()
            if isinstance(val, dict) and {"generation", "mean", "stderr"} <= set(val)
        }
        common = keys if common is None else common & keys
    common = sorted(common or [])
    panels = []
    for key in common:
        series = []
        for v, s in summaries.items():
            ser = s[key]
            series.append(
                {
                    "x": ser["generation"],
                    "mean": _floats(ser["mean"]),
                    "stderr": _floats(ser["stderr"]),
                    "label": f"{field} = {v}",
                }
            )
        panels.append({"title": key, "x": series[0]["x"], "series": series})
    how = "one vmapped computation" if vmapped is not None else "one run per value"
    lines = [f"# Sweep over {field}", "", f"Study `{module.NAME}`, values {values} ({how}).", ""]
    if panels:
        rep.curves_figure(out / "sweep.png", panels, ncols=3)
        lines.append(rep.figure_md("sweep.png", f"Metrics for each {field} (±2 stderr bands)."))
    for v in values:
        lines.append(f"- [{field} = {v}]({field}={v}/report.md)")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    result = {"sweep": field, "values": values, "runs": {str(v): f"{field}={v}" for v in values}}
    write_json(out / "summary.json", result)
    return result


def _floats(values):
    out = []
    for v in values:
        if isinstance(v, str):
            v = float(v)
        out.append(v)
    return out


def cmd_list() -> int:
    print("Studies (collapse-jax run NAME):")
    for name, modname in STUDIES.items():
        try:
            desc = importlib.import_module(modname).DESCRIPTION
        except ModuleNotFoundError:
            continue
        print(f"  {name:<10} {desc}")
    print("\nExperiments (collapse-jax run NAME):")
    for d in experiment_dirs():
        for path in sorted(d.glob("*.toml")):
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError:
                print(f"  {path.stem:<32} (unreadable)")
                continue
            print(f"  {path.stem:<32} [{data.get('study', '?')}] {data.get('description', '')}")
    return 0


def cmd_run(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: collapse-jax run NAME|EXPERIMENT.toml [--out DIR] [flags]")
    target = argv[0]
    module, base = resolve_target(target)
    parser = argparse.ArgumentParser(prog=f"collapse-jax run {target}")
    parser.add_argument("--out", default=None, help="run directory (default runs/NAME-TIME)")
    parser.add_argument("--sweep", default=None, help="NAME=v1,v2,... over a numeric parameter")
    parser.add_argument(
        "--progress", dest="progress", action="store_const", const=True, default=None
    )
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    config = module.config_from_args(args, base)
    out = Path(args.out) if args.out else default_out(target)
    if args.sweep:
        field, values = parse_sweep(args.sweep, config)
        run_sweep(module, config, field, values, out, progress=args.progress)
    else:
        module.run(config, out, progress=args.progress)
    print(f"wrote {out / 'report.md'}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="collapse-jax demo")
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--only", default=None, help="comma-separated studies to run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    names = args.only.split(",") if args.only else list(DEMO)
    from collapse_jax.core.runs import write_text

    sections = ["# collapse_jax demo", ""]
    for name in names:
        module = load_study(name)
        t0 = time.perf_counter()
        print(f"[demo] {name}: {module.DESCRIPTION}", file=sys.stderr, flush=True)
        module.run(module.demo_config(), out / name)
        dt = time.perf_counter() - t0
        sub = (out / name / "report.md").read_text()
        # Re-root the sub-report's relative figure links under its directory.
        sub = sub.replace("](", f"]({name}/").replace(f"]({name}/http", "](http")
        body = sub.split("\n", 1)[1] if sub.startswith("# ") else sub
        sections += [
            f"## {name}: {module.DESCRIPTION} ({dt:.0f} s)",
            "",
            body.replace("\n## ", "\n### "),
            "",
        ]
    write_text(out / "report.md", "\n".join(sections))
    print(f"wrote {out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: collapse-jax {run,demo,list,lm} ...  (collapse-jax COMMAND --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "run":
            return cmd_run(rest)
        if cmd == "demo":
            return cmd_demo(rest)
        if cmd == "list":
            return cmd_list()
        if cmd == "lm":
            from collapse_jax.families.lm import cli as lm_cli

            return lm_cli.main(rest)
        raise ConfigError(f"unknown command {cmd!r}; {usage}")
    except ConfigError as e:
        print(f"collapse-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
