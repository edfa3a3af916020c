"""The discrete resampling process against its closed forms (tolerances from MC standard errors)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from collapse_jax.core.binomial import binom_pmf
from collapse_jax.core.errors import ConfigError
from collapse_jax.core.loop import run_generations
from collapse_jax.core.policies import Policy
from collapse_jax.families.discrete import kernel as proc
from collapse_jax.families.discrete import study as study
from collapse_jax.families.discrete import theory as wf
from collapse_jax.families.discrete.metrics import discrete_metrics

Z = 4.0  # agreement within Z standard errors


def per_chain(
    p0, m, chains, generations, *, policy=None, method="counts", seed=0, compact=True, sizes=None
):
    """Run chains and keep every chain's metrics (no reduction)."""
    policy = policy or Policy()
    p0 = np.asarray(p0)
    sizes = np.full(generations, m) if sizes is None else np.asarray(sizes)
    family = proc.make_family(policy, method, max_size=int(sizes.max()))
    res = run_generations(
        family._replace(
            reduce=lambda info: info.metrics,
            between_chunks=family.between_chunks if compact else None,
        ),
        jax.random.key(seed),
        chains,
        np.concatenate([sizes, sizes[-1:]]),
        proc.discrete_params(p0, chains),
        chunk_generations=50,
        progress=False,
    )
    return res


def assert_close(mc, se, theory, what):
    assert abs(mc - theory) <= Z * se, f"{what}: MC {mc:.6g} ± {se:.3g} vs theory {theory:.6g}"


@pytest.mark.parametrize("method", ["counts", "samples"])
def test_heterozygosity_decay(method):
    p0, m, n = np.array([0.4, 0.3, 0.2, 0.1]), 30, 24
    res = per_chain(p0, m, 3000, n, method=method, seed=1)
    het = np.asarray(res.trace.heterozygosity)  # (gens + 1, chains)
    theory = wf.expected_heterozygosity(p0, np.full(n, m))
    h0 = 1 - (p0**2).sum()
    np.testing.assert_allclose(theory, h0 * (1 - 1 / m) ** np.arange(n + 1), rtol=1e-12)
    for g in (1, 6, 12, 24):
        x = het[g]
        assert_close(x.mean(), x.std(ddof=1) / np.sqrt(x.size), theory[g], f"E[H_{g}] {method}")


def test_absorption_probabilities_and_time():
    p0, m = np.array([0.5, 0.3, 0.2]), 50
    res = per_chain(p0, m, 2000, 1500, seed=2)
    at = np.asarray(res.state.absorbed_at)
    where = np.asarray(res.state.absorbed_state)
    assert (at > 0).all(), "every chain is absorbed well before 1500 generations"
    freq = np.bincount(where, minlength=3) / len(where)
    for i in range(3):
        assert_close(freq[i], np.sqrt(p0[i] * (1 - p0[i]) / len(where)), p0[i], f"P(absorb at {i})")
    # Mean absorption time: within a few percent of the diffusion formula (M >= 50).
    t_diff = wf.diffusion_absorption_time(p0, m)
    se = at.std(ddof=1) / np.sqrt(at.size)
    assert abs(at.mean() - t_diff) <= 0.05 * t_diff + Z * se, (at.mean(), se, t_diff)


def test_two_state_absorption_time_exact_and_diffusion():
    m = 50
    exact = wf.exact_two_state_absorption_time(0.5, m)
    diff = wf.diffusion_absorption_time([0.5, 0.5], m)
    assert abs(exact - diff) / diff < 0.03  # the diffusion approximation is within a few percent
    res = per_chain([0.5, 0.5], m, 2000, 1200, seed=3)
    at = np.asarray(res.state.absorbed_at)
    assert (at > 0).all()
    assert_close(at.mean(), at.std(ddof=1) / np.sqrt(at.size), exact, "exact K=2 absorption time")


