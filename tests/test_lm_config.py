"""Bad language-model configurations fail at once, before any training."""

import argparse
import dataclasses

import jax
import numpy as np
import pytest

from collapse_jax.core.errors import ConfigError
from collapse_jax.families.lm import generations as lm_generations
from collapse_jax.families.lm import study as lm
from collapse_jax.families.lm import synthetic_language as sl
from collapse_jax.families.lm import training as lm_training
from collapse_jax.families.lm.opt import OPTConfig, param_shapes
from collapse_jax.families.lm.opt_weights import save_pretrained

SMALL = lm.Config(
    model="micro",
    block_size=8,
    synthetic_vocab=16,
    synthetic_blocks=64,
    train_blocks=16,
    eval_blocks=16,
    pretrain_blocks=32,
    generations=1,
    epochs=1,
    seeds=1,
    batch_size=8,
    generate_batch_size=8,
    eval_batch_size=8,
)


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started before the configuration was checked")

    monkeypatch.setattr(lm_training, "train_model", fail)
    monkeypatch.setattr(lm_generations, "generate_batch", fail)


def _model_dir(tmp_path, vocab_size, max_positions):
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=16,
        bos_token_id=17,
        eos_token_id=17,
    )
    d = tmp_path / f"opt-v{vocab_size}-p{max_positions}"
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), param_shapes(config))
    save_pretrained(params, config, d, tokenizer=sl.make_tokenizer(16))
    return d


def test_keep_fraction_outside_unit_interval():
    for bad in ((1.5,), (-0.1,), (0.0, 2.0)):
        with pytest.raises(ConfigError, match="fresh fraction"):
            lm.validate(dataclasses.replace(SMALL, fresh_fractions=bad))


def test_block_size_above_model_positions(tmp_path, no_training):
    d = _model_dir(tmp_path, 24, 12)
    with pytest.raises(ConfigError, match="max_position_embeddings 12"):
        lm.run(dataclasses.replace(SMALL, model=str(d)), tmp_path / "out", progress=False)


def test_tokenizer_model_vocabulary_mismatch(tmp_path, no_training):
    d = _model_dir(tmp_path, 18, 32)  # the synthetic tokenizer has 16 + 3 tokens
    with pytest.raises(ConfigError, match="vocabulary mismatch"):
        lm.run(dataclasses.replace(SMALL, model=str(d)), tmp_path / "out", progress=False)


def test_empty_corpus(tmp_path, no_training):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (corpus / name).write_text("\n")
    tok = tmp_path / "tok"
    sl.make_tokenizer(16).save_pretrained(str(tok))
    cfg = dataclasses.replace(SMALL, corpus=str(corpus), tokenizer=str(tok))
    with pytest.raises(ConfigError, match="empty corpus"):
        lm.run(cfg, tmp_path / "out", progress=False)


def test_too_few_training_blocks(tmp_path, no_training):
    with pytest.raises(ConfigError, match="pretrain_blocks"):
        lm.run(dataclasses.replace(SMALL, pretrain_blocks=64), tmp_path / "out", progress=False)


def test_flags_parse_and_validate():
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    args = parser.parse_args(
        ["--keep-fraction", "0,0.1", "--epochs", "3", "--no-select-by-validation"]
    )
    cfg = lm.config_from_args(args, lm.Config())
    assert cfg.fresh_fractions == (0.0, 0.1) and cfg.epochs == 3
    assert cfg.select_by_validation is False and cfg.resume is False
    with pytest.raises(ConfigError, match="fresh fraction"):
        lm.config_from_args(parser.parse_args(["--fresh-fractions", "1.5"]), lm.Config())
    with pytest.raises(ConfigError, match="decoding"):
        lm.config_from_args(parser.parse_args(["--decoding", "nucleus"]), lm.Config())
    assert lm.validate(lm.demo_config()) == lm.demo_config()


def test_wikitext_with_the_opt_tokenizer_prepares_blocks(shared_data):
    cfg = lm.validate(
        dataclasses.replace(
            SMALL,
            corpus="wikitext",
            block_size=64,
            train_blocks=64,
            eval_blocks=32,
            pretrain_blocks=128,
        )
    )
    setup = lm.prepare(cfg)
    assert setup.model_config.vocab_size == 50272  # OPT's 50,265 tokens rounded up to 8
    assert setup.train.shape == (64, 64) and setup.pretrain.shape == (128, 64)
    assert setup.test.shape == (32, 64) and setup.validation.shape == (32, 64)
    assert "local files" in setup.corpus_source and setup.source is None
    # Pre-training and regime blocks are consecutive, disjoint parts of the training text.
    assert not np.array_equal(setup.pretrain[-1], setup.train[0])
