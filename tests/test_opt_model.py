"""OPT port: logits equal transformers' PyTorch OPTForCausalLM; cache; checkpoints in and out."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax.core.errors import ConfigError
from collapse_jax.families.lm.opt import (
    OPTConfig,
    OPTForCausalLM,
    init_cache,
    init_params,
    model_logits,
    reorder_cache,
    stack_layers,
    unstack_layers,
)
from collapse_jax.families.lm.opt_weights import (
    hf_state_dict_to_params,
    load_pretrained,
    params_to_hf_state_dict,
    read_state_dict,
    save_pretrained,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 agreement required with the reference implementation.
#: Our float32 logits may differ from a float64 evaluation of the same Hugging Face model by at
#: most this multiple of transformers' own float32 error against it: both ports round in
#: float32 with different summation orders, so the bound scales with the model's logits (an
#: absolute tolerance passes or fails with the machine's matmul kernels).
ROUNDING_FACTOR = 4.0

TINY = dict(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=48,
    num_attention_heads=4,
    max_position_embeddings=64,
)
# OPT-350m's peculiarities at a tiny size: project_in/out and post-LayerNorm.
OPT350_STYLE = dict(TINY, word_embed_proj_dim=16, do_layer_norm_before=False)


def make_hf_checkpoint(path, seed=0, **overrides):
    """A transformers OPTForCausalLM with random weights (biases and LayerNorms perturbed too),
    saved with ``save_pretrained(path, **save_kwargs)``."""
    save_kwargs = overrides.pop("save_kwargs", {})
    torch.manual_seed(seed)
    if "config_path" in overrides:
        hf_config = transformers.OPTConfig.from_pretrained(overrides.pop("config_path"))
    else:
        hf_config = transformers.OPTConfig(**overrides)
    model = transformers.OPTForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(path), **save_kwargs)
    return model


def padded_batch(vocab_size, batch=4, length=9, seed=0, pad_id=1):
    """Token ids with a left-padded row, a right-padded row and full rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    ids[mask == 0] = pad_id
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def max_real_diff(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask == 1].max())


def assert_matches_transformers(ours, model, ids, mask):
    """Our logits against transformers' float32 and float64 evaluations of the same weights."""
    ref32 = torch_logits(model, ids, mask)
    ref64 = torch_logits(copy.deepcopy(model).double(), ids, mask)
    own_error = max_real_diff(ref32, ref64, mask)
    assert max_real_diff(ours, ref64, mask) <= ROUNDING_FACTOR * own_error, (
        max_real_diff(ours, ref64, mask),
        own_error,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(TINY), id="tiny-safetensors"),
        pytest.param(dict(OPT350_STYLE, save_kwargs={"safe_serialization": False}), id="350m-bin"),
        pytest.param(dict(TINY, tie_word_embeddings=False), id="untied-head"),
        pytest.param(dict(TINY, save_kwargs={"max_shard_size": "20KB"}), id="sharded"),
        pytest.param(
            dict(TINY, enable_bias=False, layer_norm_elementwise_affine=False), id="no-affine"
        ),
    ],
)
def test_logits_match_transformers(tmp_path, overrides):
    ref = make_hf_checkpoint(tmp_path, **overrides)
    config, params = load_pretrained(tmp_path)
    assert config.to_hf_dict()["word_embed_proj_dim"] == ref.config.word_embed_proj_dim
    ids, mask = padded_batch(config.vocab_size)
    ours = model_logits(config, params, jnp.asarray(ids), jnp.asarray(mask))
    assert ours.dtype == jnp.float32
    assert_matches_transformers(ours, ref, ids, mask)


def test_unrolled_layers_match_transformers(tmp_path):
    """The layers unrolled (the default, one program per layer), scanned over the per-layer tree
    (stacked on each call) and scanned over parameters stored stacked (``stack_layers``) all
    equal transformers, with and without a KV cache; ``unstack_layers`` gives back the loaded
    tree bit for bit."""
    ref = make_hf_checkpoint(tmp_path, **OPT350_STYLE)
    config, params = load_pretrained(tmp_path)
    ids, mask = padded_batch(config.vocab_size)
    stacked = stack_layers(params)
    assert "layers_0" not in stacked and stacked["layers"]["fc1"]["kernel"].shape[0] == (
        config.num_hidden_layers
    )
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), dict(params))
    for scan, tree in ((False, params), (True, params), (True, stacked)):
        model = OPTForCausalLM(config, scan_layers=scan)
        params = tree
        logits, _ = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
        assert_matches_transformers(logits, ref, ids, mask)
        cache = init_cache(config, ids.shape[0], ids.shape[1])
        cached, _ = model.apply(
            {"params": params}, jnp.asarray(ids), jnp.asarray(mask), cache=cache
        )
        assert_matches_transformers(cached, ref, ids, mask)