@pytest.mark.parametrize(
    "policy", [Policy(), Policy.parse("replace", fresh_fraction=0.25)], ids=["replace", "fresh"]
)
def test_expected_support_exact(policy):
    p0 = proc.initial_distribution("zipf:1.2", 6)
    m, n = 40, 40
    res = per_chain(p0, m, 3000, n, policy=policy, seed=4)
    sup = np.asarray(res.trace.support_size)
    theory = wf.expected_support(p0, np.full(n, m), policy)
    for g in (1, 5, 20, 40):
        x = sup[g]
        se = max(x.std(ddof=1), 1e-12) / np.sqrt(x.size)
        assert_close(x.mean(), se, theory[g], f"E[support_{g}]")


def test_mix_policy_heterozygosity():
    p0 = np.array([0.25, 0.25, 0.2, 0.2, 0.1])
    policy = Policy.parse("mix:0.6,0.2,0.2")
    m, n = 25, 30
    res = per_chain(p0, m, 3000, n, policy=policy, seed=5)
    het = np.asarray(res.trace.heterozygosity)
    theory = wf.expected_heterozygosity(p0, np.full(n, m), policy)
    for g in (1, 2, 10, 30):
        x = het[g]
        assert_close(x.mean(), x.std(ddof=1) / np.sqrt(x.size), theory[g], f"mix E[H_{g}]")


def test_samples_and_counts_agree_in_distribution():
    p0 = proc.initial_distribution("zipf:1.0", 8)
    g = 25
    a = np.asarray(per_chain(p0, 30, 3000, g, method="counts", seed=6).trace.support_size[g])
    b = np.asarray(per_chain(p0, 30, 3000, g, method="samples", seed=7).trace.support_size[g])
    values = np.union1d(a, b)
    table = np.array([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]])
    table = table[:, table.sum(0) >= 5]
    p = stats.chi2_contingency(table).pvalue
    assert p > 1e-3, f"support-size distributions differ (chi-square p = {p:.2e})"


def test_schedule_heterozygosity_product_form():
    p0 = np.array([0.5, 0.5])
    sizes = np.array([10, 20, 30, 40, 50, 60])
    res = per_chain(p0, 10, 4000, 6, sizes=sizes, seed=8)
    het = np.asarray(res.trace.heterozygosity)
    theory = wf.expected_heterozygosity(p0, sizes)
    np.testing.assert_allclose(theory[1:], 0.5 * np.cumprod(1 - 1 / sizes), rtol=1e-12)
    for n in range(1, 7):
        x = het[n]
        assert_close(x.mean(), x.std(ddof=1) / np.sqrt(x.size), theory[n], f"schedule E[H_{n}]")


@pytest.mark.parametrize("mode", ["accumulate", "accumulate-subsample"])
def test_accumulate_policies_keep_sizes(mode):
    policy = Policy.parse(mode)
    p0 = np.full(5, 0.2)
    res = per_chain(p0, 20, 256, 10, policy=policy, seed=9, compact=False)
    totals = np.asarray(res.state.counts).sum(-1)
    expected = 20 * 11 if mode == "accumulate" else 20
    assert (totals == expected).all()
    # Accumulating real and synthetic data slows the loss of diversity relative to replace:
    # heterozygosity at generation 10 is higher, by more than 4 standard errors of the difference.
    rep = np.asarray(per_chain(p0, 20, 256, 10, seed=10, compact=False).trace.heterozygosity)[-1]
    acc = np.asarray(res.trace.heterozygosity)[-1]
    se = np.sqrt(acc.var(ddof=1) / acc.size + rep.var(ddof=1) / rep.size)
    assert acc.mean() - rep.mean() > 4 * se, (acc.mean(), rep.mean(), se)


