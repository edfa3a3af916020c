"""Text corpora for the language-model regime: WikiText-2 (hub or local files), tokenised into
fixed-length blocks of token ids.

Three sources give the same thing, lists of text lines per split (``train``, ``validation``,
``test``):

* ``wikitext``: WikiText-2 raw through ``datasets`` (``Salesforce/wikitext``,
  ``wikitext-2-raw-v1``) when the hub can be reached, otherwise the local copy
  ``$COLLAPSE_JAX_DATA_DIR/wikitext-2/``;
* a directory of text files ``train.txt``, ``valid.txt`` (or ``validation.txt``) and
  ``test.txt``. When ``train.txt`` is missing (the offline WikiText-2 copy has only the
  validation and test splits) the validation text is used for training and a held-out slice of
  its blocks becomes the validation set.

Tokenisation follows Hugging Face's ``run_clm`` recipe: each line is tokenised on its own
(without special tokens), the token ids are concatenated and cut into blocks of ``block_size``
(the paper uses 64), dropping the incomplete last block.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Int

from collapse_jax.core.errors import ConfigError, check_float, check_int
from collapse_jax.core.paths import data_dir

WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKITEXT_LOCAL = "wikitext-2"
DEFAULT_TOKENIZER = "facebook/opt-125m"
LOCAL_TOKENIZER = "tokenizers/opt-125m"
_SPLIT_FILES = {
    "train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
    "validation": ("valid.txt", "validation.txt", "wiki.valid.raw", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens"),
}


class TextSplits(NamedTuple):
    """Lines of text per split; ``validation`` may be ``None`` (carved from train later)."""

    train: list[str]
    validation: list[str] | None
    test: list[str]
    source: str  # where the text came from, for the report


class TokenCorpus(NamedTuple):
    """A corpus cut into blocks of token ids, int32 arrays of shape (blocks, block_size)."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    source: str


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def read_text_dir(path: str | os.PathLike) -> TextSplits:
    """Read ``train``/``valid``/``test`` text files from a directory (see the module docstring)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"corpus directory {str(root)!r} does not exist")
    found: dict[str, list[str] | None] = {}
    for split, names in _SPLIT_FILES.items():
        found[split] = None
        for name in names:
            f = root / name
            if f.is_file():
                found[split] = f.read_text(encoding="utf-8").splitlines(keepends=True)
                break
    if found["test"] is None:
        raise ConfigError(f"corpus directory {str(root)!r} has no test.txt")
    train, validation = found["train"], found["validation"]
    if train is None:
        if validation is None:
            raise ConfigError(f"corpus directory {str(root)!r} has neither train.txt nor valid.txt")
        # The offline WikiText-2 copy: its validation split is the training text.
        train, validation = validation, None
    return TextSplits(train, validation, found["test"], f"local files in {root}")


def _load_hub_wikitext() -> TextSplits:
    import datasets  # optional dependency (extra "hub")

    name, config = WIKITEXT_HUB
    ds = datasets.load_dataset(name, config)
    return TextSplits(
        list(ds["train"]["text"]),
        list(ds["validation"]["text"]),
        list(ds["test"]["text"]),
        f"{name} ({config}) from the Hugging Face hub",
    )


def load_text_splits(corpus: str, data_root: str | os.PathLike | None = None) -> TextSplits:
    """Load a corpus by name (``wikitext``) or directory path.

    ``wikitext`` tries the hub unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set and
    falls back to ``<data dir>/wikitext-2``; it raises :class:`ConfigError` when neither works.
    """
    if corpus == "wikitext":
        errors = []
        if not _offline():
            try:
                return _load_hub_wikitext()
            except Exception as e:  # no network, no `datasets`, hub down: fall back to files
                errors.append(f"hub: {type(e).__name__}: {e}".splitlines()[0])
        root = data_dir(data_root)
        local = root / WIKITEXT_LOCAL if root is not None else None
        if local is not None and local.is_dir():
            return read_text_dir(local)
        where = str(local) if local is not None else "$COLLAPSE_JAX_DATA_DIR (unset)"
        raise ConfigError(
            f"corpus 'wikitext' is not available: the hub cannot be used"
            f"{' (' + errors[0] + ')' if errors else ' (offline)'} and {where}/ does not exist"
        )
    return read_text_dir(corpus)


def load_tokenizer(name_or_dir: str | os.PathLike | None = None) -> Any:
    """A Hugging Face tokenizer from a local directory or hub id.

    ``None`` means OPT's tokenizer: ``<data dir>/tokenizers/opt-125m`` when present, else the hub
    id ``facebook/opt-125m``.
    """
    from transformers import AutoTokenizer

    if name_or_dir is None:
        root = data_dir()
        local = root / LOCAL_TOKENIZER if root is not None else None
        name_or_dir = str(local) if local is not None and local.is_dir() else DEFAULT_TOKENIZER
    try:
        return AutoTokenizer.from_pretrained(str(name_or_dir))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load tokenizer {str(name_or_dir)!r}: {first}") from None


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
    return len(tokenizer)


def check_vocab(tokenizer: Any, model_vocab_size: int) -> None:
    """Raise :class:`ConfigError` when the tokenizer can produce ids the model has no row for."""
    n = tokenizer_vocab_size(tokenizer)
    if n > model_vocab_size:
        raise ConfigError(
            f"tokenizer/model vocabulary mismatch: the tokenizer has {n} tokens but the model's "
            f"vocab_size is {model_vocab_size}"
        )


def encode_blocks(
    lines: Sequence[str], tokenizer: Any, block_size: int, max_blocks: int | None = None
) -> Int[np.ndarray, "blocks block"]:
    """Tokenise lines one by one, concatenate and cut into blocks of ``block_size`` ids.

    Returns an int32 array (blocks, block_size); the incomplete last block is dropped. Raises
    :class:`ConfigError` when not even one block can be made.
    """
    block_size = check_int("block size", block_size, 1)
    lines = [ln for ln in lines if ln]
    ids: list[int] = []
    if lines:
        enc = tokenizer(lines, add_special_tokens=False)["input_ids"]
        for row in enc:
            ids.extend(row)
            if max_blocks is not None and len(ids) >= max_blocks * block_size:
                break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ConfigError(
            f"empty corpus: {len(ids)} tokens cannot fill one block of {block_size} tokens"
        )
    return np.asarray(ids[: n * block_size], dtype=np.int32).reshape(n, block_size)


def build_token_corpus(
    splits: TextSplits,
    tokenizer: Any,
    block_size: int,
    *,
    validation_fraction: float = 0.1,
    max_blocks: int | None = None,
) -> TokenCorpus:
    """Tokenise all splits into blocks.

    When ``splits.validation`` is ``None`` the last ``validation_fraction`` of the training
    blocks is held out as validation set (contiguous, so no text is shared with training).
    ``max_blocks`` caps each split (for small runs).
    """
    validation_fraction = check_float("validation fraction", validation_fraction, 0.0, 0.5)
    train = encode_blocks(splits.train, tokenizer, block_size)
    if splits.validation is None:
        n_val = max(1, round(validation_fraction * len(train)))
        if n_val >= len(train):
            raise ConfigError(
                f"empty corpus: {len(train)} training blocks cannot spare {n_val} for validation"
            )
        train, validation = train[:-n_val], train[-n_val:]
    else:
        validation = encode_blocks(splits.validation, tokenizer, block_size)
    test = encode_blocks(splits.test, tokenizer, block_size)
    if max_blocks is not None:
        max_blocks = check_int("max blocks", max_blocks, 1)
        train, validation, test = train[:max_blocks], validation[:max_blocks], test[:max_blocks]
    return TokenCorpus(train, validation, test, splits.source)


def check_blocks(name: str, blocks: np.ndarray, vocab_size: int) -> np.ndarray:
    """Validate a block array: 2-D, non-empty, integer ids in ``[0, vocab_size)``."""
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] == 0:
        raise ConfigError(f"empty corpus: {name} has shape {blocks.shape}")
    if not np.issubdtype(blocks.dtype, np.integer):
        raise ConfigError(f"{name} must hold integer token ids, got dtype {blocks.dtype}")
    lo, hi = int(blocks.min()), int(blocks.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ConfigError(
            f"tokenizer/model vocabulary mismatch: {name} holds token id {bad} outside the "
            f"model's vocabulary of {vocab_size}"
        )
    return blocks.astype(np.int32, copy=False)
