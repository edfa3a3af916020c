"""The shared foundation: policies, schedules, the scan runner, run files and the CLI."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import cli
from collapse_jax.core.errors import ConfigError
from collapse_jax.core.loop import Family, recorded_generations, run_generations
from collapse_jax.core.policies import Policy, Schedule, mix_training_data, split_batch
from collapse_jax.core.runs import read_arrays, read_json, write_arrays, write_json
from collapse_jax.core.statistics import chain_stats


def test_policy_parse_and_split():
    assert Policy.parse("replace") == Policy("replace", 1.0, 0.0, 0.0)
    assert Policy.parse("replace", 0.1) == Policy("replace", 0.9, 0.0, 0.1)
    assert Policy.parse("accumulate-subsample").accumulates
    mix = Policy.parse("mix:0.5,0.3,0.2")
    split = split_batch(101, mix)
    assert sum(int(v) for v in split) == 101 and int(split.original) == 20
    traced = jax.jit(lambda m: split_batch(m, mix))(jnp.int32(101))
    assert [int(v) for v in traced] == [int(v) for v in split]
    for bad in ("mix:0.5,0.5", "mix:0.5,0.3,0.3", "nope"):
        with pytest.raises(ConfigError):
            Policy.parse(bad)
    with pytest.raises(ConfigError, match="fresh fraction"):
        Policy.parse("replace", 1.5)
    with pytest.raises(ConfigError, match="conflicts"):
        Policy.parse("mix:0.5,0.3,0.2", 0.1)


def test_schedules(tmp_path):
    np.testing.assert_array_equal(Schedule.parse("constant").sizes(10, 3), [10, 10, 10])
    np.testing.assert_array_equal(Schedule.parse("linear").sizes(10, 3), [10, 20, 30])
    np.testing.assert_array_equal(Schedule.parse("linear:5").sizes(10, 3), [10, 15, 20])
    np.testing.assert_array_equal(Schedule.parse("poly:2").sizes(10, 3), [10, 40, 90])
    np.testing.assert_array_equal(Schedule.parse("list:3,4,5").sizes(1, 3), [3, 4, 5])
    np.save(tmp_path / "s.npy", np.array([7, 8]))
    np.testing.assert_array_equal(Schedule.parse(str(tmp_path / "s.npy")).sizes(1, 2), [7, 8])
    with pytest.raises(ConfigError, match="2 sizes but 3"):
        Schedule.parse("list:1,2").sizes(1, 3)
    with pytest.raises(ConfigError, match="< 1"):
        Schedule.parse("list:1,0").sizes(1, 2)
    with pytest.raises(ConfigError):
        Schedule.parse("cubic")


def test_chain_stats_excludes_non_finite():
    s = chain_stats(jnp.array([1.0, 3.0, jnp.inf, 2.0]))
    assert float(s.mean) == pytest.approx(2.0)
    assert float(s.stderr) == pytest.approx(np.std([1, 3, 2], ddof=1) / np.sqrt(3), rel=1e-6)
    assert float(s.finite_fraction) == pytest.approx(0.75)
    none = chain_stats(jnp.array([jnp.inf, jnp.inf]))
    assert np.isnan(none.mean) and float(none.finite_fraction) == 0.0


def test_chain_stats_quantiles_match_numpy_over_finite_entries():
    """The 10/50/90 % quantiles over chains equal NumPy's (linear interpolation) on the finite
    entries only, per column."""
    rng = np.random.default_rng(0)
    x = rng.standard_cauchy((101, 3))
    x[::7, 1] = np.inf
    x[::5, 2] = np.nan
    q = np.asarray(chain_stats(jnp.asarray(x), axis=0).quantiles)
    for c in range(3):
        col = x[:, c][np.isfinite(x[:, c])]
        np.testing.assert_allclose(q[c], np.quantile(col, [0.1, 0.5, 0.9]), rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nanquantile_sorts_by_integer_keys_like_numpy(dtype):
    """The integer-key sort orders floats exactly as NumPy does (NaN last, infinities at the
    ends, -0.0 with +0.0), and the quantiles equal jnp.nanquantile's to one unit in the last
    place, along either axis, with all-NaN rows NaN as in jnp."""
    from collapse_jax.core.loop import precision
    from collapse_jax.core.statistics import _sort_nan_last, nanquantile

    rng = np.random.default_rng(3)
    x = rng.standard_cauchy((6, 257))
    x[0, ::3] = np.nan
    x[1, :] = np.nan
    x[2, ::2], x[2, 1::2] = -0.0, 0.0
    x[3, :5] = [np.inf, -np.inf, np.nan, -np.nan, 1e-300]
    x[4] = np.round(x[4])  # ties
    x[5, :256] = np.nan  # one finite entry
    with precision(dtype == np.float64):
        a = jnp.asarray(x.astype(dtype))
        got = np.asarray(_sort_nan_last(a))
        np.testing.assert_array_equal(got, np.sort(x.astype(dtype), axis=1))
        levels = jnp.asarray((0.1, 0.5, 0.9), a.dtype)
        for axis, arr in ((1, a), (0, a.T)):
            ours = np.asarray(nanquantile(arr, levels, axis=axis))
            ref = np.asarray(jnp.nanquantile(arr, levels, axis=axis))
            assert ours.shape == ref.shape == (3, 6)
            np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
            ok = ~np.isnan(ref)
            np.testing.assert_array_max_ulp(ours[ok], ref[ok], maxulp=1)


def _random_walk():
    def init(key, scale, gen):
        return jnp.zeros(()), {"x": jnp.zeros(())}

    def step(key, x, scale, gen):
        x = x + jax.random.normal(key) * scale
        return x, {"x": x}

    return Family(init, step)


def test_runner_resumes_from_its_chunk_checkpoint(tmp_path):
    """The checkpoint holds the state after the last chunk but one; a resume continues from it
    (a shifted saved state shifts the resumed walk by exactly that amount) and, unchanged,
    reproduces the uninterrupted run bit for bit."""
    from collapse_jax.core.runs import ScanCheckpoint, read_arrays, write_arrays

    family, path = _random_walk(), tmp_path / "ckpt.npz"
    kw = dict(params=jnp.ones(8), progress=False, chunk_generations=2)
    whole = run_generations(
        family, jax.random.key(0), 8, np.ones(11), checkpoint=ScanCheckpoint(path, False, 0.0), **kw
    )
    saved = read_arrays(path)
    assert json.loads(str(saved["meta"]))["records"] == 8  # chunks of 2 generations, last unsaved
    again = run_generations(
        family, jax.random.key(0), 8, np.ones(11), checkpoint=ScanCheckpoint(path, True), **kw
    )
    np.testing.assert_array_equal(again.trace["x"].mean, whole.trace["x"].mean)
    np.testing.assert_array_equal(again.state, whole.state)
    write_arrays(path, **{**saved, "state_00000": saved["state_00000"] + 1000.0})
    shifted = run_generations(
        family, jax.random.key(0), 8, np.ones(11), checkpoint=ScanCheckpoint(path, True), **kw
    )
    np.testing.assert_allclose(shifted.state, whole.state + 1000.0, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(shifted.trace["x"].mean[:9], whole.trace["x"].mean[:9])


@pytest.mark.parametrize("record_every", [1, 3, 7])
def test_runner_recording_is_thinning_only(record_every):
    family = _random_walk()
    kw = dict(params=jnp.ones(16), progress=False)
    full = run_generations(family, jax.random.key(0), 16, np.ones(21), **kw)
    thin = run_generations(
        family,
        jax.random.key(0),
        16,
        np.ones(21),
        record_every=record_every,
        chunk_generations=6,
        **kw,
    )
    gens = recorded_generations(20, record_every)
    np.testing.assert_array_equal(thin.generations, gens)
    np.testing.assert_allclose(thin.trace["x"].mean, full.trace["x"].mean[gens], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(thin.state), np.asarray(full.state), rtol=1e-6)


def test_runner_random_walk_variance_grows_like_n():
    """x_n = z_1 + ... + z_n with independent N(0, 1) steps (one per generation key): Var x_n = n,
    checked with the standard error of a sample variance, √(2 / (N − 1)) · n."""
    chains = 4000
    family = _random_walk()._replace(reduce=lambda info: info["x"])
    res = run_generations(family, jax.random.key(1), chains, np.ones(21), jnp.ones(chains))
    x = np.asarray(res.trace)
    for n in (1, 5, 20):
        se = np.sqrt(2 / (chains - 1)) * n
        assert abs(x[n].var(ddof=1) - n) <= 4 * se, (n, x[n].var(ddof=1))


def test_runner_shards_chains_over_host_devices():
    res = run_generations(
        _random_walk(), jax.random.key(0), 16, np.ones(5), jnp.ones(16), progress=False
    )
    assert len(jax.devices()) == 8  # conftest forces 8 host devices
    assert len(res.state.sharding.device_set) == 8


def test_mix_training_data_policies():
    rng = np.random.default_rng(0)
    original = np.arange(100)[:, None]
    model = lambda n: np.full((n, 1), -1)  # noqa: E731
    train, pool = mix_training_data(rng, Policy.parse("replace", 0.2), 50, model, None, original)
    assert train.shape == (50, 1) and pool is None
    assert (train == -1).sum() == 40 and (train >= 0).sum() == 10
    train2, pool = mix_training_data(rng, Policy.parse("accumulate"), 50, model, train, original)
    assert len(train2) == 100 and len(pool) == 100
    train3, pool = mix_training_data(
        rng, Policy.parse("accumulate-subsample"), 50, model, train2, original, pool
    )
    assert len(train3) == 50 and len(pool) == 150


def test_atomic_writes_and_corrupt_files(tmp_path):
    write_json(
        tmp_path / "a.json", {"x": np.float32(1.5), "inf": float("inf"), "arr": np.arange(3)}
    )
    assert read_json(tmp_path / "a.json") == {"x": 1.5, "inf": "inf", "arr": [0, 1, 2]}
    write_arrays(tmp_path / "m.npz", a=np.arange(4))
    np.testing.assert_array_equal(read_arrays(tmp_path / "m.npz")["a"], np.arange(4))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="corrupt"):
        read_arrays(tmp_path / "bad.npz")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="corrupt"):
        read_json(tmp_path / "bad.json")
    # A failure while writing leaves neither a partial file nor a temporary behind.
    with pytest.raises(TypeError):
        write_json(tmp_path / "c.json", {"x": object()})
    assert not (tmp_path / "c.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--p0=0.5,0.6"], "p0 must sum to 1"),
        (["--p0=-0.5,1.5"], "negative entry -0.5"),
        (["--states", "1"], "states must be >= 2"),
        (["--samples", "0"], "samples must be >= 1"),
        (["--chains", "0"], "chains must be >= 1"),
        (["--policy", "sometimes"], "unknown policy 'sometimes'"),
        (["--fresh-fraction", "1.5"], "fresh fraction must be <= 1.0"),
        (["--fresh-fraction", "-0.1"], "fresh fraction must be >= 0.0"),
        (["--p0=0.5,nan"], "non-finite"),
    ],
)
def test_cli_bad_input_one_line_error(args, message, capsys, tmp_path):
    rc = cli.main(["run", "discrete", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_run_writes_required_summary(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(
        [
            "run",
            "discrete",
            "--out",
            str(out),
            "--states",
            "4",
            "--samples",
            "10",
            "--chains",
            "32",
            "--generations",
            "60",
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "p0",
        "absorbed_fraction",
        "absorbed_state_freq",
        "absorption_time_mean",
        "absorption_time_stderr",
    ):
        assert key in summary
    for key in ("heterozygosity", "entropy", "support_size"):
        assert set(summary[key]) >= {"generation", "mean", "stderr"}
        assert summary[key]["generation"][0] == 0
    assert summary["support_size"]["mean"][0] == 4.0  # generation 0 is p0 itself
    for f in ("config.json", "metrics.npz", "report.md", "theory.png", "metrics.png"):
        assert (out / f).exists(), f
    assert "| claim | theory | Monte Carlo ± stderr | agrees? |" in (out / "report.md").read_text()


def test_cli_sweep_and_experiments(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = cli.main(
        [
            "run",
            "discrete",
            "--out",
            str(out),
            "--states",
            "3",
            "--samples",
            "8",
            "--chains",
            "16",
            "--generations",
            "10",
            "--no-progress",
            "--sweep",
            "samples=8,16",
        ]
    )
    assert rc == 0
    assert (out / "samples=8" / "summary.json").exists()
    assert (out / "samples=16" / "summary.json").exists()
    assert (out / "sweep.png").exists()
    assert cli.main(["run", "discrete", "--sweep", "policy=1,2", "--out", str(out)]) == 2
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "discrete_two_states" in listing
    toml = tmp_path / "bad.toml"
    toml.write_text('study = "discrete"\n[config]\nstatez = 3\n')
    assert cli.main(["run", str(toml)]) == 2
    assert "unknown config key(s) statez" in capsys.readouterr().err


def test_demo_combines_every_study_report(tmp_path, monkeypatch, capsys):
    """`collapse-jax demo` runs each demo study and writes one report linking their figures
    (studies shrunk here; the real demo configs are exercised by each study's own smoke test)."""
    import dataclasses

    shrink = {"chains": 8, "generations": 6, "record_every": 1}
    for name in cli.DEMO:
        module = cli.load_study(name)
        small = dataclasses.replace(
            module.demo_config(),
            **{
                k: v
                for k, v in shrink.items()
                if k in {f.name for f in dataclasses.fields(module.Config)}
            },
        )
        monkeypatch.setattr(module, "demo_config", lambda small=small: small)
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for name in cli.DEMO:
        assert f"## {name}:" in report
        assert (tmp_path / name / "summary.json").exists()
    for link in [part.split(")")[0] for part in report.split("](")[1:]]:
        assert (tmp_path / link).exists(), link


@pytest.mark.parametrize(("flags", "expected"), [([], None), (["--no-progress"], False),
                                               (["--progress"], True)])  # fmt: skip
def test_demo_passes_the_progress_flag_to_every_study(tmp_path, monkeypatch, flags, expected):
    """`collapse-jax demo --no-progress` hides every study's progress display, `--progress`
    shows it, and without either flag each study decides (a terminal or not)."""
    seen = {}

    def fake_run(name):
        def run(config, out, *, progress=None):
            seen[name] = progress
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "report.md").write_text(f"# {name}\n\nbody\n")

        return run

    for name in cli.DEMO:
        monkeypatch.setattr(cli.load_study(name), "run", fake_run(name))
    assert cli.main(["demo", "--out", str(tmp_path), *flags]) == 0
    assert seen == {name: expected for name in cli.DEMO}