def test_compaction_preserves_metrics():
    policy = Policy()
    counts = jnp.zeros((2, 16), jnp.int32)
    counts = counts.at[0, jnp.array([1, 3, 6])].set(jnp.array([5, 3, 2]))
    counts = counts.at[1, jnp.array([0, 6])].set(jnp.array([1, 9]))
    p0 = jnp.full((2, 16), 1 / 16)
    state = proc.DiscreteState(
        counts=counts,
        pool=jnp.zeros_like(counts),
        p0=p0,
        index=jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1)),
        p0_dropped=jnp.zeros(2),
        absorbed_at=-jnp.ones(2, jnp.int32),
        absorbed_state=-jnp.ones(2, jnp.int32),
    )
    small = proc.compact(state, 0.0, policy)
    assert small.counts.shape == (2, 4)
    for c in range(2):
        full = discrete_metrics(counts[c] / counts[c].sum(), p0[c])
        comp = discrete_metrics(
            small.counts[c] / small.counts[c].sum(), small.p0[c], small.p0_dropped[c]
        )
        for a, b in zip(full, comp, strict=True):
            if a is None:  # an operator metric, off here
                assert b is None
                continue
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(small.index[0]), [1, 3, 6, 0])
    # Shrinking by less than a factor of 4 is not worth a recompilation.
    assert proc.compact(small, 0.0, policy).counts.shape == (2, 4)


def test_metrics_never_nan_and_kl_infinite_once_state_dies():
    m = discrete_metrics(jnp.array([0.0, 1.0, 0.0]), jnp.array([0.2, 0.5, 0.3]))
    assert np.isinf(m.kl_p0_model) and np.isfinite(m.kl_model_p0)
    assert float(m.is_delta) == 1.0 and float(m.tail_mass_kept) == pytest.approx(0.5)
    assert float(m.total_variation) == pytest.approx(0.5)
    summary_fraction = per_chain([0.5, 0.5], 4, 64, 30, seed=10)
    kl = np.asarray(summary_fraction.trace.kl_p0_model)
    assert not np.isnan(kl).any()


def test_same_seed_same_results_and_record_every(tmp_path):
    cfg = study.Config(
        states=6, p0="zipf:1.0", samples=20, chains=64, generations=40, seed=3, compact="off"
    )
    a = study.run(cfg, tmp_path / "a", progress=False)
    b = study.run(cfg, tmp_path / "b", progress=False)
    assert a["heterozygosity"] == b["heterozygosity"]
    assert a["absorbed_state_freq"] == b["absorbed_state_freq"]
    c = study.run(
        study.Config(**{**cfg.__dict__, "record_every": 7}), tmp_path / "c", progress=False
    )
    gens = c["heterozygosity"]["generation"]
    assert gens == [0, 7, 14, 21, 28, 35, 40]
    # Per-generation keys are fold_in(chain, generation): thinning the record changes nothing.
    full = dict(zip(a["heterozygosity"]["generation"], a["heterozygosity"]["mean"], strict=True))
    for g, v in zip(gens, c["heterozygosity"]["mean"], strict=True):
        assert v == pytest.approx(full[g], rel=1e-6)


def test_initial_distributions(tmp_path):
    np.testing.assert_allclose(proc.initial_distribution("uniform", 4), 0.25)
    z = proc.initial_distribution("zipf:1.0", 3)
    np.testing.assert_allclose(z, np.array([1, 1 / 2, 1 / 3]) / (11 / 6))
    d = proc.initial_distribution("dirichlet:0.5", 10)
    assert d.shape == (10,) and abs(d.sum() - 1) < 1e-12
    np.testing.assert_allclose(proc.initial_distribution("0.5,0.3,0.2"), [0.5, 0.3, 0.2])
    np.save(tmp_path / "p.npy", np.array([0.1, 0.9]))
    np.testing.assert_allclose(proc.initial_distribution(str(tmp_path / "p.npy")), [0.1, 0.9])


