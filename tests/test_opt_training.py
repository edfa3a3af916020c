"""Training of the OPT port: loss, no recompiles, sharding, accumulation, per-sequence scores."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collapse_jax.core import training as T
from collapse_jax.core.errors import ConfigError
from collapse_jax.families.lm import training as LT
from collapse_jax.families.lm.opt import (
    OPTConfig,
    init_params,
    model_logits,
    stack_layers,
    unstack_layers,
)

TINY = OPTConfig(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=1,
    ffn_dim=48,
    num_attention_heads=4,
    max_position_embeddings=64,
)
OPT_CFG = T.OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=6)


@pytest.fixture(scope="module")
def params():
    return jax.device_get(jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0)))


@pytest.fixture(scope="module")
def reference(params):
    """One device, no dropout, the same batch three times: (losses, params, step)."""
    return train(params, jax.devices()[:1], batches(1) * 3, dropout=False)


def batches(n_steps=4, batch=16, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY.vocab_size, size=(n_steps, batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, 3, -5:] = 0  # right padding
    mask[:, 5, :4] = 0  # left padding
    ids[mask == 0] = TINY.pad_token_id
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(n_steps)]


def train(params, devices, data, *, accum=1, dropout=True, remat=False, attention="auto"):
    mesh = T.make_mesh(devices=devices)
    cfg = dataclasses.replace(OPT_CFG, grad_accum_steps=accum)
    apply_fn = LT.opt_apply_fn(TINY, remat=remat, attention=attention)
    state, step = LT.make_lm_train_step(apply_fn, cfg, params, mesh, dropout=dropout)
    losses = []
    for i, b in enumerate(data):
        state, info = step(state, T.shard_batch(b, mesh), jax.random.key(i))
        losses.append(float(info.loss))
    return np.array(losses), jax.device_get(state.params), step


def assert_params_close(p1, p2):
    """Parameters agree to float tolerance, except the attention key biases: their exact
    gradient is zero (a constant added to every key's score cancels in the softmax), so what
    they get is rounding noise that Adam rescales to steps of size ~lr."""
    for (path, a), (_, b) in zip(
        jax.tree.leaves_with_path(p1), jax.tree.leaves_with_path(p2), strict=True
    ):
        if "k_proj" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
            assert np.abs(a).max() < 10 * OPT_CFG.learning_rate
            continue
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_stacked_layers_train_like_the_per_layer_tree():
    """Parameters stored stacked (``stack_layers``) and the layers scanned train exactly like
    the per-layer tree unrolled: three AdamW steps with weight decay (no dropout) end at the
    same parameters. The decay mask must see through the layer axis: a stacked LayerNorm scale
    is a matrix by shape, and decaying it would move it off the unrolled run's value."""
    config = dataclasses.replace(TINY, num_hidden_layers=3)
    p0 = jax.device_get(init_params(config, jax.random.key(3)))
    cfg = dataclasses.replace(OPT_CFG, weight_decay=0.1)
    mesh = T.make_mesh(devices=jax.devices()[:1])
    out = []
    for scan, tree in ((False, p0), (True, stack_layers(p0))):
        apply_fn = LT.opt_apply_fn(config, scan_layers=scan)
        state, step = LT.make_lm_train_step(apply_fn, cfg, tree, mesh, dropout=False)
        for i, b in enumerate(batches(3)):
            state, _ = step(state, T.shard_batch(b, mesh), jax.random.key(i))
        out.append(unstack_layers(jax.device_get(state.params)))
    assert_params_close(out[1], out[0])
    assert T.STACKED_LAYERS == "layers" == next(k for k in stack_layers(p0) if "layers" in k)
    scale = out[1]["layers_2"]["final_layer_norm"]["scale"]
    assert not np.allclose(scale, 1.0)  # it did train


def test_loss_is_mean_nll_over_real_targets(params):
    b = batches(1)[0]
    ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    loss_sum, count = LT.causal_lm_sums(LT.opt_apply_fn(TINY), params, b, None, deterministic=True)
    # Direct: log-softmax of the logits, target t+1 counted when tokens t and t+1 are real.
    logits = np.asarray(model_logits(TINY, params, ids, mask), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    m = np.asarray(b["attention_mask"])
    total, n = 0.0, 0
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if m[r, t] and m[r, t + 1]:
                total -= float(logp[r, t, int(ids[r, t + 1])])
                n += 1
    assert int(count) == n == 16 * 11 - 5 - 4
    np.testing.assert_allclose(float(loss_sum), total, rtol=1e-5)


def test_train_step_does_not_recompile_and_loss_decreases(reference):
    losses, _, step = reference
    assert step._cache_size() == 1
    assert losses[-1] < losses[0]


def test_eight_devices_follow_one_device_trajectory_with_dropout(params):
    assert jax.device_count() >= 8, "conftest provides 8 host CPU devices"
    data = batches(3)
    l1, p1, _ = train(params, jax.devices()[:1], data)
    l8, p8, step8 = train(params, jax.devices()[:8], data)
    assert step8._cache_size() == 1
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert_params_close(p1, p8)


def test_accumulation_and_remat_over_eight_devices_equal_one_big_batch(params, reference):
    l1, p1, _ = reference
    data = batches(1) * 3
    l8, p8, _ = train(params, jax.devices()[:8], data, accum=2, dropout=False, remat=True)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert_params_close(p1, p8)


def test_saved_probs_attention_trains_like_autodiff(params):
    """The default core on CPU (``"saved_probs"``: hand-written backward keeping only the
    probabilities) against JAX's own derivative of the plain core (``"xla"``): three AdamW
    steps with dropout from the same keys end at the same parameters. The batches hold
    left-padded rows, whose first queries see no key at all (fully masked rows)."""
    data = batches(3)
    l_xla, p_xla, _ = train(params, jax.devices()[:1], data, attention="xla")
    l_own, p_own, _ = train(params, jax.devices()[:1], data, attention="saved_probs")
    np.testing.assert_allclose(l_own, l_xla, rtol=1e-5)
    assert_params_close(p_own, p_xla)
    assert not np.allclose(p_own["layers_0"]["fc1"]["kernel"], params["layers_0"]["fc1"]["kernel"])


def test_remat_policy_by_name_scanned_equals_unrolled(params, reference):
    """``remat`` naming a ``jax.checkpoint_policies`` policy (save the projections, recompute
    the rest) changes nothing but memory: scanned over stored stacks it trains like the
    unrolled reference."""
    l1, p1, _ = reference
    mesh = T.make_mesh(devices=jax.devices()[:1])
    apply_fn = LT.opt_apply_fn(TINY, remat="dots_with_no_batch_dims_saveable", scan_layers=True)
    state, step = LT.make_lm_train_step(
        apply_fn, OPT_CFG, stack_layers(params), mesh, dropout=False
    )
    losses = []
    for i, b in enumerate(batches(1) * 3):
        state, info = step(state, T.shard_batch(b, mesh), jax.random.key(i))
        losses.append(float(info.loss))
    np.testing.assert_allclose(losses, l1, rtol=1e-5)
    assert_params_close(unstack_layers(jax.device_get(state.params)), p1)


def _padded_attention_inputs():
    """bfloat16 q, k, v, cotangent and a causal mask with left and right padding; row 1's
    first 10 queries see no key (their cotangent is zero: no loss reads them and no later
    query sees their positions). Returns (q, k, v, g, mask, rows that see a key)."""
    rng = np.random.default_rng(0)
    b, t, h, d = 4, 64, 4, 64
    q, k, v, g = (jnp.asarray(rng.normal(size=(b, t, h, d)) / 3, jnp.bfloat16) for _ in range(4))
    pad = np.ones((b, t), bool)
    pad[1, :10] = False
    pad[2, -7:] = False
    mask = np.tril(np.ones((t, t), bool))[None, None] & pad[:, None, None, :]
    seen = mask.any(axis=-1)[:, 0]  # [B, T]
    return q, k, v, g.at[1, :10].set(0), jnp.asarray(mask), seen


def _attention_and_grads(impl, q, k, v, g, mask):
    from collapse_jax.families.lm import attention as A

    out, vjp = jax.vjp(lambda q, k, v: A.attention(impl, q, k, v, mask), q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *vjp(g))]


def test_cudnn_guard_changes_no_real_row(monkeypatch):
    """The ``"cudnn"`` wrapper lets a query that sees no key see its own slot (cuDNN's
    gradients are NaN for such a query). Run through XLA's kernel in place of cuDNN's, it
    changes no output of a query that sees a key and no gradient, and leaves no query without
    a key."""
    q, k, v, g, mask, seen = _padded_attention_inputs()
    dpa = jax.nn.dot_product_attention
    masks = []

    def xla_kernel(*args, mask, implementation, **kw):
        masks.append(mask)
        return dpa(*args, mask=mask, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_kernel)
    ref = _attention_and_grads("xla", q, k, v, g, mask)
    got = _attention_and_grads("cudnn", q, k, v, g, mask)
    assert bool(np.asarray(masks[0]).any(axis=-1).all())
    tol = 2e-2 * np.abs(ref[0]).max()  # a few bfloat16 steps: two kernels round differently
    np.testing.assert_allclose(got[0][seen], ref[0][seen], atol=tol)
    assert not np.allclose(got[0][~seen], ref[0][~seen], atol=tol)  # the guard did act
    for a, b in zip(got[1:], ref[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max())


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_xla_in_bfloat16():
    """On a GPU, cuDNN's fused kernel gives the plain core's output (queries that see a key)
    and gradients to bfloat16 accuracy, padded and fully masked rows included."""
    q, k, v, g, mask, seen = _padded_attention_inputs()
    ref = _attention_and_grads("xla", q, k, v, g, mask)
    got = _attention_and_grads("cudnn", q, k, v, g, mask)
    np.testing.assert_allclose(got[0][seen], ref[0][seen], atol=2e-2 * np.abs(ref[0]).max())
    for a, b in zip(got[1:], ref[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max())


def test_parameter_sharding_over_model_axis(params, reference):
    mesh = T.make_mesh(model_parallel=4, devices=jax.devices()[:8])
    shardings = T.param_sharding(params, mesh, min_size=1000)
    spec = shardings["embed_tokens"].spec
    assert "model" in tuple(spec)
    state, step = LT.make_lm_train_step(
        LT.opt_apply_fn(TINY), OPT_CFG, params, mesh, param_shardings=shardings, dropout=False
    )
    losses = []
    for i, b in enumerate(batches(1) * 3):
        state, info = step(state, T.shard_batch(b, mesh), jax.random.key(i))
        losses.append(float(info.loss))
    assert state.params["embed_tokens"].sharding.spec == spec
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    assert_params_close(reference[1], jax.device_get(state.params))


def test_fit_lm_epochs_with_a_short_last_batch(params):
    b = batches(1, batch=10)[0]
    ids = np.concatenate([b["input_ids"]] * 2)  # 20 blocks, batch 8: 3 updates per epoch
    mask = np.concatenate([b["attention_mask"]] * 2)
    seen = []
    cfg = dataclasses.replace(OPT_CFG, total_steps=6, grad_accum_steps=2)
    out = LT.fit_lm(
        LT.opt_apply_fn(TINY),
        params,
        ids,
        mask,
        cfg,
        batch_size=8,
        epochs=2,
        key=jax.random.key(0),
        mesh=T.make_mesh(devices=jax.devices()[:1]),
        progress=lambda i, n, loss: seen.append((i, n)),
    )
    assert seen == [(i, 6) for i in range(1, 7)]
    assert out.losses.shape == (6,) and np.isfinite(out.losses).all()
    assert int(out.state.step) == 6
    assert out.losses[3:].mean() < out.losses[:3].mean()
    # By default all 8 devices share each micro-batch: 8 rows in 2 micro-batches cannot.
    with pytest.raises(ConfigError, match="batch_size 8 must be divisible by 16"):
        LT.fit_lm(LT.opt_apply_fn(TINY), params, ids, mask, cfg, batch_size=8, epochs=1, key=None)


def test_generic_step_keeps_the_callers_params_and_does_not_recompile():
    params = {"w": jnp.ones(3)}
    opt = T.make_optimizer(T.OptimizerConfig(learning_rate=0.1, total_steps=10))

    def loss_sums(p, batch, key):  # a weighted quadratic: sum and count
        return ((p["w"] - batch) ** 2).sum(), jnp.float32(batch.shape[0])

    step = T.make_train_step(loss_sums, opt)  # no mesh: plain jit, state donated
    state = T.init_train_state(params, opt)
    for i in range(3):
        state, _ = step(state, jnp.zeros(3), jax.random.key(i))
    assert step._cache_size() == 1 and int(state.step) == 3
    np.testing.assert_array_equal(params["w"], 1.0)  # not donated away
    assert float(state.params["w"][0]) < 1.0


def test_weight_decay_skips_vectors_unless_asked():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for decay_vectors, want_bias in ((False, 1.0), (True, 0.5)):
        cfg = T.OptimizerConfig(
            learning_rate=1.0, total_steps=10, weight_decay=0.5, decay_vectors=decay_vectors
        )
        opt = T.make_optimizer(cfg)
        # With a zero gradient only the decay moves parameters; lr(0) = 1 without warm-up.
        updates, _ = opt.update(zeros, opt.init(params), params)
        new = optax.apply_updates(params, updates)
        np.testing.assert_allclose(new["kernel"], 0.5)
        np.testing.assert_allclose(new["bias"], want_bias)


def test_schedule_warmup_then_cosine():
    cfg = T.OptimizerConfig(learning_rate=1.0, warmup_steps=4, total_steps=12, end_lr_fraction=0.1)
    lr = np.array([float(T.make_schedule(cfg)(n)) for n in range(13)])
    np.testing.assert_allclose(lr[:5], [0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    n = np.arange(4, 13)
    cosine = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (n - 4) / 8))
    np.testing.assert_allclose(lr[4:], cosine, atol=1e-6)


def test_sequence_scores_match_full_batch(params):
    rng = np.random.default_rng(1)
    lengths = (5, 17, 1, 9, 30)
    seqs = [list(rng.integers(3, TINY.vocab_size, size=n)) for n in lengths]
    scores = LT.score_sequences(LT.opt_apply_fn(TINY), params, seqs, batch_size=2, max_length=32)
    # Reference: one right-padded batch through the full forward pass, log-softmax in float64.
    ids = np.full((len(seqs), 32), TINY.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    logits = np.asarray(model_logits(TINY, params, jnp.asarray(ids), jnp.asarray(mask)))
    logits = logits.astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for r, s in enumerate(seqs):
        want = -sum(logp[r, t, s[t + 1]] for t in range(len(s) - 1))
        assert scores.n_tokens[r] == len(s) - 1
        np.testing.assert_allclose(scores.nll_sum[r], want, rtol=1e-5, atol=1e-5)
    assert np.isnan(scores.nll[2]) and np.isfinite(scores.perplexity[[0, 1, 3, 4]]).all()


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="warmup_steps"):
        T.OptimizerConfig(warmup_steps=10, total_steps=5)
    with pytest.raises(ConfigError, match="learning_rate"):
        T.OptimizerConfig(learning_rate=0.0)
    with pytest.raises(ConfigError, match="model_parallel 3"):
        T.make_mesh(model_parallel=3, devices=jax.devices()[:8])
    mesh = T.make_mesh(devices=jax.devices()[:8])
    with pytest.raises(ConfigError, match="batch size 6"):
        T.shard_batch({"x": np.zeros((6, 2))}, mesh)
    ids = jnp.ones((1, 4), jnp.int32)
    for bad, match in ((dict(attention="flash"), "'flash'"), (dict(remat="nope"), "'nope'")):
        with pytest.raises(ConfigError, match=match):
            LT.opt_apply_fn(TINY, **bad)(params_for_errors(), ids, ids, False, jax.random.key(0))


def params_for_errors():
    return init_params(TINY, jax.random.key(0))


def test_distributed_start_up_only_when_multihost(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert not T.maybe_initialize_distributed({})
    assert not T.maybe_initialize_distributed({"SLURM_NTASKS": "1"})
    assert T.maybe_initialize_distributed(
        {
            "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
            "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "2",
        }
    )
    assert calls[-1] == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 2,
    }
    assert T.maybe_initialize_distributed({"TPU_WORKER_HOSTNAMES": "h0,h1"})
    assert calls[-1] == {}


def test_scan_layers_setting_of_the_study():
    """``auto`` scans models of six layers or more (OPT-125m has 12) on CPU, not the built-in
    sizes, and nothing on a GPU or TPU; ``on`` and ``off`` decide everywhere."""
    from collapse_jax.families.lm.config import SCAN_LAYERS_AUTO_MIN, Config, scans_layers

    assert SCAN_LAYERS_AUTO_MIN == 6
    assert [scans_layers(Config(), n, "cpu") for n in (1, 4, 5, 6, 12)] == [0, 0, 0, 1, 1]
    assert not scans_layers(Config(), 12, "gpu") and not scans_layers(Config(), 12, "tpu")
    assert scans_layers(Config(), 12) == (jax.default_backend() == "cpu")
    for platform in ("cpu", "gpu"):
        assert scans_layers(Config(scan_layers="on"), 1, platform)
        assert not scans_layers(Config(scan_layers="off"), 12, platform)


def test_study_fine_tune_with_scanned_layers(monkeypatch, tmp_path):
    """The study's fine-tune (``train_model``) with ``scan_layers = "on"``: its step and its
    validation scorer run the layers scanned over stacked parameters, and the kept parameters
    come back in the per-layer layout, each layer in its place: scored by the unrolled model,
    they give the validation loss recorded for the kept epoch. Interrupted after its first
    epoch's checkpoint (stacked) and run again, it resumes and ends bit for bit where the
    uninterrupted fine-tune ends."""
    from collapse_jax.core import checkpointing
    from collapse_jax.core.host_loop import Progress
    from collapse_jax.families.lm.config import Config

    config = dataclasses.replace(TINY, num_hidden_layers=3)
    p0 = jax.device_get(init_params(config, jax.random.key(5)))
    rng = np.random.default_rng(0)
    data = rng.integers(3, config.vocab_size, size=(32, 12)).astype(np.int32)
    valid = rng.integers(3, config.vocab_size, size=(16, 12)).astype(np.int32)

    def fine_tune(ckpt_dir):
        return LT.train_model(
            config,
            p0,
            data,
            valid,
            epochs=2,
            learning_rate=3e-3,
            config=Config(batch_size=8, eval_batch_size=8, scan_layers="on"),
            key=jax.random.key(1),
            order_seed=(0, 1),
            ckpt_dir=ckpt_dir,
            progress=Progress(False, "test"),
        )

    seen = []
    real = LT.opt_apply_fn

    def recording(*args, **kw):
        seen.append(kw.get("scan_layers", False))
        return real(*args, **kw)

    monkeypatch.setattr(LT, "opt_apply_fn", recording)
    LT._trainer.cache_clear()
    LT._score_fn.cache_clear()
    res = fine_tune(tmp_path / "whole")
    assert seen == [True, True]  # the step and the validation scorer
    monkeypatch.setattr(LT, "opt_apply_fn", real)
    assert jax.tree.structure(res.params) == jax.tree.structure(p0)
    assert jax.tree.map(np.shape, res.params) == jax.tree.map(np.shape, p0)
    assert not np.allclose(res.params["layers_2"]["fc1"]["kernel"], p0["layers_2"]["fc1"]["kernel"])
    nll, count = LT.score_blocks(config, LT.device_params(res.params), valid, 8)
    np.testing.assert_allclose(nll.sum() / count.sum(), res.val_loss[res.best_epoch - 1], rtol=1e-5)

    real_save = checkpointing.Checkpointer.save

    def save_then_die(self, *args):
        real_save(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(tmp_path / "parts")
    monkeypatch.setattr(checkpointing.Checkpointer, "save", real_save)
    restored = []
    real_restore = checkpointing.Checkpointer.restore

    def counted_restore(self, *args, **kw):
        restored.append(self.latest())
        return real_restore(self, *args, **kw)

    monkeypatch.setattr(checkpointing.Checkpointer, "restore", counted_restore)
    resumed = fine_tune(tmp_path / "parts")
    assert restored == [1]  # it went on from epoch 1's (stacked) checkpoint
    np.testing.assert_array_equal(resumed.train_loss, res.train_loss)
    np.testing.assert_array_equal(resumed.val_loss, res.val_loss)
    assert resumed.best_epoch == res.best_epoch
    jax.tree.map(np.testing.assert_array_equal, resumed.params, res.params)
