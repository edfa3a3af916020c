"""Corpora: local text directories, WikiText-2 offline fallback, block tokenisation, errors."""

from pathlib import Path

import numpy as np
import pytest

from collapse_jax.core.errors import ConfigError
from collapse_jax.families.lm import corpora
from collapse_jax.families.lm.synthetic_language import make_tokenizer


def _write(dirpath: Path, **splits):
    dirpath.mkdir(parents=True, exist_ok=True)
    for name, text in splits.items():
        (dirpath / f"{name}.txt").write_text(text)


@pytest.fixture
def word_tokenizer():
    return make_tokenizer(16)


def _words(ids):
    return "".join(f" w{i}" for i in ids) + "\n"


def test_encode_blocks_concatenates_lines_and_drops_remainder(word_tokenizer):
    lines = [_words([1, 2, 3]), "", _words([4, 5]), _words([6, 7, 8, 9])]
    blocks = corpora.encode_blocks(lines, word_tokenizer, 4)
    np.testing.assert_array_equal(blocks, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert blocks.dtype == np.int32
    assert corpora.encode_blocks(lines, word_tokenizer, 3, max_blocks=1).shape == (1, 3)


def test_empty_corpus_is_a_config_error(word_tokenizer):
    with pytest.raises(ConfigError, match="empty corpus"):
        corpora.encode_blocks(["", _words([1, 2])], word_tokenizer, 64)


def test_read_text_dir_uses_validation_as_train_when_train_missing(tmp_path, word_tokenizer):
    _write(tmp_path / "c", valid=_words(range(12)) * 10, test=_words(range(8)))
    splits = corpora.read_text_dir(tmp_path / "c")
    assert splits.validation is None
    corpus = corpora.build_token_corpus(splits, word_tokenizer, 4, validation_fraction=0.1)
    assert corpus.train.shape == (27, 4) and corpus.validation.shape == (3, 4)
    assert corpus.test.shape == (2, 4)
    # The held-out validation blocks are the end of the text, disjoint from training.
    full = corpora.encode_blocks(splits.train, word_tokenizer, 4)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.validation]), full)


def test_read_text_dir_with_all_splits(tmp_path, word_tokenizer):
    _write(tmp_path / "c", train=_words(range(8)), valid=_words(range(4)), test=_words(range(4)))
    corpus = corpora.build_token_corpus(
        corpora.load_text_splits(str(tmp_path / "c")), word_tokenizer, 4
    )
    assert corpus.train.shape == (2, 4) and corpus.validation.shape == (1, 4)


def test_missing_directory_and_files_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        corpora.read_text_dir(tmp_path / "nope")
    _write(tmp_path / "c", train="a b\n")
    with pytest.raises(ConfigError, match=r"no test\.txt"):
        corpora.read_text_dir(tmp_path / "c")


def test_wikitext_offline_without_data_dir_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("COLLAPSE_JAX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="wikitext"):
        corpora.load_text_splits("wikitext")


def test_vocab_checks(word_tokenizer):
    corpora.check_vocab(word_tokenizer, 19)
    with pytest.raises(ConfigError, match=r"vocabulary mismatch.*19 tokens.*18"):
        corpora.check_vocab(word_tokenizer, 18)
    with pytest.raises(ConfigError, match="token id 20"):
        corpora.check_blocks("train", np.array([[1, 20]]), 19)
    with pytest.raises(ConfigError, match="empty corpus"):
        corpora.check_blocks("train", np.zeros((0, 4), np.int32), 19)


def test_bad_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        corpora.load_tokenizer(tmp_path / "missing-tokenizer")


def test_offline_wikitext_with_opt_tokenizer(shared_data):
    tok = corpora.load_tokenizer(shared_data / "tokenizers" / "opt-125m")
    splits = corpora.load_text_splits("wikitext")
    assert "local files" in splits.source
    lines = splits.train[:200]
    blocks = corpora.encode_blocks(lines, tok, 64)
    # Per-line tokenisation of the raw lines (run_clm recipe) without special tokens.
    expected = [i for ln in lines if ln for i in tok(ln, add_special_tokens=False)["input_ids"]]
    np.testing.assert_array_equal(blocks.ravel(), expected[: blocks.size])
    assert blocks.max() < len(tok) and tok.bos_token_id not in blocks[:, 0]