@pytest.mark.parametrize(
    ("field", "values"), [("samples", [10, 40]), ("fresh_fraction", [0.0, 0.3])]
)
def test_vmapped_sweep_matches_theory_per_value(field, values, tmp_path):
    cfg = study.Config(
        states=4, p0="0.4,0.3,0.2,0.1", samples=20, chains=1500, generations=12, seed=11
    )
    summaries = study.run_sweep(cfg, field, values, tmp_path, progress=False)
    assert summaries is not None and len(summaries) == len(values)
    p0 = np.array([0.4, 0.3, 0.2, 0.1])
    for v, s in zip(values, summaries, strict=True):
        m = v if field == "samples" else 20
        policy = Policy.parse("replace", v if field == "fresh_fraction" else 0.0)
        theory = wf.expected_heterozygosity(p0, np.full(12, m), policy)
        het = s["heterozygosity"]
        for g in (1, 6, 12):
            assert_close(het["mean"][g], het["stderr"][g], theory[g], f"{field}={v} E[H_{g}]")
        assert (tmp_path / f"{field}={v}" / "report.md").exists()


def test_censored_absorption_times_against_exact_chain():
    """K = 2, a horizon too short for every chain to be absorbed: the censored fraction is
    1 − P(T <= G) and the restricted mean E[min(T, G)] is Σ_{n<G} P(T > n), both from the exact
    binomial chain, within 4 standard errors."""
    cfg = study.Config(
        states=2, p0="0.3,0.7", samples=30, chains=4096, generations=40, method="counts"
    )
    s = study.run(cfg, None, progress=False)
    cdf = wf.exact_two_state_absorption_cdf(0.3, 30, 40)
    censored = 1.0 - cdf[-1]
    se_c = np.sqrt(censored * (1 - censored) / cfg.chains)
    assert abs(s["censored_fraction"] - censored) < 4 * se_c
    assert 0.05 < censored < 0.95  # the horizon censors a real fraction
    restricted = float(np.sum(1.0 - cdf[:-1]))
    z = (s["absorption_time_restricted_mean"] - restricted) / s["absorption_time_restricted_stderr"]
    assert abs(z) < 4, z
    # Absorption by generation n ("ever") is the exact CDF P(T <= n) at every generation; under
    # replace a delta is absorbing, so the fraction that is a delta now is the same number.
    ever = np.asarray(s["absorbed_ever"]["mean"])
    assert s["absorbed_ever"]["generation"] == list(range(41))
    se = np.sqrt(cdf * (1 - cdf) / cfg.chains)
    np.testing.assert_array_less(np.abs(ever - cdf), 4 * se + 1e-12)
    np.testing.assert_array_equal(np.asarray(s["is_delta"]["mean"]), ever)


def test_delta_now_is_not_absorbing_under_accumulate_subsample():
    """Under accumulate-subsample a training set that is one state's copies can regain states
    from the pool, so "a delta now" falls below "a delta by generation n" (each a fraction of
    chains; the gap beyond 4 standard errors of a difference of proportions)."""
    cfg = study.Config(
        states=2,
        p0="0.5,0.5",
        samples=10,
        chains=2000,
        generations=60,
        policy="accumulate-subsample",
        method="counts",
    )
    s = study.run(cfg, None, progress=False)
    now, ever = s["is_delta"]["mean"][-1], s["absorbed_ever"]["mean"][-1]
    se = np.sqrt(now * (1 - now) / cfg.chains + ever * (1 - ever) / cfg.chains)
    assert ever - now > 4 * se, (now, ever)
    assert np.all(np.diff(s["absorbed_ever"]["mean"]) >= 0)  # "ever" never decreases


