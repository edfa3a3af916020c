"""Configuration of the language-model study: fields, validation, flags, and the set-up (corpus,
tokenizer, model) checked before any training."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.core import operators
from collapse_jax.core.errors import (
    ConfigError,
    check_choice,
    check_float,
    check_int,
    check_memory,
)
from collapse_jax.core.flags import add_config_arguments, apply_flags
from collapse_jax.core.policies import Policy
from collapse_jax.families import DESCRIPTIONS
from collapse_jax.families.lm import corpora
from collapse_jax.families.lm import synthetic_language as sl
from collapse_jax.families.lm.opt import OPTConfig
from collapse_jax.families.lm.opt_weights import resolve_model_dir

NAME = "lm"
DESCRIPTION = DESCRIPTIONS[NAME]

#: Built-in OPT-architecture sizes for offline runs (pre-trained from scratch as the base).
BUILTIN_MODELS = {
    "micro": dict(hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=2),
    "small": dict(hidden_size=128, num_hidden_layers=2, ffn_dim=512, num_attention_heads=4),
    "base": dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4),
}
DECODINGS = ("beam", "sample", "greedy")
SCAN_LAYERS = ("auto", "on", "off")
#: ``scan_layers = "auto"`` trains a model of at least this many decoder layers with them scanned
#: on CPU (OPT-125m has 12; the built-in sizes 1-4, whose unrolled steps compile in seconds).
SCAN_LAYERS_AUTO_MIN = 6
START_FROM = ("base", "previous")
#: The data operators of the LM study: curation and verification of the generated sequences,
#: and the decoding knobs temperature / top-k / top-p (the shared operator fields).
OPERATORS = ("curate", "verify", "temperature", "top_k", "top_p")
DISTINCT_N = (1, 2, 3, 4)
REPEAT_N = 4


@dataclasses.dataclass(frozen=True)
class Config(operators.OperatorFields):
    """The language-model regime. Defaults: the offline CPU form (synthetic source, tiny OPT).
    The data-operator fields come from :class:`collapse_jax.core.operators.OperatorFields`:
    temperature / top_k / top_p are the decoding knobs, curate (reward ``length`` or
    ``tokens:I,J,A-B``) and verify (good ``loglik:T``, the synthetic source's mean log-likelihood
    per token) act on the generated sequences; real_weight is refused."""

    model: str = "tiny"  # micro | tiny | small | base (offline, pre-trained here) | HF dir | hub id
    tokenizer: str = ""  # tokenizer dir or hub id; "" = the model's, OPT's, or the synthetic one
    corpus: str = "synthetic"  # synthetic | wikitext | directory with train/valid/test.txt
    block_size: int = 64  # tokens per training block and per generated continuation
    train_blocks: int = 128  # real training blocks of the regime (0 = all available)
    eval_blocks: int = 256  # validation and test blocks used (0 = all)
    pretrain_blocks: int = 4096  # built-in models: blocks to pre-train the base on (disjoint)
    pretrain_epochs: int = 3  # built-in models: epochs of base pre-training
    pretrain_learning_rate: float = 3e-3  # built-in models: peak learning rate of pre-training
    generations: int = 5  # generations trained on generated data (after generation 0)
    epochs: int = 5  # fine-tuning epochs per generation
    learning_rate: float = 3e-4  # peak AdamW learning rate of every fine-tune (cosine decay)
    warmup_steps: int = 0  # linear warm-up updates of every fine-tune
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    batch_size: int = 16  # training batch (blocks per update, over all devices)
    grad_accum_steps: int = 1  # micro-batches per update
    seeds: int = 3  # independent repetitions (fine-tune order, dropout, sampling)
    seed: int = 0  # first seed; seeds are seed, seed + 1, ...
    policy: str = "replace"  # replace | accumulate | accumulate-subsample
    fresh_fractions: tuple[float, ...] = (0.0, 0.1)  # one arm per value: original data kept
    start_from: str = "base"  # base (the paper) | previous generation's weights
    select_by_validation: bool = True  # keep the epoch with the lowest validation loss
    decoding: str = "beam"  # beam | sample | greedy
    num_beams: int = 5  # beams of beam search
    repetition_penalty: float = 1.0  # HF repetition penalty (the paper's ablation: 2.0)
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # sampling top-k (0 = off)
    top_p: float = 1.0  # sampling nucleus (1 = off)
    generate_batch_size: int = 64  # prompts per decoding call
    eval_batch_size: int = 64  # blocks per scoring call
    n_prompts: int = 3  # fixed test prompts whose continuations are shown per generation
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    scan_layers: str = "auto"  # auto | on | off: train the layers as one scan (auto: CPU, 6+)
    synthetic_vocab: int = 128  # synthetic corpus: word tokens V
    synthetic_states: int = 16  # synthetic corpus: hidden states S
    synthetic_seed: int = 0  # synthetic corpus: seed of the source's parameters
    synthetic_blocks: int = (
        8192  # synthetic corpus: training-text blocks sampled (incl. pre-training)
    )
    tail_mass: float = 0.1  # synthetic corpus: the source's tail = rarest words with this mass
    keep_models: bool = False  # keep every generation's weights (else generation 0 and latest)
    resume: bool = False  # continue an interrupted run in the same directory


# --------------------------------------------------------------------------------------------
# Validation and command-line flags


def validate(config: Config) -> Config:
    """Check every field (cheap checks; corpus/model checks happen in :func:`prepare`)."""
    fr = config.fresh_fractions
    if isinstance(fr, int | float):
        fr = (fr,)
    if isinstance(fr, str):
        fr = tuple(float(v) for v in fr.split(",") if v.strip())
    fr = tuple(
        check_float(f"fresh_fractions {fr}: fresh fraction (keep-fraction)", v, 0.0, 1.0)
        for v in fr
    )
    if not fr:
        raise ConfigError(f"fresh_fractions needs at least one value, got {fr}")
    config = dataclasses.replace(config, fresh_fractions=fr)
    for v in fr:
        Policy.parse(config.policy, v)
    if config.policy not in ("replace", "accumulate", "accumulate-subsample"):
        raise ConfigError(
            f"lm policy {config.policy!r} is not supported; choose replace, accumulate or "
            "accumulate-subsample (keep original data with fresh_fractions)"
        )
    check_int("block_size", config.block_size, 2)
    check_int("train_blocks", config.train_blocks, 0)
    check_int("eval_blocks", config.eval_blocks, 0)
    check_int("pretrain_blocks", config.pretrain_blocks, 0)
    check_int("pretrain_epochs", config.pretrain_epochs, 0)
    check_float("pretrain_learning_rate", config.pretrain_learning_rate, 0.0, open_min=True)
    check_int("generations", config.generations, 0)
    check_int("epochs", config.epochs, 1)
    check_float("learning_rate", config.learning_rate, 0.0, open_min=True)
    check_int("warmup_steps", config.warmup_steps, 0)
    check_float("weight_decay", config.weight_decay, 0.0)
    check_int("batch_size", config.batch_size, 1)
    check_int("grad_accum_steps", config.grad_accum_steps, 1)
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"batch_size {config.batch_size} is not divisible by grad_accum_steps "
            f"{config.grad_accum_steps}"
        )
    check_int("seeds", config.seeds, 1)
    check_int("seed", config.seed, 0)
    check_choice("start_from", config.start_from, START_FROM)
    check_choice("decoding", config.decoding, DECODINGS)
    check_int("num_beams", config.num_beams, 1)
    check_float("repetition_penalty", config.repetition_penalty, 0.0, open_min=True)
    check_float("temperature", config.temperature, 0.0, open_min=True)
    check_int("top_k", config.top_k, 0)
    check_float("top_p", config.top_p, 0.0, 1.0, open_min=True)
    check_int("generate_batch_size", config.generate_batch_size, 1)
    check_int("eval_batch_size", config.eval_batch_size, 1)
    check_int("n_prompts", config.n_prompts, 0)
    check_choice("dtype", config.dtype, ("float32", "bfloat16"))
    check_choice("scan_layers", config.scan_layers, SCAN_LAYERS)
    check_int("synthetic_vocab", config.synthetic_vocab, 2)
    check_int("synthetic_states", config.synthetic_states, 1)
    check_int("synthetic_seed", config.synthetic_seed, 0)
    check_int("synthetic_blocks", config.synthetic_blocks, 2)
    check_float("tail_mass", config.tail_mass, 0.0, 1.0)
    ops = operators.parse(config, "lm", OPERATORS, sequences=True)
    if ops.verify is not None and config.corpus != "synthetic":
        raise ConfigError(
            f"verify {config.verify!r} scores sequences under the known synthetic source; "
            f"corpus {config.corpus!r} has none (use corpus synthetic)"
        )
    if not config.model:
        raise ConfigError("model must be a built-in size, a directory or a hub id")
    if config.model in BUILTIN_MODELS and config.pretrain_epochs > 0:
        check_int("pretrain_blocks (built-in model)", config.pretrain_blocks, 1)
    _check_paths(config)
    _check_cost(config)
    return config


def scans_layers(config: Config, num_hidden_layers: int, platform: str | None = None) -> bool:
    """Whether the fine-tunes run the decoder layers as one ``lax.scan`` over parameters stored
    stacked (``scan_layers``). XLA then compiles one layer instead of all of them. ``auto``
    scans on CPU (``platform``, default JAX's backend) models of at least
    :data:`SCAN_LAYERS_AUTO_MIN` layers: on a 2-core CPU the OPT-125m step at the study's 16 x 64
    batch compiled 4.4-5.8x faster and ran 1.10-1.26x the tokens/s. On GPUs it ran at 0.76-0.83x the
    unrolled step's tokens/s (BENCHMARKS.md), which long fine-tunes such as the paper's settings
    would pay for many times over the 20-30 s of compilation saved, so ``auto`` unrolls there.
    The scanned layers draw their dropout masks from ``fold_in(key, layer)``, not Flax's
    per-module streams: the two settings give different (equally valid) fine-tunes."""
    if config.scan_layers == "auto":
        platform = jax.default_backend() if platform is None else platform
        return platform == "cpu" and num_hidden_layers >= SCAN_LAYERS_AUTO_MIN
    return config.scan_layers == "on"


def _check_paths(config: Config) -> None:
    """Local paths given for the model, tokenizer or corpus must be what they claim (a hub id
    is only looked up in :func:`prepare`)."""
    if config.model not in BUILTIN_MODELS:
        _check_local_dir("model", config.model, ("config.json",))
    if config.tokenizer:
        names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
        _check_local_dir("tokenizer", config.tokenizer, names)
    if config.corpus not in ("synthetic", "wikitext"):
        path = Path(config.corpus).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"corpus {config.corpus!r} is neither synthetic, wikitext nor a directory"
            )
        names = [n for files in corpora._SPLIT_FILES.values() for n in files]
        if not any((path / n).is_file() for n in names):
            raise ConfigError(f"corpus directory {config.corpus!r} has no train/valid/test.txt")


def _check_local_dir(what: str, value: str, needs: tuple[str, ...]) -> None:
    """``value`` names a local directory (it exists, or looks like a path: the rule of
    ``resolve_model_dir``) holding one of ``needs``; a hub id passes."""
    path = Path(value).expanduser()
    looks_local = path.exists() or value.startswith((".", "/", "~")) or value.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        raise ConfigError(f"{what} {value!r} is not a directory")
    if not any((path / n).is_file() for n in needs):
        raise ConfigError(f"{what} directory {value!r} has no {' or '.join(needs)}")


#: Fine-tuning epochs a configuration may ask for in all (seeds × arms × generations × epochs,
#: plus pre-training): each trains on every block at least once, so 10^7 is beyond any run.
MAX_EPOCHS = 10**7


def _check_cost(config: Config) -> None:
    """Refuse configurations whose time or memory no machine has, before anything loads: the
    epochs trained in all, the logits of the largest batch (2 × block_size positions) and the
    synthetic source's tables and text."""
    c = config
    epochs = c.seeds * len(c.fresh_fractions) * (c.generations + 1) * c.epochs + c.pretrain_epochs
    if epochs > MAX_EPOCHS:
        raise ConfigError(
            f"seeds {c.seeds} × arms {len(c.fresh_fractions)} × generations {c.generations} × "
            f"epochs {c.epochs} + pretrain_epochs {c.pretrain_epochs} = {epochs} epochs of "
            f"training, above {MAX_EPOCHS}"
        )
    if c.corpus == "synthetic":
        s, v = c.synthetic_states, c.synthetic_vocab
        check_memory(
            8.0 * (s * s + s * v) + 4.0 * c.synthetic_blocks * c.block_size,
            f"synthetic_states {s}, synthetic_vocab {v} and synthetic_blocks "
            f"{c.synthetic_blocks} of block_size {c.block_size}",
        )
    vocab = c.synthetic_vocab + 8 if c.corpus == "synthetic" else 50272
    beams = c.num_beams if c.decoding == "beam" else 1
    rows = max(c.batch_size // c.grad_accum_steps, c.eval_batch_size, c.generate_batch_size * beams)
    check_memory(
        4.0 * rows * 2 * c.block_size * vocab,
        f"logits of batch_size {c.batch_size}, eval_batch_size {c.eval_batch_size}, "
        f"generate_batch_size {c.generate_batch_size} × num_beams {c.num_beams} at block_size "
        f"{c.block_size} (vocabulary {vocab})",
    )


def demo_config() -> Config:
    """A short run for `collapse-jax demo` (about a minute on 2 CPU cores)."""
    return Config(
        train_blocks=32,
        eval_blocks=64,
        pretrain_blocks=512,
        pretrain_epochs=1,
        generations=2,
        epochs=2,
        seeds=2,
        synthetic_blocks=1024,
        n_prompts=2,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's flags, one per config field (``--keep-fraction`` is the paper's name for
    ``--fresh-fractions``); unset flags leave the config unchanged."""
    add_config_arguments(parser, Config, aliases={"fresh_fractions": ("--keep-fraction",)})


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    """Apply the flags that were given onto ``base`` and validate."""
    return apply_flags(args, base, validate)


# --------------------------------------------------------------------------------------------
# Set-up: corpus, tokenizer, model; every check before any training


class Setup(NamedTuple):
    """Everything fixed before training starts."""

    model_config: Any  # OPTConfig
    base_dir: Path | None  # Hugging Face directory of the base model (None: pre-train it)
    tokenizer: Any
    train: np.ndarray  # (N, block) real training blocks of the regime
    pretrain: np.ndarray  # (P, block) blocks for base pre-training (built-in models)
    validation: np.ndarray
    test: np.ndarray
    prompts: np.ndarray  # (n_prompts, block) fixed Example-1 prompts (test blocks)
    source: Any  # HMMSource for the synthetic corpus, else None
    corpus_source: str


def _cap(blocks: np.ndarray, n: int) -> np.ndarray:
    return blocks if n == 0 else blocks[:n]


def prepare(config: Config) -> Setup:
    """Load the model configuration, tokenizer and corpus and check that they fit together.

    Raises :class:`ConfigError` (before anything is trained) for a block size above the model's
    positions, a tokenizer/model vocabulary mismatch, or an empty or too small corpus. The model
    and tokenizer are checked first, so those errors come before the corpus is even read.
    """

    block = config.block_size
    builtin = config.model in BUILTIN_MODELS
    synthetic = config.corpus == "synthetic"
    base_dir = None if builtin else resolve_model_dir(config.model)
    if synthetic:
        if config.tokenizer:
            raise ConfigError("the synthetic corpus has its own tokenizer; leave tokenizer empty")
        tokenizer = sl.make_tokenizer(config.synthetic_vocab)
    else:
        tokenizer = corpora.load_tokenizer(config.tokenizer or (None if builtin else base_dir))

    if builtin:
        model_config = OPTConfig(
            vocab_size=-(-corpora.tokenizer_vocab_size(tokenizer) // 8) * 8,
            max_position_embeddings=max(2 * block, 128),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **BUILTIN_MODELS[config.model],
        )
    else:
        model_config = OPTConfig.from_hf(base_dir)
    corpora.check_vocab(tokenizer, model_config.vocab_size)
    if 2 * block > model_config.max_position_embeddings:
        raise ConfigError(
            f"block_size {block} is too long for the model: a block plus its {block}-token "
            f"continuation needs {2 * block} positions, the model has "
            f"max_position_embeddings {model_config.max_position_embeddings}"
        )
    n_pre = config.pretrain_blocks if builtin and config.pretrain_epochs > 0 else 0
    if synthetic and n_pre >= config.synthetic_blocks:
        raise ConfigError(
            f"pretrain_blocks {n_pre} leaves no training blocks for the regime: "
            f"synthetic_blocks is {config.synthetic_blocks}"
        )

    source = None
    if synthetic:
        scfg = sl.SourceConfig(
            vocab_size=config.synthetic_vocab,
            n_states=config.synthetic_states,
            seed=config.synthetic_seed,
        )
        n_eval = config.eval_blocks or 1024
        corpus = sl.make_corpus(
            jax.random.key(config.synthetic_seed + 1),
            scfg,
            block,
            config.synthetic_blocks,
            n_eval,
            n_eval,
        )
        text_train, validation, test = corpus.train, corpus.validation, corpus.test
        source = corpus.source
        corpus_source = (
            f"synthetic hidden-Markov source (V={scfg.vocab_size}, S={scfg.n_states}, "
            f"seed {scfg.seed})"
        )
    else:
        splits = corpora.load_text_splits(config.corpus)
        tc = corpora.build_token_corpus(splits, tokenizer, block)
        text_train, validation, test = tc.train, tc.validation, tc.test
        corpus_source = tc.source

    validation = _cap(validation, config.eval_blocks)
    test = _cap(test, config.eval_blocks)
    # Built-in models are pre-trained on the first blocks; the regime uses the next ones.
    if n_pre >= len(text_train):
        raise ConfigError(
            f"pretrain_blocks {n_pre} leaves no training blocks for the regime: the corpus has "
            f"{len(text_train)} training blocks of {block} tokens"
        )
    pretrain, train = text_train[:n_pre], text_train[n_pre:]
    train = _cap(train, config.train_blocks)
    if config.train_blocks and len(train) < config.train_blocks:
        raise ConfigError(
            f"train_blocks {config.train_blocks} exceeds the {len(train)} training blocks left "
            f"after pre-training"
        )
    if len(train) < config.batch_size:
        raise ConfigError(
            f"empty corpus for batch_size {config.batch_size}: only {len(train)} training blocks"
        )
    n_dev = jax.device_count()
    if n_dev > 1 and config.batch_size % n_dev:
        raise ConfigError(
            f"batch_size {config.batch_size} must be divisible by the {n_dev} devices"
        )
    for name, arr in (("train", train), ("validation", validation), ("test", test)):
        corpora.check_blocks(name, arr, model_config.vocab_size)
    prompts = test[: min(config.n_prompts, len(test))]
    return Setup(
        model_config,
        base_dir,
        tokenizer,
        train,
        pretrain,
        validation,
        test,
        prompts,
        source,
        corpus_source,
    )


def compute_dtype(config: Config):
    """The compute dtype of the models (float32 or bfloat16)."""
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
