"""Bad input on every flag of every study and every ``collapse-jax lm`` subcommand: exit code 2,
one stderr line naming the flag and the value, no traceback, no finished run directory.

The cases are generated from each study's ``Config`` (one ``--flag`` per field) and from the
``lm`` subcommands' parsers, so a new field or option has to be given a rule here (the coverage
tests fail otherwise). A study's ``run`` is replaced by a stub that fails the test: every case
must be refused by argparse or ``validate`` before anything runs or compiles; one case per study
goes through the real ``run`` too. Every ``experiments/*.toml`` and every ``demo_config()``
validates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from collapse_jax import cli
from collapse_jax.core.experiments import PROJECT_EXPERIMENTS, load_experiment
from collapse_jax.families import STUDIES, load_study

HUGE = str(10**15)

# --------------------------------------------------------------------------------------------
# Rules: the invalid values of a field, chosen by its type and meaning


class Rule(NamedTuple):
    """Invalid values of one flag: each is a string for the command line, optionally with the
    extra flags that make the field matter (``(value, ("--d0", "mixture"))``)."""

    values: tuple


def ints(minimum: int, *, huge: bool = False, maximum: int | None = None) -> Rule:
    """An integer flag: wrong types, below ``minimum``, above ``maximum``, absurdly large."""
    vals = ["x", "1.5", "nan", "inf", "-1", str(minimum - 1)]
    if minimum - 1 > 0:  # e.g. states >= 2: 1 is wrong and 0 too
        vals.append("0")
    if maximum is not None:
        vals.append(str(maximum + 1))
    if huge:
        vals.append(HUGE)
    return Rule(tuple(dict.fromkeys(vals)))


def floats(
    minimum: float | None = None, *, open_min: bool = False, maximum: float | None = None
) -> Rule:
    """A float flag: wrong type, NaN, ±inf, below ``minimum``, above ``maximum``."""
    vals = ["x", "nan", "inf", "-inf"]
    if minimum is not None:
        vals.append(str(minimum - 1.5))
        if open_min:
            vals.append(str(minimum))
    if maximum is not None:
        vals.append(str(maximum + 0.5))
    return Rule(tuple(dict.fromkeys(vals)))


def choice(*extra: str) -> Rule:
    """A string flag with a fixed set of choices: an unknown one."""
    return Rule(("no-such-choice", *extra))


def plus(rule: Rule, *values) -> Rule:
    """``rule`` with more invalid values."""
    return Rule(rule.values + values)


def spec(*values) -> Rule:
    """A structured string or JSON flag: the given invalid values."""
    return Rule(tuple(values))


# Placeholders replaced by files the test writes (see ``files``).
MISSING = "{missing}.npy"
CORRUPT = "{corrupt}.npy"
NAN = "{nan}.npy"
RANK3 = "{rank3}.npy"
NPY_FILES = (MISSING, CORRUPT, NAN, RANK3)

#: The fields every generational study shares (core/policies.check_loop_fields).
LOOP = {
    "samples": ints(1, huge=True),
    "chains": ints(1, huge=True),
    "generations": ints(1, huge=True),
    "record_every": ints(1),
    "seed": ints(0),
    "policy": spec(
        "sometimes", "mix:0.5,0.5", "mix:0.5,0.3,0.3", "mix:x,y,z", "mix:nan,0.5,0.5", "mix:2,-1,0"
    ),
    "fresh_fraction": floats(0.0, maximum=1.0),
    "schedule": spec("cubic", "poly", "poly:nan", "linear:-1", "list:a,b", "list:0,0", *NPY_FILES),
}

#: The data-operator fields (core/operators.OperatorFields) of the generational studies.
CURATE = ("--curate", "4")
VERIFY = ("--verify", "0.9,0.1")
OPS = {
    "curate": spec("x", "0", "-1", "1.5", "nan", "4"),  # 4: needs a reward
    "reward": spec(
        ("x", CURATE), ("1,2", CURATE), ("nan", CURATE), ("linear:nan", CURATE), "linear:1"
    ),
    "verify": spec("x", "0.9", "1.5,0", "0,0", "nan,0.1", "0.9,0.1"),  # 0.9,0.1: needs good
    "good": spec(("x", VERIFY), ("99", VERIFY), ("ball:-1:0", VERIFY), "0"),
    "verify_draws": ints(1, maximum=4096, huge=True),
    "temperature": floats(0.0, open_min=True),
    "top_k": ints(0, huge=True),
    "top_p": floats(0.0, open_min=True, maximum=1.0),
    "real_weight": floats(0.0, maximum=1.0),
    "real_ratio": plus(floats(0.0, open_min=True), "2"),  # 2: real_weight is off
}

MIX = ("--d0", "mixture")
GMM_MIX = (*MIX, "--d0-weights", "[0.5, 0.5]", "--d0-means", "[[0, 0], [3, 0]]")

#: Per study: the rule of each field that is not a shared loop field (booleans need none).
RULES: dict[str, dict[str, Rule]] = {
    "discrete": {
        "states": ints(2, huge=True),
        "p0": spec(
            "0.5,0.6",
            "-0.5,1.5",
            "0.5,nan",
            "0.5",
            "zipf:x",
            "zipf:-1",
            "dirichlet:0",
            "dirichlet:1:x",
            "dirichlet:1:-1",
            "bogus",
            *NPY_FILES,
        ),
        "method": choice(),
        "compact": choice("true"),
    },
    "gaussian": {
        "dim": ints(1, maximum=64, huge=True),
        "d0": choice(*NPY_FILES),
        "d0_scale": floats(0.0, open_min=True),
        "d0_mean": spec("[1,", "[1, 2]", "[[1]]", '["a"]', "1e999"),
        "d0_cov": spec("[[1,", "[[1, 2], [3, 4]]", "[[-1]]", "[[0]]", '[["a"]]', "1e999"),
        "collapse_threshold": floats(0.0, open_min=True, maximum=1.0),
        "d0_df": floats(2.0, open_min=True),
        "sampler": choice(),
        "estimator": choice(),
        "ot_samples": ints(0, huge=True),
    },
    "gmm": {
        "components": ints(1, huge=True),
        "covariance_type": choice(),
        "init": choice(),
        "tol": floats(0.0),
        "max_iter": ints(1),
        "reg_covar": floats(0.0, open_min=True),
        "d0": choice(*NPY_FILES),
        "d0_weights": spec(
            ("[0.5,", GMM_MIX),
            ("[0.5, 0.6]", GMM_MIX),
            ("[1.5, -0.5]", GMM_MIX),
            ("[1.0]", GMM_MIX),
            ("[[0.5], [0.5]]", GMM_MIX),
        ),
        "d0_means": spec(
            ("[[0, 0], [3]]", GMM_MIX), ("[0, 1, 2]", GMM_MIX), ("[[0, 0], [1e999, 0]]", GMM_MIX)
        ),
        "d0_covs": spec(
            ("[-1, 1]", GMM_MIX),
            ("[1, 1, 1]", GMM_MIX),
            ("[[[1, 2], [3, 4]], [1, 1]]", GMM_MIX),
            ("[[[1, 2], [2, 1]], [[1, 0], [0, 1]]]", GMM_MIX),
        ),
        "heldout": ints(1, huge=True),
        "w2_samples": ints(1, huge=True),
        "w2_every": plus(ints(0), ("15", ("--record-every", "10"))),  # not a multiple
        "w2_method": choice(),
        "w2_chains": ints(0),
        "w2_epsilon": floats(0.0, open_min=True),
        "pool_capacity": plus(ints(0), (HUGE, ("--policy", "accumulate"))),
        "snapshots": spec("[-1]", "[1.5]", "[[1]]", "[x", '["a"]'),
    },
    "regression": {
        "dim": ints(1, maximum=4096, huge=True),
        "noise": floats(0.0),
        "ridge": floats(0.0),
        "design": choice(),
        "spectrum": floats(0.0, maximum=64.0),
        "signal": floats(0.0),
        "wrong_fraction": floats(0.0, maximum=1.0),
        "wrong_shift": floats(),
        "sampler": choice(),
    },
    "kde": {
        "dataset": choice(*NPY_FILES),
        "bandwidth": spec("0", "-1", "nan", "inf", "x", "scot"),
        "noise": floats(0.0),
        "factor": floats(0.0, open_min=True, maximum=1.0),
        "blob_centers": ints(1, huge=True),
        "blob_std": floats(0.0, open_min=True),
        "heldout": ints(1, huge=True),
        "w2_samples": ints(1),
        "w2_chains": ints(0),
    },
    "vae": {
        "epochs": ints(1, huge=True),
        "batch_size": ints(1, huge=True),
        "synthetic": choice(),
        "seeds": ints(1, huge=True),
        "channels1": ints(1, huge=True),
        "channels2": ints(1, huge=True),
        "latent": ints(1, huge=True),
        "learning_rate": floats(0.0, open_min=True),
        "weight_decay": floats(0.0),
        "eval_samples": ints(2, huge=True),
        "eval_test": ints(0),
        "diversity_samples": ints(2, huge=True),
        "classifier_epochs": ints(1, huge=True),
        "classifier_train": ints(0),
        "mnist_source": choice(),
        "data_dir": spec("{missing}/data"),
        "cache_dir": spec("{corrupt}.npy"),  # an existing file, not a directory
    },
    "lm": {
        "model": spec("{missing}/model", "{empty_dir}"),
        "tokenizer": spec("{missing}/tokenizer", "{empty_dir}"),
        "corpus": spec("{missing}/corpus", "{empty_dir}", "no-such-corpus"),
        "block_size": ints(2, huge=True),
        "train_blocks": ints(0),
        "eval_blocks": ints(0),
        "pretrain_blocks": ints(0),
        "pretrain_epochs": ints(0, huge=True),
        "pretrain_learning_rate": floats(0.0, open_min=True),
        "epochs": ints(1, huge=True),
        "learning_rate": floats(0.0, open_min=True),
        "warmup_steps": ints(0),
        "weight_decay": floats(0.0),
        "batch_size": ints(1, huge=True),
        "grad_accum_steps": ints(1, huge=True),
        "seeds": ints(1, huge=True),
        "fresh_fractions": spec("[-0.1]", "[1.5]", "[0.1, nan]", "[[0.1]]", "[x", "[]"),
        "start_from": choice(),
        "decoding": choice(),
        "num_beams": ints(1, huge=True),
        "repetition_penalty": floats(0.0, open_min=True),
        "temperature": floats(0.0, open_min=True),
        "top_k": ints(0),
        "top_p": floats(0.0, open_min=True, maximum=1.0),
        "generate_batch_size": ints(1, huge=True),
        "eval_batch_size": ints(1, huge=True),
        "n_prompts": ints(0),
        "dtype": choice(),
        "scan_layers": choice(),
        "synthetic_vocab": ints(2, huge=True),
        "synthetic_states": ints(1, huge=True),
        "synthetic_seed": ints(0),
        "synthetic_blocks": ints(2, huge=True),
        "tail_mass": floats(0.0, maximum=1.0),
    },
}
# The VAE and LM regimes share the loop fields' meaning but not all of them.
RULES["vae"].update({k: LOOP[k] for k in ("samples", "schedule", "policy", "fresh_fraction")})
RULES["vae"]["generations"] = ints(1, huge=True)
RULES["vae"]["seed"] = ints(0)
RULES["lm"]["generations"] = ints(0, huge=True)
RULES["lm"]["seed"] = ints(0)
RULES["lm"]["policy"] = spec("sometimes", "mix:0.5,0.3,0.2")


def field_rule(study: str, name: str, typ) -> Rule | None:
    """The rule of one field: the study's table, the shared loop fields, or (booleans) the
    generic rule; None when there is none."""
    if name in RULES[study]:
        return RULES[study][name]
    if name in LOOP and study not in ("vae", "lm"):
        return LOOP[name]
    if name in OPS:
        return OPS[name]
    if typ is bool:
        return Rule(("=maybe",))  # --flag=maybe: a boolean flag takes no value
    return None


def _fields(study: str):
    module = load_study(study)
    hints = typing.get_type_hints(module.Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(module.Config)]


def _aliases(study: str) -> dict[str, list[str]]:
    """Per field, its flags other than ``--field-name`` / ``--no-field-name``."""
    parser = argparse.ArgumentParser()
    load_study(study).add_arguments(parser)
    out = {}
    for a in parser._actions:
        flag = "--" + a.dest.replace("_", "-")
        extra = [o for o in a.option_strings if o not in (flag, "--no-" + flag[2:], "-h")]
        if extra:
            out[a.dest] = extra
    return out


def study_cases():
    """(study, field, flag, value, context) for every invalid value of every field, and the
    first two through each alias of a field."""
    cases = []
    for study in STUDIES:
        aliases = _aliases(study)
        for name, typ in _fields(study):
            rule = field_rule(study, name, typ)
            flags = ["--" + name.replace("_", "-"), *aliases.get(name, [])]
            for flag in flags:
                values = rule.values if rule else ()
                for value in values if flag == flags[0] else values[:2]:
                    value, context = value if isinstance(value, tuple) else (value, ())
                    cases.append(
                        pytest.param(study, name, flag, value, context, id=f"{study}{flag}-{value}")
                    )
    return cases


STUDY_CASES = study_cases()


def test_every_study_field_has_a_rule():
    """Coverage stays total: a new config field without a rule fails here."""
    missing = [
        f"{study}.{name}"
        for study in STUDIES
        for name, typ in _fields(study)
        if field_rule(study, name, typ) is None
    ]
    assert not missing, f"add invalid values for {missing} to RULES in tests/test_bad_input.py"
    stale = [
        f"{study}.{name}"
        for study, table in RULES.items()
        for name in table
        if name not in {n for n, _ in _fields(study)}
    ]
    assert not stale, f"RULES name fields that no longer exist: {stale}"


# --------------------------------------------------------------------------------------------
# Files and the checks every case makes


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The placeholders' paths: a missing file, random bytes, a NaN array, a rank-3 array and an
    empty directory."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "corrupt.npy").write_bytes(np.random.default_rng(0).bytes(200))
    np.save(root / "nan.npy", np.array([[0.5, 0.5], [np.nan, 1.0], [0.1, 0.2]]))
    np.save(root / "rank3.npy", np.ones((2, 2, 2)))
    (root / "empty").mkdir()
    return {
        "missing": str(root / "missing"),
        "corrupt": str(root / "corrupt"),
        "nan": str(root / "nan"),
        "rank3": str(root / "rank3"),
        "empty_dir": str(root / "empty"),
    }


def fill(value: str, files: dict[str, str]) -> str:
    for key, path in files.items():
        value = value.replace("{" + key + "}", path)
    return value


def value_forms(value: str) -> set[str]:
    """Ways a message may spell ``value``: as given, as a float or an int, as a tuple."""
    value = value.lstrip("=")
    forms = {value}
    try:
        f = float(value)
    except ValueError:
        pass
    else:
        forms |= {repr(f), f"{f:g}", f"{f:.3g}", str(f)}
        if math.isfinite(f) and f.is_integer():
            forms.add(str(int(f)))
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, ValueError):
        pass
    else:
        from collapse_jax.core.flags import as_tuple

        forms |= {repr(as_tuple(parsed)), str(parsed), json.dumps(parsed)}
    return forms


def name_forms(name: str, flags: tuple[str, ...] = ()) -> set[str]:
    """Ways a message may name a field: ``top_p``, ``top-p``, ``top p``, ``--top-p``."""
    forms = {name, name.replace("_", "-"), name.replace("_", " "), *flags}
    return {f.lower() for f in forms}


def check_refused(rc, err: str, name_options: set[str], value: str, out: Path | None) -> None:
    """Exit 2, one line naming the flag and the value, no traceback, no finished run."""
    assert rc == 2, f"exit code {rc}, stderr {err!r}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    line = lines[0].lower()
    assert any(n in line for n in name_options), f"{lines[0]!r} does not name {name_options}"
    forms = {f.lower() for f in value_forms(value)}
    assert any(f in line for f in forms), f"{lines[0]!r} does not name the value {value!r}"
    if out is not None:
        for f in ("summary.json", "report.md"):
            assert not (out / f).exists(), f"{out / f} written for a refused config"


def _run_must_not_start(*args, **kwargs):
    raise AssertionError("validation accepted the configuration and the study started")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``cli.main(argv)`` as the shell would see it: the exit code and stderr."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Every flag of every study


@pytest.mark.parametrize(("study", "name", "flag", "value", "context"), STUDY_CASES)
def test_study_flag_refuses_bad_value(
    study, name, flag, value, context, files, tmp_path, capsys, monkeypatch
):
    module = load_study(study)
    monkeypatch.setattr(module, "run", _run_must_not_start)
    value = fill(value, files)
    out = tmp_path / "run"
    arg = [flag + value] if value.startswith("=") else [flag, value]
    argv = ["run", study, "--out", str(out), "--no-progress", *context, *arg]
    rc, err = run_cli(argv, capsys)
    check_refused(rc, err, name_forms(name, (flag,)), value, out)


#: The flags of `collapse-jax run` itself (not config fields), tried on the discrete study.
RUN_FLAGS = {
    "--sweep": spec(
        "samples",
        "samples=",
        "nope=1,2",
        "policy=1,2",
        "samples=1,x",
        "samples=1.5",
        "samples=10,0",
        "chains=8,-1",
        "fresh_fraction=0.1,nan",
        "p0=uniform;;zipf:1",
        "verify=0.9,0.1;2,0",
    ),
    "--out": spec("{corrupt}.npy"),  # an existing file
    "--progress": Rule(("=maybe",)),
    "--no-progress": Rule(("=maybe",)),
    "--no-cache": Rule(("=maybe",)),
}
RUN_CASES = [
    pytest.param(flag, v, id=f"run{flag}-{v}")
    for flag, rule in RUN_FLAGS.items()
    for v in rule.values
]


@pytest.mark.parametrize(("flag", "value"), RUN_CASES)
def test_run_flag_refuses_bad_value(flag, value, files, tmp_path, capsys, monkeypatch):
    module = load_study("discrete")
    monkeypatch.setattr(module, "run", _run_must_not_start)
    value = fill(value, files)
    out = tmp_path / "run"
    argv = ["run", "discrete", "--chains", "8", "--generations", "5"]
    argv += [flag + value] if value.startswith("=") else [flag, value]
    if flag != "--out":
        argv += ["--out", str(out)]
    rc, err = run_cli(argv, capsys)
    check_refused(rc, err, {flag, flag.lstrip("-")}, value, out)


#: The flags of `collapse-jax demo`.
DEMO_FLAGS = {
    "--only": spec("nope", "discrete,nope", "", "vae", ","),
    "--out": spec("{corrupt}.npy"),  # an existing file
    "--no-cache": Rule(("=maybe",)),
    "--progress": Rule(("=maybe",)),
    "--no-progress": Rule(("=maybe",)),
}
DEMO_CASES = [
    pytest.param(flag, v, id=f"demo{flag}-{v}")
    for flag, rule in DEMO_FLAGS.items()
    for v in rule.values
]


@pytest.mark.parametrize(("flag", "value"), DEMO_CASES)
def test_demo_flag_refuses_bad_value(flag, value, files, tmp_path, capsys, monkeypatch):
    """Every demo study is checked before the first runs (a stub fails the test if one does)."""
    for name in cli.DEMO:
        monkeypatch.setattr(load_study(name), "run", _run_must_not_start)
    value = fill(value, files)
    out = tmp_path / "demo"
    argv = ["demo", flag + value] if value.startswith("=") else ["demo", flag, value]
    if flag != "--out":
        argv += ["--out", str(out)]
    rc, err = run_cli(argv, capsys)
    check_refused(rc, err, {flag, flag.lstrip("-")}, value, out)


def test_case_count(capsys):
    """The number of (flag, invalid value) cases over the studies (printed for the record)."""
    n_flags = sum(len(_fields(s)) for s in STUDIES)
    n_aliases = sum(len(v) for s in STUDIES for v in _aliases(s).values())
    n_lm = sum(len(t) for t in LM_RULES.values())
    total = len(STUDY_CASES) + len(RUN_CASES) + len(DEMO_CASES) + len(LM_CASES)
    with capsys.disabled():
        print(
            f"\nbad input: {n_flags} study flags + {n_aliases} aliases ({len(STUDY_CASES)} cases), "
            f"{len(RUN_FLAGS)} run flags ({len(RUN_CASES)} cases), {len(DEMO_FLAGS)} demo flags "
            f"({len(DEMO_CASES)} cases), {n_lm} lm subcommand options ({len(LM_CASES)} cases): "
            f"{n_flags + len(RUN_FLAGS) + len(DEMO_FLAGS) + n_lm} flags, {total} cases"
        )
    assert len(STUDY_CASES) >= 3 * n_flags


#: One case per study through the real `run` (no stub): refused before anything compiles.
END_TO_END = {
    "discrete": ["--chains", HUGE],
    "gaussian": ["--dim", "65"],
    "gmm": ["--components", "0"],
    "regression": ["--noise", "nan"],
    "kde": ["--bandwidth", "-1"],
    "vae": ["--latent", "0"],
    "lm": ["--top-p", "1.5"],
}


def test_end_to_end_case_per_study_covers_all():
    assert set(END_TO_END) == set(STUDIES)


@pytest.mark.parametrize("study", list(STUDIES))
def test_end_to_end_refusal(study, tmp_path, capsys):
    out = tmp_path / "run"
    flag, value = END_TO_END[study]
    rc, err = run_cli(["run", study, "--out", str(out), flag, value], capsys)
    name = flag.lstrip("-").replace("-", "_")
    check_refused(rc, err, name_forms(name, (flag,)), value, out)
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------------------------
# Experiments and demo configs


EXPERIMENTS = sorted(PROJECT_EXPERIMENTS.glob("*.toml"))


def test_experiments_exist():
    assert len(EXPERIMENTS) > 0


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_loads_and_validates(path):
    module, config, description = load_experiment(path)
    assert description, f"{path.name} has no description"
    module.validate(config)


@pytest.mark.parametrize("study", list(STUDIES))
def test_demo_config_validates(study):
    module = load_study(study)
    module.validate(module.demo_config())


# --------------------------------------------------------------------------------------------
# Every option of every `collapse-jax lm` subcommand


def lm_subcommands() -> dict[str, list[argparse.Action]]:
    from collapse_jax.families.lm import cli as lm_cli

    parser = lm_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: [a for a in p._actions if a.option_strings and a.dest != "help"]
        for name, p in sub.choices.items()
    }


#: Per subcommand option (its dest): the invalid values. "{model}" is the tiny checkpoint,
#: "{text}" a good text file; other placeholders as for the studies.
LM_COMMON = {
    "model": spec("{missing}/model", "{empty_dir}", "{no_weights}", "{truncated}", "{small_vocab}"),
    "tokenizer": spec("{missing}/tokenizer", "{empty_dir}"),
    "dtype": choice(),
    "batch_size": ints(1, huge=True),
    "out": spec("{corrupt}.npy/out.jsonl", "{empty_dir}"),
}
LM_RULES = {
    "score": {
        **LM_COMMON,
        "text_file": spec("{missing}.txt", "{empty_dir}", "{binary}"),
        "block_size": plus(ints(2, huge=True), "65"),  # max_position_embeddings is 64
    },
    "generate": {
        **LM_COMMON,
        "prompt_file": spec("{missing}.txt", "{empty_dir}", "{binary}", "{empty_file}"),
        "num_beams": ints(1, huge=True),
        "max_new_tokens": plus(ints(1, huge=True), "64"),  # prompt + 64 > 64 positions
        "min_new_tokens": plus(ints(0, huge=True), "9"),  # > max_new_tokens (8)
        "repetition_penalty": floats(0.0, open_min=True),
        "length_penalty": floats(),
        "do_sample": Rule(("=maybe",)),
        "temperature": floats(0.0, open_min=True),
        "top_k": ints(0),
        "top_p": floats(0.0, maximum=1.0),  # 0 keeps the likeliest token, as in transformers
        "seed": ints(0),
    },
}


def test_every_lm_option_has_a_rule():
    subs = lm_subcommands()
    assert set(subs) == set(LM_RULES)
    for name, actions in subs.items():
        dests = {a.dest for a in actions}
        assert dests == set(LM_RULES[name]), (name, dests ^ set(LM_RULES[name]))


def lm_cases():
    cases = []
    for command, table in LM_RULES.items():
        for dest, rule in table.items():
            for value in rule.values:
                cases.append(pytest.param(command, dest, value, id=f"{command}-{dest}-{value}"))
    return cases


LM_CASES = lm_cases()


@pytest.fixture(scope="module")
def lm_files(files, tmp_path_factory):
    """A tiny OPT checkpoint with the OPT tokenizer (64 positions), broken variants of it and
    input files."""
    import shutil

    from collapse_jax.core.paths import data_file

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok_dir = data_file("tokenizers/opt-125m")
    if tok_dir is None:
        pytest.skip("tokenizers/opt-125m not in the data directory")
    root = tmp_path_factory.mktemp("lm-bad-input")
    torch.manual_seed(0)

    def save(path, vocab):
        config = transformers.OPTConfig(
            vocab_size=vocab,
            hidden_size=8,
            num_hidden_layers=1,
            ffn_dim=16,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=8,
        )
        transformers.OPTForCausalLM(config).save_pretrained(str(path))
        for f in tok_dir.iterdir():
            shutil.copy(f, path / f.name)

    save(root / "model", 50272)
    save(root / "small_vocab", 1000)  # the tokenizer's ids reach beyond the model's vocabulary
    no_weights = root / "no_weights"
    shutil.copytree(root / "model", no_weights)
    (no_weights / "model.safetensors").unlink()
    truncated = root / "truncated"
    shutil.copytree(root / "model", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "text.txt").write_text("Model collapse is a degenerative process.\nHello\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    (root / "empty_file.txt").write_text("")
    return {
        **files,
        "model": str(root / "model"),
        "small_vocab": str(root / "small_vocab"),
        "no_weights": str(no_weights),
        "truncated": str(truncated),
        "text": str(root / "text.txt"),
        "binary": str(root / "binary.txt"),
        "empty_file": str(root / "empty_file.txt"),
    }


@pytest.mark.parametrize(("command", "dest", "value"), LM_CASES)
def test_lm_option_refuses_bad_value(command, dest, value, lm_files, tmp_path, capsys):
    from collapse_jax.families.lm import decoding, training

    value = fill(value, lm_files)
    flag = "--" + dest.replace("_", "-")
    args = {"model": lm_files["model"], "out": str(tmp_path / "out.jsonl")}
    args["text_file" if command == "score" else "prompt_file"] = lm_files["text"]
    if command == "generate":
        args["max_new_tokens"] = "8"
    args.pop(dest, None)
    argv = [command]
    for k, v in args.items():
        argv += ["--" + k.replace("_", "-"), v]
    argv += [flag + value] if value.startswith("=") else [flag, value]
    # Nothing may compile or run: the refusal comes before scoring or decoding starts.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "score_sequences", _run_must_not_start)
        mp.setattr(decoding, "generate_fn", _run_must_not_start)
        rc, err = run_cli(["lm", *argv], capsys)
    names = name_forms(dest, (flag,))
    if dest in ("model", "tokenizer"):
        names |= {"tokenizer", "model", "vocab_size"}
    check_refused(rc, err, names, value, None)
    assert not (tmp_path / "out.jsonl").exists()


def test_an_interrupt_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C during a run: one line on stderr and the shell's code for SIGINT (130)."""
    module = load_study("discrete")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    rc, err = run_cli(["run", "discrete", "--out", str(tmp_path / "run")], capsys)
    assert rc == 130
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("collapse-jax: interrupted")