def test_report_claims_agree_with_theory():
    """The discrete report's theory rows (heterozygosity, support size, absorption
    probabilities, the diffusion absorption time with its stated model error) are all present
    and all agree on a run where every chain is absorbed."""
    cfg = study.Config(states=3, p0="0.5,0.3,0.2", samples=10, chains=2000, generations=120)
    s = study.run(cfg, None, progress=False)
    assert s["absorbed_fraction"] == 1.0
    kinds = {c["claim"].split(",")[0].split(" (")[0] for c in s["checks"]}
    assert {
        "E[Het_n] = E[1 − Σ p_n²]",
        "E[support_n]",
        "P(absorbed at state 0) = p0(0)",
        "mean absorption time ≈ −2M Σ(1−p)ln(1−p)",
    } <= kinds, kinds
    bad = [c for c in s["checks"] if not c["agrees"]]
    assert not bad, bad


def test_auto_method_by_batch_size():
    """method = auto: draw-and-recount up to AUTO_SAMPLES_MAX points per generation, the exact
    multinomial above; the summary and report say which ran."""
    assert study.resolve_method("auto", study.AUTO_SAMPLES_MAX) == "samples"
    assert study.resolve_method("auto", study.AUTO_SAMPLES_MAX + 1) == "counts"
    assert study.resolve_method("counts", 10) == "counts"
    s = study.run(study.Config(states=3, samples=20, chains=8, generations=2), None, progress=False)
    assert s["method"] == "samples"
    s = study.run(
        study.Config(states=3, samples=20, chains=8, generations=2, schedule="list:20,300,20"),
        None,
        progress=False,
    )
    assert s["method"] == "counts"


def test_vmapped_sweep_reports_the_method_its_chains_were_drawn_with(tmp_path):
    """A vmapped sweep over M runs every value in one program, so ``auto`` resolves from the
    largest M of the sweep: above AUTO_SAMPLES_MAX every value is drawn by ``counts`` (and
    compacted), the small-M value included. Its summary and report say so, and its arrays are
    those of a run of that value alone with method counts, not with samples."""
    big = study.AUTO_SAMPLES_MAX + 1
    cfg = study.Config(states=3, samples=20, chains=8, generations=40)
    summaries = study.run_sweep(cfg, "samples", [20, big], tmp_path, progress=False)
    assert [(s["method"], s["compacted"]) for s in summaries] == [("counts", True)] * 2
    assert "method `counts` (auto)" in (tmp_path / "samples=20" / "report.md").read_text()
    with np.load(tmp_path / "samples=20" / "metrics.npz") as z:
        swept = dict(z)
    assert (swept["absorbed_at"] >= 0).any()  # the per-chain absorption times tell draws apart
    alone = {}
    for method in ("counts", "samples"):
        study.run(dataclasses.replace(cfg, method=method), tmp_path / method, progress=False)
        with np.load(tmp_path / method / "metrics.npz") as z:
            # the chain means are summed in another order over the devices: float rounding only
            alone[method] = [
                np.array_equal(swept["absorbed_at"], z["absorbed_at"]),
                np.allclose(swept["heterozygosity_mean"], z["heterozygosity_mean"], rtol=1e-5),
            ]
    assert alone == {"counts": [True, True], "samples": [False, False]}


def test_binomial_pmf_of_the_theory_equals_scipys():
    """The closed forms' binomial pmf (log-factorial form, to keep SciPy out of every run's
    imports) equals scipy.stats.binom.pmf to 1e-10 relative wherever SciPy's value is above
    1e-250, including p in {0, 1}, p within 1e-9 of them, and n up to 2000."""
    for n in (1, 2, 7, 100, 1000, 2000):
        k = np.arange(n + 1)[None, :]
        p = np.concatenate([[0.0, 1.0, 1e-9, 1 - 1e-9], np.linspace(0, 1, 23)])[:, None]
        ours, ref = binom_pmf(k, n, p), stats.binom.pmf(k, n, p)
        np.testing.assert_array_equal(ours[ref == 0] == 0, True)
        big = ref > 1e-250
        np.testing.assert_allclose(ours[big], ref[big], rtol=1e-10, atol=0)
        np.testing.assert_allclose(ours.sum(1), 1.0, rtol=1e-11)