def test_sharded_checkpoint_is_sharded(tmp_path):
    make_hf_checkpoint(tmp_path, **TINY, save_kwargs={"max_shard_size": "20KB"})
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()


def test_opt125m_config_matches_transformers(tmp_path, shared_data):
    config_dir = shared_data / "opt-125m-config"
    if not (config_dir / "config.json").is_file():
        pytest.skip("opt-125m-config/config.json not in the data directory")
    ref = make_hf_checkpoint(tmp_path, config_path=str(config_dir))
    config, params = load_pretrained(tmp_path)
    assert config == OPTConfig.from_hf(config_dir)
    ids, mask = padded_batch(config.vocab_size, batch=3, length=7)
    ours = model_logits(config, params, jnp.asarray(ids), jnp.asarray(mask))
    assert_matches_transformers(ours, ref, ids, mask)


@pytest.mark.parametrize("overrides", [TINY, OPT350_STYLE], ids=["tiny", "350m-style"])
def test_cached_decoding_equals_full_forward(overrides):
    config = OPTConfig(**overrides)
    params = init_params(config, jax.random.key(0))
    ids, mask = padded_batch(config.vocab_size, length=10, seed=1)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    full = model_logits(config, params, ids, mask)
    model = OPTForCausalLM(config)
    # Cache longer than the sequence: unused slots carry mask 1 and must stay hidden.
    max_len = 13
    cache_mask = jnp.concatenate([mask, jnp.ones((4, max_len - 10), mask.dtype)], axis=1)
    cache = init_cache(config, 4, max_len)
    step = jax.jit(lambda c, x: model.apply({"params": params}, x, cache_mask, cache=c))
    logits, cache = step(cache, ids[:, :4])
    pieces = [logits]
    for t in range(4, 10):
        logits, cache = step(cache, ids[:, t : t + 1])
        pieces.append(logits)
    assert int(cache.index) == 10
    cached = jnp.concatenate(pieces, axis=1)
    assert max_real_diff(cached, full, np.asarray(mask)) <= 1e-5


def test_reorder_cache_gathers_batch_rows():
    config = OPTConfig(**TINY)
    cache = init_cache(config, 3, 5)
    cache = cache._replace(keys=cache.keys + jnp.arange(3.0)[None, :, None, None, None])
    out = reorder_cache(cache, jnp.array([2, 2, 0]))
    assert out.keys[:, :, 0, 0, 0].tolist() == [[2.0, 2.0, 0.0]] * config.num_hidden_layers