def test_every_scan_study_records_every_generation_by_default():
    """Recording defaults agree across studies: no generation silently dropped unless the user
    thins the record with --record-every."""
    from collapse_jax.families import STUDIES, load_study

    for name in STUDIES:
        config = load_study(name).Config()
        if hasattr(config, "record_every"):
            assert config.record_every == 1, name


def test_sweep_over_a_text_field_separates_values_by_semicolons(tmp_path):
    """Text fields sweep with ';' (their values may hold commas, e.g. verify=TPR,FPR): one run
    per value, each with its own configuration."""
    from collapse_jax.core.experiments import parse_sweep
    from collapse_jax.families.discrete import study as dstudy

    field, values = parse_sweep("verify=0.9,0.1; 0.9,0.5", dstudy.Config())
    assert field == "verify" and values == ["0.9,0.1", "0.9,0.5"]
    argv = ["run", "discrete", "--states", "4", "--chains", "8", "--generations", "2",
            "--good", "0-1", "--verify", "0.9,0.3", "--sweep", "verify=0.9,0.1;0.9,0.5",
            "--out", str(tmp_path),
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    for v in values:
        cfg = read_json(tmp_path / f"verify={v}" / "config.json")
        assert cfg["config"]["verify"] == v


def test_config_flag_help_comes_from_field_comments_when_help_is_printed():
    import dataclasses

    from collapse_jax.core import flags
    from collapse_jax.core.operators import OperatorFields

    @dataclasses.dataclass(frozen=True)
    class HelpConfig(OperatorFields):
        rate: float = 0.5  # fraction kept, in % of the batch
        steps: int = 3  # how many steps

    flags.field_comments.cache_clear()
    parser = flags.Parser(prog="p")
    flags.add_config_arguments(parser, HelpConfig)
    args = parser.parse_args(["--rate", "0.25"])
    assert flags.flag_updates(args, HelpConfig) == {"rate": 0.25}
    # Parsing never reads the class source; formatting help does.
    assert flags.field_comments.cache_info().currsize == 0
    text = " ".join(parser.format_help().split())
    assert "--rate RATE fraction kept, in % of the batch" in text
    assert "--steps STEPS how many steps" in text
    inherited = dataclasses.fields(OperatorFields)[0].name.replace("_", "-")
    assert f"--{inherited}" in text
    comment = flags.field_comments(OperatorFields)[dataclasses.fields(OperatorFields)[0].name]
    assert comment and " ".join(comment.split()) in text
    assert flags.field_comments.cache_info().currsize >= 1