def test_automatic_compaction_follows_what_each_method_costs(tmp_path):
    """``compact = auto`` compacts under the multinomial (cost ∝ live states) and under
    draw-and-recount only when K > M (most states die at once); ``on``/``off`` are obeyed; the
    run's summary says which applied, and bad values are refused naming the value."""
    assert study.resolve_compact("auto", "counts", 20, 1000)
    assert not study.resolve_compact("auto", "samples", 20, 100)
    assert study.resolve_compact("auto", "samples", 300, 100)
    assert study.resolve_compact("on", "samples", 20, 100)
    assert not study.resolve_compact("off", "counts", 50, 1000)
    base = dict(states=6, p0="zipf:1.0", samples=20, chains=8, generations=3)
    for compact, method, expected in (("auto", "auto", False), ("auto", "counts", True)):
        cfg = study.Config(**base, compact=compact, method=method)
        out = study.run(cfg, tmp_path / f"{compact}-{method}", progress=False)
        assert out["compacted"] is expected
    with pytest.raises(ConfigError, match="'yes'"):
        study.validate(study.Config(**base, compact="yes"))


def test_counts_compiler_options_change_no_draw():
    """The ``counts`` method's programs carry XLA:CPU emitter options (faster to compile); the
    chains' counts, absorption generations and states are the same bits without them."""
    if jax.default_backend() != "cpu":
        pytest.skip("the emitter options are XLA:CPU's; other backends get none")
    policy, sizes = Policy(), np.full(41, 300)
    family = proc.make_family(policy, "counts", max_size=300)
    assert dict(family.compiler_options) == {"xla_cpu_use_fusion_emitters": False}
    assert proc.make_family(policy, "samples", max_size=300).compiler_options == ()
    runs = []
    for options in (family.compiler_options, ()):
        res = run_generations(
            family._replace(compiler_options=options),
            jax.random.key(5),
            64,
            sizes,
            proc.discrete_params(np.full(12, 1 / 12), 64),
            chunk_generations=20,
            progress=False,
        )
        runs.append(res.state)
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_counts_method_runs_where_xla_lacks_its_emitter_option(monkeypatch):
    """An XLA that has dropped the emitter flag (XLA:CPU in JAX 0.11 refuses to compile with
    ``xla_cpu_use_fusion_emitters``) gets a family without options, whose run still works;
    an XLA that knows the flag keeps it."""
    if jax.default_backend() != "cpu":
        pytest.skip("the emitter options are XLA:CPU's; other backends get none")
    from collapse_jax.core.loop import supported_compiler_options

    assert supported_compiler_options(proc.COUNTS_CPU_OPTIONS) == proc.COUNTS_CPU_OPTIONS
    unknown = (("xla_cpu_no_such_option_in_any_xla", False),)
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_cpu_no_such_option"):
        jax.jit(lambda x: x + 1, compiler_options=dict(unknown)).lower(1.0).compile()
    monkeypatch.setattr(proc, "COUNTS_CPU_OPTIONS", unknown)
    proc.make_family.cache_clear()
    try:
        family = proc.make_family(Policy(), "counts", max_size=50)
        assert family.compiler_options == ()
        res = run_generations(
            family,
            jax.random.key(2),
            8,
            np.full(6, 50),
            proc.discrete_params(np.full(5, 0.2), 8),
            progress=False,
        )
        assert (np.asarray(res.state.counts).sum(-1) == 50).all()
    finally:
        proc.make_family.cache_clear()