def test_save_load_round_trip_bit_exact_and_opens_in_transformers(tmp_path):
    config = OPTConfig(**OPT350_STYLE)
    params = jax.device_get(init_params(config, jax.random.key(3)))
    # Non-trivial biases and norms so the round trip covers every leaf.
    params = jax.tree.map(
        lambda x: x + np.random.default_rng(x.size).normal(size=x.shape).astype(x.dtype), params
    )
    save_pretrained(params, config, tmp_path)
    config2, params2 = load_pretrained(tmp_path)
    assert config2 == config
    flat1, flat2 = jax.tree.leaves_with_path(params), jax.tree.leaves_with_path(params2)
    assert [p for p, _ in flat1] == [p for p, _ in flat2]
    for (path, a), (_, b) in zip(flat1, flat2, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    ref = transformers.OPTForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = padded_batch(config.vocab_size)
    ours = model_logits(config, params, jnp.asarray(ids), jnp.asarray(mask))
    assert_matches_transformers(ours, ref, ids, mask)


def test_flax_msgpack_checkpoint(tmp_path):
    """transformers 4's FlaxOPTForCausalLM layout: model/decoder/layers/N/..., kernels [in, out]."""
    from flax import serialization

    ref = make_hf_checkpoint(tmp_path / "pt", **TINY)
    tree: dict = {}
    for key, value in ref.state_dict().items():
        if key == "lm_head.weight":
            continue
        *parents, leaf = key.split(".")
        arr = value.numpy()
        if leaf == "weight":
            if parents[-1] in ("embed_tokens", "embed_positions"):
                leaf = "embedding"
            elif "layer_norm" in parents[-1]:
                leaf = "scale"
            else:
                arr, leaf = arr.T, "kernel"
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    flax_dir = tmp_path / "flax"
    flax_dir.mkdir()
    (flax_dir / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    (flax_dir / "config.json").write_text((tmp_path / "pt" / "config.json").read_text())
    config, params = load_pretrained(flax_dir)
    ids, mask = padded_batch(config.vocab_size)
    ours = model_logits(config, params, jnp.asarray(ids), jnp.asarray(mask))
    assert_matches_transformers(ours, ref, ids, mask)


def test_state_dict_errors_name_the_key(tmp_path):
    make_hf_checkpoint(tmp_path, **TINY)
    config = OPTConfig.from_hf(tmp_path)
    sd = read_state_dict(tmp_path)
    hf_state_dict_to_params(sd, config)  # the intact checkpoint converts

    missing = dict(sd)
    del missing["model.decoder.layers.1.fc2.bias"]
    with pytest.raises(ConfigError, match=r"missing.*layers\.1\.fc2\.bias"):
        hf_state_dict_to_params(missing, config)

    extra = dict(sd, **{"model.decoder.layers.7.fc1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConfigError, match=r"unexpected.*layers\.7\.fc1\.weight"):
        hf_state_dict_to_params(extra, config)

    wrong = dict(sd)
    wrong["model.decoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(ConfigError, match=r"q_proj\.weight has shape \(32, 31\)"):
        hf_state_dict_to_params(wrong, config)

    # A config that disagrees with the checkpoint (wider MLP) names the mismatched tensors.
    with pytest.raises(ConfigError, match=r"fc1\.weight has shape"):
        hf_state_dict_to_params(sd, OPTConfig(**dict(TINY, ffn_dim=64)))


def test_prefix_variants_convert_identically(tmp_path):
    make_hf_checkpoint(tmp_path, **TINY)
    config = OPTConfig.from_hf(tmp_path)
    sd = read_state_dict(tmp_path)
    base = hf_state_dict_to_params(sd, config)
    for prefix in ("decoder.", ""):
        variant = {
            k.replace("model.decoder.", prefix): v for k, v in sd.items() if k != "lm_head.weight"
        }
        out = hf_state_dict_to_params(variant, config)
        assert jax.tree.all(jax.tree.map(np.array_equal, base, out))


def test_params_to_state_dict_names_are_transformers_names(tmp_path):
    ref = make_hf_checkpoint(tmp_path, **OPT350_STYLE)
    config, params = load_pretrained(tmp_path)
    ours = params_to_hf_state_dict(params, config)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    for k in theirs:
        assert np.array_equal(ours[k], theirs[k]), k


def test_missing_files_and_bad_config_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no OPT config\.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, model_type="opt")))
    with pytest.raises(ConfigError, match="no OPT weights"):
        load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        OPTConfig.from_hf(dict(TINY, num_attention_heads=5))
    with pytest.raises(ConfigError, match="hidden_size"):
        OPTConfig.from_hf(dict(TINY, hidden_size="big"))
    with pytest.raises(ConfigError, match="activation_function"):
        OPTConfig.from_hf(dict(TINY, activation_function="swiglu"))
    with pytest.raises(ConfigError, match="model_type"):
        OPTConfig.from_hf(dict(TINY, model_type="gpt2"))
    with pytest.raises(ConfigError, match="not a directory"):
        load_pretrained(tmp_path / "nope" / "deeper" / "still")
    # A hub id offline (the test suite sets HF_HUB_OFFLINE=1): a one-line error naming it.
    with pytest.raises(ConfigError, match="could not be fetched") as err:
        load_pretrained("collapse-jax-test/no-such-model")
    assert "\n" not in str(err.value) and "no-such-model" in str(err.value)


def test_bfloat16_compute_tracks_float32():
    config = OPTConfig(**TINY)
    params = init_params(config, jax.random.key(0))
    ids, mask = padded_batch(config.vocab_size)
    f32 = np.asarray(model_logits(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    bf16 = np.asarray(
        model_logits(config, params, jnp.asarray(ids), jnp.asarray(mask), dtype=jnp.bfloat16)
    )
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    real = mask == 1
    # bfloat16 keeps 8 significant bits: the error stays within a few ulps of the logit scale.
    scale = np.abs(f32[real]).max()
    assert np.abs(bf16 - f32)[real].max() <= 8 * 2.0**-8 * scale