def test_all_alive_fraction_in_the_figures_matches_inclusion_exclusion(tmp_path, monkeypatch):
    """The figures' "every p0 state alive" series (where KL(p0 ‖ p_n) is finite; once no chain
    keeps every state, the KL panel is empty and this says why) is the saved finite fraction:
    1 at generation 0, never rising under ``replace``, and at generation 1 equal, within 4
    binomial standard errors, to P(no state's count is 0) of one multinomial(M, p0) draw by
    inclusion-exclusion, Σ_S (−1)^|S| (1 − p0(S))^M."""
    import itertools

    from collapse_jax.core import report as rep
    from collapse_jax.families.discrete import report as discrete_report

    p0 = np.array([0.4, 0.3, 0.2, 0.1])
    cfg = study.Config(
        states=4, p0="0.4,0.3,0.2,0.1", samples=10, chains=4000, generations=6, record_every=1
    )
    panels = {}

    def capture(path, these, **kw):
        panels[path.name] = these

    monkeypatch.setattr(rep, "curves_figure", capture)
    study.run(cfg, tmp_path / "run", progress=False)
    discrete_report.make_figures(tmp_path / "run")
    fractions = next(p for p in panels["metrics.png"] if p["title"] == "fraction of chains")
    alive = fractions["series"][2]
    saved = np.load(tmp_path / "run" / "metrics.npz")
    g = saved["generation"]
    np.testing.assert_array_equal(alive["mean"], saved["kl_p0_model_finite_fraction"])
    f = alive["mean"]
    np.testing.assert_allclose(alive["stderr"], np.sqrt(f * (1 - f) / cfg.chains))
    assert g[0] == 0 and f[0] == 1.0
    assert np.all(np.diff(f) <= 0)
    exact = sum(
        (-1) ** r * (1 - p0[list(s)].sum()) ** cfg.samples
        for r in range(len(p0) + 1)
        for s in itertools.combinations(range(len(p0)), r)
    )
    se = np.sqrt(exact * (1 - exact) / cfg.chains)
    assert g[1] == 1 and abs(f[1] - exact) < 4 * se, (f[1], exact, se)
    kl_panel = next(p for p in panels["metrics.png"] if p["title"].startswith("KL(p0"))
    assert kl_panel["note"] is None  # some chain keeps every state in two or more generations
    note = discrete_report.infinite_note(np.array([0, 2, 4]), np.array([1.0, 0.0, 0.0]))
    assert "by generation 2" in note
    assert discrete_report.infinite_note(np.array([0, 2, 4]), np.array([1.0, 0.5, 0.0])) is None


@pytest.mark.parametrize(
    ("p", "n"),
    [
        (np.arange(1, 21) ** -1.1, 100),  # the demo config's Zipf law, every draw counted
        (np.array([0.3, 0.0, 0.2, 0.25, 0.25, 0.0]), 37),  # dead states, the last one too
        (np.full(70, 1.0), 90),  # more states than compare_all takes: the scanning search
    ],
)
def test_samples_method_counts_its_inverse_cdf_draws(monkeypatch, p, n):
    """The ``samples`` method's counts are those of NumPy's ``searchsorted`` over the same
    uniforms (the first n of max_size) and ``bincount``: exactly, draws that land on a
    zero-probability state (u == cdf[-1] in floating point) moved to the most probable state.
    The uniforms include 0 and the boundary 1 (u == cdf[-1])."""
    max_size = 120
    p = jnp.asarray(p / p.sum(), jnp.float32)
    rng = np.random.default_rng(3)
    u01 = rng.random(max_size).astype(np.float32)
    u01[[0, 5, 11]] = [0.0, 1.0, 1.0]  # the boundary draws, all among the first n
    monkeypatch.setattr(proc, "uniforms", lambda key, size, dtype: jnp.asarray(u01, dtype))
    got = np.asarray(proc._sample_model(jax.random.key(0), n, p, "samples", max_size))

    pn = np.asarray(p)
    cdf = np.asarray(jnp.cumsum(p))  # the same float32 sums as the kernel's
    u = (u01 * cdf[-1])[:n]
    draws = np.minimum(np.searchsorted(cdf, u, side="right"), pn.size - 1)
    draws = np.where(pn[draws] > 0, draws, np.argmax(pn))
    want = np.bincount(draws, minlength=pn.size)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == n and (got[pn == 0] == 0).all()
